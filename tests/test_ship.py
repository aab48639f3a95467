"""Resumable, digest-verified shipping (evc/deployments/ship.py) against simulated devices: a
connection dropped at 50 % resumes (bytes re-sent <= 10 % of the file), a corrupted ``.part``
restarts cleanly, a file already there is not sent again, a digest mismatch fails clearly."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from evc import ssh
from evc.deployments import ship as shipping
from evc.errors import ConnectionDropped
from evc.settings import Settings
from evc_sim import SimDevice
from tests.fixtures.sim import MakeDevices, connect

PYTHON = "/usr/bin/python3"
DEST = "~/ship/m/model.onnx"


def test_resume_offset_picks_the_last_matching_segment() -> None:
    data = os.urandom(5 * shipping.SEGMENT + 123)
    p = shipping.Payload(data)
    assert p.sha256 == hashlib.sha256(data).hexdigest()
    assert len(p.marks) == 5
    assert p.resume_offset(None, []) == 0
    assert p.resume_offset(3 * shipping.SEGMENT + 7, p.marks[:3]) == 3 * shipping.SEGMENT
    assert p.resume_offset(3 * shipping.SEGMENT, ["x", *p.marks[1:3]]) == 0  # wrong start: over
    assert p.resume_offset(3 * shipping.SEGMENT, [p.marks[0], "x", p.marks[2]]) == shipping.SEGMENT
    assert p.resume_offset(len(data) + 1, p.marks) == 0  # longer than the file: over


def _target(dev: SimDevice) -> ssh.Target:
    return ssh.Target(dev.host, dev.port, dev.username)


def _on_device(dev: SimDevice, path: str) -> Path:
    return dev.home / path.removeprefix("~/")


@pytest.fixture()
def device(sim_devices: MakeDevices) -> SimDevice:
    return sim_devices(1)[0]


async def _test_ships_then_skips_a_file_already_there(
    settings: Settings, device: SimDevice, evc_key_path: Path
) -> None:
    payload = shipping.Payload(os.urandom(3 * shipping.SEGMENT + 5))
    async with await connect(device, evc_key_path) as conn:
        st = await shipping.ship(conn, _target(device), settings, PYTHON, DEST, payload)
        assert (st.sent, st.resumed_from, st.skipped, st.verified) == (len(payload.data), 0, False, "stream")
        assert _on_device(device, DEST).read_bytes() == payload.data
        assert not _on_device(device, DEST + ".part").exists()
        again = await shipping.ship(conn, _target(device), settings, PYTHON, DEST, payload)
        assert again.skipped and again.sent == 0


async def _test_a_drop_at_half_resumes_with_little_resent(
    settings: Settings, device: SimDevice, evc_key_path: Path
) -> None:
    payload = shipping.Payload(os.urandom(40 * shipping.SEGMENT))
    size = len(payload.data)
    first = shipping.ShipStats()
    async with await connect(device, evc_key_path) as conn:

        def drop(done: int, total: int) -> None:
            if done >= total // 2:
                conn.abort()  # the connection dies under the upload

        with pytest.raises(ConnectionDropped):
            await shipping.ship(conn, _target(device), settings, PYTHON, DEST, payload, progress=drop, stats=first)
    assert size // 2 <= first.sent < size
    assert _on_device(device, DEST + ".part").exists() and not _on_device(device, DEST).exists()
    async with await connect(device, evc_key_path) as conn:
        second = await shipping.ship(conn, _target(device), settings, PYTHON, DEST, payload)
    assert second.part_size and 0 < second.resumed_from <= second.part_size
    assert second.verified == "stream"
    # bytes sent twice: what the device had beyond the resume point (exact), and, as an upper
    # bound, every byte handed to SFTP in both attempts beyond the file's size
    assert second.part_size - second.resumed_from <= shipping.SEGMENT
    resent = first.sent + second.sent - size
    assert 0 <= resent <= size // 10, (first, second)
    assert _on_device(device, DEST).read_bytes() == payload.data


async def _test_a_corrupted_part_restarts_cleanly(settings: Settings, device: SimDevice, evc_key_path: Path) -> None:
    payload = shipping.Payload(os.urandom(4 * shipping.SEGMENT))
    part = _on_device(device, DEST + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"\0" * 100 + payload.data[100 : 3 * shipping.SEGMENT])  # wrong from the start
    home = device.home.stat()  # the device's account owns what it left there
    for p in (part, part.parent, part.parent.parent):
        os.chown(p, home.st_uid, home.st_gid)
    async with await connect(device, evc_key_path) as conn:
        st = await shipping.ship(conn, _target(device), settings, PYTHON, DEST, payload)
    assert st.resumed_from == 0 and st.sent == len(payload.data) and st.verified == "stream"
    assert _on_device(device, DEST).read_bytes() == payload.data


async def _test_a_digest_mismatch_is_a_clear_failure(settings: Settings, device: SimDevice, evc_key_path: Path) -> None:
    payload = shipping.Payload(os.urandom(shipping.SEGMENT + 1), sha256="0" * 64)
    async with await connect(device, evc_key_path) as conn:
        with pytest.raises(shipping.DigestMismatch, match="does not match sha256 0000") as err:
            await shipping.ship(conn, _target(device), settings, PYTHON, DEST, payload)
    assert err.value.got == hashlib.sha256(payload.data).hexdigest()
    assert not _on_device(device, DEST).exists() and not _on_device(device, DEST + ".part").exists()


def test_ships_then_skips_a_file_already_there(settings: Settings, device: SimDevice, evc_key_path: Path) -> None:
    asyncio.run(_test_ships_then_skips_a_file_already_there(settings, device, evc_key_path))


def test_a_drop_at_half_resumes_with_little_resent(settings: Settings, device: SimDevice, evc_key_path: Path) -> None:
    asyncio.run(_test_a_drop_at_half_resumes_with_little_resent(settings, device, evc_key_path))


def test_a_corrupted_part_restarts_cleanly(settings: Settings, device: SimDevice, evc_key_path: Path) -> None:
    asyncio.run(_test_a_corrupted_part_restarts_cleanly(settings, device, evc_key_path))


def test_a_digest_mismatch_is_a_clear_failure(settings: Settings, device: SimDevice, evc_key_path: Path) -> None:
    asyncio.run(_test_a_digest_mismatch_is_a_clear_failure(settings, device, evc_key_path))


def test_install_and_start_retries_a_dropped_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """remote.install_and_start runs the device's steps again on a new connection when the
    connection drops (the model's upload then resumes); it gives up after SHIP_ATTEMPTS."""
    from evc.deployments import remote

    calls: list[int] = []

    class Pool:
        def __init__(self, fail: int) -> None:
            self.fail = fail

        async def use(self, device: object, op: object) -> dict[str, str]:
            calls.append(1)
            if len(calls) <= self.fail:
                raise ConnectionDropped("the connection dropped during the upload")
            return {"state": "running"}

    spec = remote.Spec("dep_1", "m", "1", b"x", hashlib.sha256(b"x").hexdigest(), "python3", 8500)
    monkeypatch.setattr(remote.pooling, "pool_for", lambda settings: Pool(2))
    assert asyncio.run(remote.install_and_start(None, {"id": "d1"}, spec)) == {"state": "running"}  # type: ignore[arg-type]
    assert len(calls) == 3
    calls.clear()
    monkeypatch.setattr(remote.pooling, "pool_for", lambda settings: Pool(remote.SHIP_ATTEMPTS))
    with pytest.raises(ConnectionDropped):
        asyncio.run(remote.install_and_start(None, {"id": "d1"}, spec))  # type: ignore[arg-type]
    assert len(calls) == remote.SHIP_ATTEMPTS
