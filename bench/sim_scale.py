"""How the device simulator scales: one process serving N devices (default 1,000).

Prints how long the simulator process takes to start N devices (until its state file lists
them); then a COLD phase, one new SSH connection to every device running ``true``, a bounded
number in flight (default 100); then a WARM phase, the way a health sweep over pooled
connections works: with one connection already open to every device, ``true`` on all of them
at once (``--health-check``: EVC's health check instead), repeated (default 5 runs; medians
printed). For each phase it prints the wall time and the CPU time per command of the simulator
(its process, and the spawner processes that start commands for other accounts), of the
commands it ran, and of this client. Wall time depends on what else the machine runs; CPU time
much less so.

    .venv/bin/python bench/sim_scale.py [--devices 1000] [--concurrency 100] [--warm-runs 5]
        [--privileges user] [--health-check]
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
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncssh
from _common import Figure, emit

from evc_sim import SimDevice, raise_fd_limit, read_state


def _proc_status(pid: int) -> tuple[float, int]:
    """(resident MiB, open descriptors) of process *pid*."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu(pid: int) -> tuple[float, float, float]:
    """CPU seconds (user + system) of the simulator *pid*: (its own, its spawner processes' own,
    the commands it ran: its reaped children and theirs). Linux /proc.
    """
    tick = os.sysconf("SC_CLK_TCK")
    f = _stat(pid)
    own, commands, helpers = int(f[11]) + int(f[12]), int(f[13]) + int(f[14]), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pid:
            continue
        try:
            c = _stat(int(entry))
        except OSError:
            continue
        if c[1] == str(pid) and c[0] != "Z":  # a live child: a spawner process
            helpers += int(c[11]) + int(c[12])
            commands += int(c[13]) + int(c[14])
    return own / tick, helpers / tick, commands / tick


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Phase:
    """Wall time and CPU (simulator, its spawners, its commands, this client) of one step."""

    def __init__(self, sim_pid: int) -> None:
        self.pid = sim_pid
        self.wall = self.sim = self.helpers = self.children = self.client = 0.0

    async def measure(self, step: Callable[[], Awaitable[object]]) -> Phase:
        s0, h0, c0 = _cpu(self.pid)
        m0, t0 = _own_cpu(), time.perf_counter()
        await step()
        self.wall = time.perf_counter() - t0
        s1, h1, c1 = _cpu(self.pid)
        self.sim, self.helpers, self.children, self.client = s1 - s0, h1 - h0, c1 - c0, _own_cpu() - m0
        return self

    def line(self, n: int) -> str:
        return (
            f"simulator {_ms(self.sim + self.helpers, n):.2f} ms (spawners {_ms(self.helpers, n):.2f}) + commands "
            f"{_ms(self.children, n):.2f} ms CPU per command, client {_ms(self.client, n):.2f} ms"
        )


def _options(d: SimDevice, key: asyncssh.SSHKey) -> dict[str, object]:
    return {
        "username": d.username, "client_keys": [key], "agent_path": None,
        "known_hosts": ([asyncssh.import_public_key(d.host_key_public)], [], []),
    }  # fmt: skip


async def _cold(devices: list[SimDevice], key: asyncssh.SSHKey, concurrency: int) -> tuple[list[float], int]:
    """One connection + ``true`` per device, *concurrency* in flight: (latencies, failures)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failures = 0

    async def one(d: SimDevice) -> None:
        nonlocal failures
        async with gate:
            t0 = time.perf_counter()
            try:
                async with asyncssh.connect(d.host, d.port, **_options(d, key)) as conn:
                    await conn.run("true", check=True)
            except (OSError, asyncssh.Error):
                failures += 1
                return
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(d) for d in devices))
    return latencies, failures


async def _open_all(
    devices: list[SimDevice], key: asyncssh.SSHKey, concurrency: int
) -> list[asyncssh.SSHClientConnection]:
    gate = asyncio.Semaphore(concurrency)

    async def one(d: SimDevice) -> asyncssh.SSHClientConnection:
        async with gate:
            return await asyncssh.connect(d.host, d.port, **_options(d, key))

    return list(await asyncio.gather(*(one(d) for d in devices)))


async def _warm_sweep(conns: list[asyncssh.SSHClientConnection], command: str = "true") -> int:
    """*command* on every open connection at once; the number that failed."""
    results = await asyncio.gather(*(c.run(command) for c in conns), return_exceptions=True)
    return sum(1 for r in results if isinstance(r, BaseException) or r.exit_status != 0)


def _ms(seconds: float, n: int) -> float:
    return seconds / max(n, 1) * 1000


async def _bench(
    pid: int, devices: list[SimDevice], key: asyncssh.SSHKey, concurrency: int, warm_runs: int, command: str = "true"
) -> tuple[int, list[Figure]]:
    """The cold and warm phases: (commands that failed, the figures)."""
    n = len(devices)
    cold_result: list[tuple[list[float], int]] = []

    async def cold_step() -> None:
        cold_result.append(await _cold(devices, key, concurrency))

    cold = await Phase(pid).measure(cold_step)
    latencies, failures = cold_result[0]
    latencies.sort()
    print(f"COLD: connect + `true` on every device {cold.wall:8.2f} s  ({n / cold.wall:.0f} devices/s, "
          f"concurrency {concurrency}, {failures} failed)")  # fmt: skip
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"  per device p50 / p99             {statistics.median(latencies) * 1000:8.1f} / {p99 * 1000:.1f} ms")
    print(f"  {cold.line(n)}")

    conns = await _open_all(devices, key, concurrency)
    phases: list[Phase] = []
    try:
        await _warm_sweep(conns, command)  # once unmeasured: first-use costs (lazy imports, caches)
        for i in range(warm_runs):
            bad: list[int] = []

            async def warm_step() -> None:
                bad.append(await _warm_sweep(conns, command))  # noqa: B023 - awaited inside the iteration

            ph = await Phase(pid).measure(warm_step)
            phases.append(ph)
            failures += bad[0]
            print(f"  warm run {i + 1}: {ph.wall:5.2f} s wall, {ph.line(n)}, {bad[0]} failed")
    finally:
        for c in conns:
            c.close()
        await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)
    med = statistics.median
    wall = med(p.wall for p in phases)
    sim, helpers = med(p.sim + p.helpers for p in phases), med(p.helpers for p in phases)
    kids, client = med(p.children for p in phases), med(p.client for p in phases)
    what = "`true`" if command == "true" else "health check"
    print(f"WARM: {what} on all {n} open connections at once, median of {warm_runs}: {wall:.2f} s wall "
          f"({n / wall:.0f} commands/s)")  # fmt: skip
    print(f"  simulator CPU per command        {_ms(sim, n):8.2f} ms  (spawner processes {_ms(helpers, n):.2f} ms "
          f"of it) + {_ms(kids, n):.2f} ms in the commands = {_ms(sim + kids, n):.2f} ms")  # fmt: skip
    print(f"  client CPU per command           {_ms(client, n):8.2f} ms  (load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores)")  # fmt: skip
    return failures, [
        Figure(f"simulator: cold connect + `true`, {n} devices", "-", cold.wall, "s", True),
        Figure(f"simulator: warm {what} on {n} devices at once (median)", "-", wall, "s", True),
        Figure("simulator CPU per warm command (incl. the command)", "-", _ms(sim + kids, n), "ms", True),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--warm-runs", type=int, default=5)
    p.add_argument("--privileges", default="user", help="comma-separated levels to cycle")
    p.add_argument("--health-check", action="store_true", help="WARM: run evc.health's check, not `true`")
    args = p.parse_args()
    command = "true"
    if args.health_check:
        from evc.health import CHECK as command
    raise_fd_limit()

    root = Path(tempfile.mkdtemp(prefix="evc-bench-sim-"))
    root.chmod(0o711)  # the simulator's accounts must reach the device homes when run as root
    key = asyncssh.generate_private_key("ssh-ed25519")
    pub = root / "client.pub"
    pub.write_bytes(key.export_public_key())
    state = root / "devices.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "evc_sim", "--devices", str(args.devices), "--root", str(root / "sim"),
         "--state-file", str(state), "--authorized-keys", str(pub), "--privileges", args.privileges],
    )  # fmt: skip
    try:
        while not state.exists():
            if proc.poll() is not None:
                print("the simulator exited before it served its devices", file=sys.stderr)
                return 1
            time.sleep(0.02)
        started = time.perf_counter() - t0
        start_cpu = sum(_cpu(proc.pid))
        devices = read_state(state)
        n = len(devices)
        print(f"simulated devices in one process   {n}  (privileges {args.privileges})")
        print(f"start {n} devices                  {started:8.2f} s  (simulator CPU {start_cpu:.2f} s)")
        failures, figures = asyncio.run(_bench(proc.pid, devices, key, args.concurrency, args.warm_runs, command))
        rss, fds = _proc_status(proc.pid)
        print(f"simulator memory / descriptors     {rss:8.0f} MiB / {fds}")
        print()
        emit([Figure(f"simulator: start {n} devices", "-", started, "s", True), *figures])
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
