"""How the device simulator scales: one process serving N devices (default 1,000).

Prints how long the simulator process takes to start N devices (until its state file lists
them), then how long it takes to open one SSH connection to every device and run ``true`` on
it, with a bounded number in flight (default 100), plus the simulator's memory and descriptors.

    .venv/bin/python bench/sim_scale.py [--devices 1000] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh

from evc.sim import SimDevice, raise_fd_limit, read_state


def _proc_status(pid: int) -> tuple[float, int]:
    """(resident MiB, open descriptors) of process *pid*."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def _connect_all(
    devices: list[SimDevice], key: asyncssh.SSHKey, concurrency: int
) -> tuple[float, list[float], int]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failures = 0

    async def one(d: SimDevice) -> None:
        nonlocal failures
        async with gate:
            t0 = time.perf_counter()
            try:
                async with asyncssh.connect(
                    d.host, d.port, username=d.username, client_keys=[key], agent_path=None,
                    known_hosts=([asyncssh.import_public_key(d.host_key_public)], [], []),
                ) as conn:  # fmt: skip
                    await conn.run("true", check=True)
            except (OSError, asyncssh.Error):
                failures += 1
                return
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(d) for d in devices))
    return time.perf_counter() - t0, latencies, failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--privileges", default="user", help="comma-separated levels to cycle")
    args = p.parse_args()
    raise_fd_limit()

    root = Path(tempfile.mkdtemp(prefix="evc-bench-sim-"))
    root.chmod(0o711)  # the simulator's accounts must reach the device homes when run as root
    key = asyncssh.generate_private_key("ssh-ed25519")
    pub = root / "client.pub"
    pub.write_bytes(key.export_public_key())
    state = root / "devices.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "evc.sim", "--devices", str(args.devices), "--root", str(root / "sim"),
         "--state-file", str(state), "--authorized-keys", str(pub), "--privileges", args.privileges],
    )  # fmt: skip
    try:
        while not state.exists():
            if proc.poll() is not None:
                print("the simulator exited before it served its devices", file=sys.stderr)
                return 1
            time.sleep(0.02)
        started = time.perf_counter() - t0
        devices = read_state(state)
        rss, fds = _proc_status(proc.pid)
        total, latencies, failures = asyncio.run(_connect_all(devices, key, args.concurrency))
        latencies.sort()
        n = len(devices)
        print(f"simulated devices in one process   {n}")
        print(f"start {n} devices                  {started:8.2f} s")
        print(f"connect + `true` on every device   {total:8.2f} s  ({n / total:.0f} devices/s, "
              f"concurrency {args.concurrency})")  # fmt: skip
        if latencies:
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(f"  per device p50 / p99             {statistics.median(latencies) * 1000:8.1f}"
                  f" / {p99 * 1000:.1f} ms")  # fmt: skip
        print(f"  failures                         {failures:8d}")
        print(f"simulator memory / descriptors     {rss:8.0f} MiB / {fds}")
        return 0 if failures == 0 else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
