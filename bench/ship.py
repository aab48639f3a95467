"""Shipping a model to devices: EVC's resumable, digest-verified SFTP upload vs parallel ``scp``.

Starts the device simulator (its own process) with N devices (default 20), makes one file of
--mb MB (default 100, random bytes), then, for --rounds rounds (default 2), alternately:

* ``scp``: OpenSSH's scp (SFTP mode, ``-s``) of the file to every device, all in parallel, each
  its own process and connection, host keys checked;
* EVC: :func:`evc.deployments.ship.ship` to every device at once over one asyncssh connection
  each (connection set-up included): ``.part``, pipelined writes, the whole file's sha256
  computed on the device by its Python, then the rename. scp checks no digest.

The order alternates between rounds; the files are removed after each run and the page cache
synced before the next. Prints each run's wall time and CPU seconds (the simulator with the
commands it ran, and the client side: scp + ssh, or EVC's process), the medians and their
ratio (target: EVC <= 1.2 x scp). Both share one simulator process and this machine's cores:
on a loaded machine wall times vary a lot; the CPU seconds much less.

Then the resume figure: one device, the connection cut when half the file has been handed to
SFTP, then a new connection ships again and resumes; bytes re-sent is what the device already
had beyond the resume point, and, as an upper bound, every byte handed to SFTP in both attempts
beyond the file's size (target <= 10 % of the file).

    .venv/bin/python bench/ship.py [--devices 20] [--mb 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh
from _common import Figure, emit
from sim_scale import _cpu

from evc import ssh
from evc.deployments import ship as shipping
from evc.errors import ConnectionDropped
from evc.settings import Settings, load_settings
from evc_sim import SimDevice, read_state

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"
DEST = "bench-ship/model.onnx"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _known_hosts(devices: list[SimDevice], path: Path) -> Path:
    path.write_text("".join(f"[{d.host}]:{d.port} {d.host_key_public}\n" for d in devices))
    return path


def _scp_all(devices: list[SimDevice], src: Path, key: Path, known: Path) -> float:
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "scp",
                "-s",
                "-q",
                "-B",
                "-i",
                str(key),
                "-o",
                f"UserKnownHostsFile={known}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-P",
                str(d.port),
                str(src),
                f"{d.username}@{d.host}:scp-model.onnx",
            ],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for d in devices
    ]
    failed = []
    for d, p in zip(devices, procs, strict=True):
        _, err = p.communicate()
        if p.returncode != 0:
            failed.append(f"{d.name}: {err.decode(errors='replace').strip()}")
    wall = time.perf_counter() - t0
    if failed:
        raise SystemExit("scp failed: " + "; ".join(failed[:3]))
    return wall


def _target(d: SimDevice) -> ssh.Target:
    return ssh.Target(d.host, d.port, d.username, host_key=d.host_key_public)


async def _connect(d: SimDevice, settings: Settings) -> asyncssh.SSHClientConnection:
    """A connection as EVC opens one (its key, the pinned host key, its cipher preference)."""
    return await ssh.connect(_target(d), settings)


async def _evc_all(devices: list[SimDevice], settings: Settings, payload: shipping.Payload) -> float:
    async def one(d: SimDevice) -> shipping.ShipStats:
        conn = await _connect(d, settings)
        try:
            return await shipping.ship(conn, _target(d), settings, PYTHON, DEST, payload)
        finally:
            conn.close()

    t0 = time.perf_counter()
    stats = await asyncio.gather(*(one(d) for d in devices))
    wall = time.perf_counter() - t0
    if any(s.skipped or s.sent != len(payload.data) for s in stats):
        raise SystemExit(f"EVC's shipping did not send the whole file everywhere: {stats}")
    return wall


async def _clean(devices: list[SimDevice], settings: Settings) -> None:
    async def one(d: SimDevice) -> None:
        async with await _connect(d, settings) as conn:
            await conn.run(f"rm -rf bench-ship scp-model.onnx {DEST}.part", check=True)

    await asyncio.gather(*(one(d) for d in devices))


Stats = tuple[shipping.ShipStats, shipping.ShipStats]


async def _resume(d: SimDevice, settings: Settings, payload: shipping.Payload) -> Stats:
    size = len(payload.data)
    first = shipping.ShipStats()
    conn = await _connect(d, settings)
    try:

        def drop(done: int, total: int) -> None:
            if done >= total // 2:
                conn.abort()

        try:
            await shipping.ship(conn, _target(d), settings, PYTHON, DEST, payload, progress=drop, stats=first)
            raise SystemExit("the connection was cut, yet the upload finished")
        except ConnectionDropped:
            pass
    finally:
        conn.close()
    conn = await _connect(d, settings)
    try:
        second = await shipping.ship(conn, _target(d), settings, PYTHON, DEST, payload)
        res = await conn.run(f"sha256sum {DEST}")
    finally:
        conn.close()
    if str(res.stdout).split()[:1] != [payload.sha256] or second.size != size:
        raise SystemExit("the resumed upload does not match the file")
    return first, second


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if not shutil.which("scp"):
        print("no scp here (OpenSSH client): nothing to compare with", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="evc-bench-ship-"))
    root.chmod(0o711)  # the simulator's accounts must reach the device homes when run as root
    key = asyncssh.generate_private_key("ssh-ed25519")
    settings = load_settings(env={}, data_dir=root / "data", ssh_command_timeout_s=600.0)
    key_path = settings.key_path  # EVC's key: its connections use it
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(key.export_private_key())
    key_path.chmod(0o600)
    pub = root / "client.pub"
    pub.write_bytes(key.export_public_key())
    src = root / "model.bin"
    data = os.urandom(args.mb * 1_000_000)
    src.write_bytes(data)
    payload = shipping.Payload(data)
    state = root / "devices.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "evc_sim", "--devices", str(args.devices), "--root", str(root / "sim"),
         "--state-file", str(state), "--authorized-keys", str(pub)],
    )  # fmt: skip
    try:
        while not state.exists():
            if proc.poll() is not None:
                print("the simulator exited before it served its devices", file=sys.stderr)
                return 1
            time.sleep(0.05)
        devices = read_state(state)
        known = _known_hosts(devices, root / "known_hosts")
        n, mb = len(devices), args.mb
        print(
            f"{n} simulated devices (one simulator process), {mb} MB file, {args.rounds} rounds, {os.cpu_count()} CPUs"
        )
        scp_t: list[float] = []
        evc_t: list[float] = []
        scp_cpu: list[float] = []
        evc_cpu: list[float] = []
        for r in range(1, args.rounds + 1):
            # alternate which goes first; each starts with the page cache's dirty pages written
            for which in ("scp", "evc") if r % 2 else ("evc", "scp"):
                os.sync()
                if which == "scp":
                    # CPU seconds: the simulator (and the commands it ran) + the client side (scp
                    # and its ssh: reaped children; EVC: this process); less load-sensitive
                    s0, c0 = sum(_cpu(proc.pid)), _children_cpu()
                    scp_t.append(_scp_all(devices, src, key_path, known))
                    scp_sim, scp_client = sum(_cpu(proc.pid)) - s0, _children_cpu() - c0
                    scp_cpu.append(scp_sim + scp_client)
                else:
                    s0, c0 = sum(_cpu(proc.pid)), time.process_time()
                    evc_t.append(asyncio.run(_evc_all(devices, settings, payload)))
                    evc_sim, evc_client = sum(_cpu(proc.pid)) - s0, time.process_time() - c0
                    evc_cpu.append(evc_sim + evc_client)
                asyncio.run(_clean(devices, settings))
            print(
                f"round {r}: scp -s {scp_t[-1]:6.2f} s (CPU: simulator {scp_sim:5.2f} s, scp+ssh {scp_client:5.2f} s)"
                f"   EVC {evc_t[-1]:6.2f} s (CPU: simulator {evc_sim:5.2f} s, EVC {evc_client:5.2f} s)"
                f"   ratio {evc_t[-1] / scp_t[-1]:.2f}"
            )
        scp_m, evc_m = statistics.median(scp_t), statistics.median(evc_t)
        ratio = evc_m / scp_m
        cpu_ratio = statistics.median(evc_cpu) / statistics.median(scp_cpu)
        print(
            f"median: scp -s {scp_m:.2f} s ({n * mb / scp_m:.0f} MB/s in all), "
            f"EVC {evc_m:.2f} s ({n * mb / evc_m:.0f} MB/s); CPU ratio {cpu_ratio:.2f}"
        )

        first, second = asyncio.run(_resume(devices[0], settings, payload))
        size = len(data)
        had = (second.part_size or 0) - second.resumed_from
        bound = first.sent + second.sent - size
        print(
            f"resume: cut after {first.sent / size:.0%} handed to SFTP; the device had {second.part_size or 0} B; "
            f"resumed at {second.resumed_from} B; second attempt sent {second.sent} B"
        )
        print(f"re-sent: {had} B the device already had ({had / size:.1%}); upper bound {bound} B ({bound / size:.1%})")
        print()
        emit([
            Figure(f"scp -s of {mb} MB to {n} devices (median)", "-", scp_m, "s", True),
            Figure(f"EVC ship of {mb} MB to {n} devices (median)", "<= 1.2x scp", evc_m, "s", ratio <= 1.2, ratio),
            Figure("EVC/scp CPU seconds (simulator + client)", "-", cpu_ratio, "x", True),
            Figure("bytes re-sent after a drop at 50% (upper bound)", "<= 10 %", 100 * bound / size, "%",
                   bound <= size / 10, bound / (size / 10)),
        ])  # fmt: skip
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
