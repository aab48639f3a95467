"""SSH error mapping: every asyncssh/OS failure becomes one DeviceError of EVC's tree with a
stable reason, named after the device (or its jump host). No SSH server: the connect and the
command are stubbed."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncssh
import pytest

from evc import ssh
from evc.errors import (
    AuthRefused,
    CommandFailed,
    ConnectionDropped,
    DeviceError,
    HostKeyMismatch,
    JumpHostKeyMismatch,
    SSHTimeout,
    Unreachable,
)
from evc.settings import load_settings

KEY = ssh.key_line(asyncssh.generate_private_key("ssh-ed25519"))
JUMP = ssh.Target("bastion", 2222, "hop", KEY, device_id=None)
TARGET = ssh.Target("10.0.0.5", 22, "edge", KEY, JUMP, "dev_1")


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings(env={}, data_dir=tmp_path, public_url="https://evc.example")


@pytest.mark.parametrize(
    ("exc", "kind", "reason", "text"),
    [
        (
            asyncssh.HostKeyNotVerifiable("changed"),
            HostKeyMismatch,
            "host_key_mismatch",
            "does not match the key pinned",
        ),
        (asyncssh.PermissionDenied("no"), AuthRefused, "auth_refused", "https://evc.example/api/v1/ssh-key"),
        (TimeoutError(), SSHTimeout, "timeout", "did not answer within the time limit during connect"),
        (ConnectionRefusedError(), Unreachable, "unreachable", "is sshd running on port 22?"),
        (socket.gaierror(-2, "unknown"), Unreachable, "unreachable", "cannot resolve host '10.0.0.5'"),
        (asyncssh.ConnectionLost("gone"), ConnectionDropped, "connection_dropped", "dropped during connect: gone"),
        (asyncssh.DisconnectError(11, "bye"), ConnectionDropped, "connection_dropped", "dropped during connect"),
        (BrokenPipeError(), ConnectionDropped, "connection_dropped", "dropped"),
        (ConnectionResetError(), ConnectionDropped, "connection_dropped", "dropped"),
        (
            OSError(113, "No route to host"),
            Unreachable,
            "unreachable",
            "cannot reach edge@10.0.0.5:22: No route to host",
        ),
        (RuntimeError("bug"), DeviceError, "error", "unexpected error with edge@10.0.0.5:22 during connect"),
    ],
)
def test_errors_map_to_the_tree(settings, exc: BaseException, kind: type, reason: str, text: str) -> None:
    err = ssh._map_error(exc, TARGET, settings, "connect")
    assert type(err) is kind and err.reason == reason and text in err.message
    assert err.device_id == "dev_1" and err.to_dict()["reason"] == reason


def test_a_device_error_passes_through(settings) -> None:
    mine = CommandFailed("x", exit_status=3)
    assert ssh._map_error(mine, TARGET, settings, "command") is mine


def test_jump_host_errors_name_the_jump_host(settings) -> None:
    err = ssh._map_jump_error(asyncssh.HostKeyNotVerifiable("changed"), TARGET, settings)
    assert isinstance(err, JumpHostKeyMismatch) and err.details["jump_host"] == "hop@bastion:2222"
    assert "jump host hop@bastion:2222 changed" in err.message.replace("of ", "")
    err = ssh._map_jump_error(ConnectionRefusedError(), TARGET, settings)
    assert isinstance(err, Unreachable) and err.device_id == "dev_1"
    assert err.message.startswith("jump host hop@bastion:2222 (on the way to edge@10.0.0.5:22): ")
    assert err.args == (err.message,) and err.details["jump_host"] == "hop@bastion:2222"


def test_an_unpinned_jump_host_is_refused_before_connecting(settings) -> None:
    unpinned = ssh.Target("10.0.0.5", 22, "edge", "k", ssh.Target("bastion", 22, "hop", None), "dev_1")
    with pytest.raises(JumpHostKeyMismatch, match="has no pinned host key"):
        asyncio.run(ssh.connect(unpinned, settings))
    err = asyncio.run(ssh.check_jump_host(unpinned, settings))
    assert isinstance(err, JumpHostKeyMismatch)
    assert asyncio.run(ssh.check_jump_host(ssh.target_of({"host": "h", "port": 22, "username": "u"}), settings)) is None


def test_connect_maps_the_failure(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(*args: Any, **kw: Any) -> Any:
        raise asyncssh.PermissionDenied("denied")

    monkeypatch.setattr(asyncssh, "connect", refuse)
    direct = ssh.Target("10.0.0.5", 22, "edge", None, None, "dev_1")
    with pytest.raises(AuthRefused) as exc:
        asyncio.run(ssh.connect(direct, settings))
    assert isinstance(exc.value.__cause__, asyncssh.PermissionDenied)
    with pytest.raises(AuthRefused, match="^jump host hop@bastion:2222"):  # the hop failed first
        asyncio.run(ssh.connect(TARGET, settings))


class FakeConn:
    def __init__(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error

    async def run(self, command: str, input: str | None = None, check: bool = False) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


def done(exit_status: int | None, stderr: str = "", exit_signal: Any = None) -> Any:
    return SimpleNamespace(exit_status=exit_status, exit_signal=exit_signal, stderr=stderr, stdout="")


def test_command_outcomes(settings) -> None:
    conn: Any = FakeConn(done(0))
    assert asyncio.run(ssh.run(conn, "true", TARGET, settings)).exit_status == 0
    with pytest.raises(CommandFailed) as exc:
        asyncio.run(ssh.run(FakeConn(done(2, "e" * 3000)), "false", TARGET, settings))  # type: ignore[arg-type]
    assert exc.value.exit_status == 2 and len(exc.value.details["stderr"]) == 2000
    assert asyncio.run(ssh.run(FakeConn(done(2)), "false", TARGET, settings, check=False)).exit_status == 2  # type: ignore[arg-type]
    with pytest.raises(ConnectionDropped, match="closed the channel"):
        asyncio.run(ssh.run(FakeConn(done(None)), "x", TARGET, settings))  # type: ignore[arg-type]
    with pytest.raises(ConnectionDropped, match="during command"):
        asyncio.run(ssh.run(FakeConn(error=asyncssh.ConnectionLost("eof")), "x", TARGET, settings))  # type: ignore[arg-type]


def test_target_of_a_device_record() -> None:
    dev = {
        "id": "dev_1", "host": "10.0.0.5", "port": "2200", "username": "edge", "host_key": "",
        "jump_host": {"host": "bastion", "username": "hop", "host_key": "k"},
    }  # fmt: skip
    t = ssh.target_of(dev)
    assert (t.host, t.port, t.host_key, t.device_id, t.address) == (
        "10.0.0.5",
        2200,
        None,
        "dev_1",
        "edge@10.0.0.5:2200",
    )
    assert t.jump == ssh.Target("bastion", 22, "hop", "k")


def test_cipher_preference_is_the_settings_order(settings) -> None:
    assert ssh._ciphers(settings.replace(ssh_ciphers=" aes128-ctr, ,chacha20-poly1305@openssh.com")) == [
        "aes128-ctr",
        "chacha20-poly1305@openssh.com",
    ]
