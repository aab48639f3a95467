"""Benchmark: a health sweep over 1,000 simulated devices (the simulator in its own process),
cold (connections opened) and warm (pooled), against `ansible all -m ping` on a subset.

    .venv/bin/python bench/health_sweep.py [--devices 1000] [--ansible-devices 100] [--forks 50]

Targets (issue 4, 2-core machine): warm sweep <= 2.5 s wall time for 1,000 devices including
recording the results (a bare asyncssh sweep of the same kind takes about 2.26 s there); per
device, >= 50x cheaper than `ansible all -m ping` over the same devices. The cold sweep is
printed too. Sweeps go through `evc.health.sweep` exactly as the beat task runs it: read the
registry, one command per device over the pool, the state machine, one pipelined write.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncssh
from _common import Figure, emit, private_stack, registered

from evc import health, keys
from evc import pool as pooling
from evc.settings import Settings
from evc.store import Store
from evc_sim import SimDevice, raise_fd_limit, read_state

BARE_SWEEP_S = 2.26  # the bare asyncssh sweep of 1,000 devices on the 2-core machine


def start_simulator(root: Path, n: int, pub: Path) -> tuple[subprocess.Popen[bytes], list[SimDevice]]:
    """`python -m evc_sim` in its own process; wait for its state file."""
    state = root / "devices.json"
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "sim.log", "wb")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "evc_sim", "--devices", str(n), "--root", str(root),
         "--state-file", str(state), "--authorized-keys", str(pub), "--prefix", "bench"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not state.exists():
        if proc.poll() is not None:
            raise SystemExit(f"the simulator exited: {(root / 'sim.log').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the simulator did not start within 10 minutes")
        time.sleep(0.2)
    return proc, read_state(state)


def register(store: Store, devices: list[SimDevice]) -> list[str]:
    """Device records as a successful registration leaves them (pinned host keys)."""
    return registered(store, devices, "dev_")


def timed_sweep(store: Store, settings: Settings) -> tuple[float, health.SweepResult]:
    t = time.perf_counter()
    res = health.sweep(store, settings)
    return time.perf_counter() - t, res


class BareSweep:
    """The reference: plain asyncssh, one connection per device, the same command, no store."""

    def __init__(self, devices: list[SimDevice], key: Path) -> None:
        self.devices, self.key = devices, key
        self.conns: list[asyncssh.SSHClientConnection] = []

    async def _open(self) -> None:
        self.conns = await asyncio.gather(
            *(
                asyncssh.connect(
                    d.host, d.port, username=d.username, client_keys=[str(self.key)], agent_path=None,
                    known_hosts=([asyncssh.import_public_key(d.host_key_public)], [], []),
                )
                for d in self.devices
            )
        )  # fmt: skip

    async def _sweep(self) -> None:
        await asyncio.gather(*(c.run(health.CHECK, check=True) for c in self.conns))

    def open(self) -> None:
        pooling.call(self._open())

    def sweep(self) -> float:
        t = time.perf_counter()
        pooling.call(self._sweep())
        return time.perf_counter() - t

    def close(self) -> None:
        for c in self.conns:
            c.close()


def own_cpu_seconds() -> float:
    """User + system CPU of this process, every thread (the pool's loop thread included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children (Linux /proc)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


def ansible_ping(tmp: Path, devices: list[SimDevice], key: Path, forks: int) -> float:
    """Wall time of `ansible all -m ping` over *devices* (host keys checked, no fact gathering)."""
    known = tmp / "known_hosts"
    known.write_text("".join(f"[{d.host}]:{d.port} {d.host_key_public}\n" for d in devices))
    inv = tmp / "inventory.ini"
    ssh_args = f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes"
    lines = ["[all]"] + [
        f"{d.name} ansible_host={d.host} ansible_port={d.port} ansible_user={d.username}" for d in devices
    ]
    lines += [
        "[all:vars]",
        f"ansible_ssh_private_key_file={key}",
        f"ansible_ssh_common_args='{ssh_args}'",
        "ansible_python_interpreter=/usr/bin/python3",
    ]
    inv.write_text("\n".join(lines) + "\n")
    ansible = shutil.which("ansible", path=str(Path(sys.executable).parent)) or "ansible"
    env = {
        **os.environ,
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp / "cp"),
        "ANSIBLE_NOCOLOR": "1",
    }
    t = time.perf_counter()
    out = subprocess.run(
        [ansible, "all", "-i", str(inv), "-m", "ping", "-f", str(forks), "-o"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - t
    ok = out.stdout.count("SUCCESS")
    if ok != len(devices):
        print(out.stdout[-3000:], out.stderr[-3000:], sep="\n")
        raise SystemExit(f"ansible ping: {ok} of {len(devices)} devices answered")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--ansible-devices", type=int, default=100)
    p.add_argument("--forks", type=int, default=50)
    p.add_argument("--warm-runs", type=int, default=5)
    args = p.parse_args()
    raise_fd_limit()

    tmp = Path(tempfile.mkdtemp(prefix="evc-bench-health-"))
    tmp.chmod(0o755)  # the simulator's accounts must reach their homes when run as root
    srv, base = private_stack(tmp)
    settings = base.replace(health_timeout_s=30.0, ssh_connect_timeout_s=30.0, health_load_per_cpu_threshold=10_000.0)
    sim = None
    try:
        key = keys.ensure_keypair(settings)
        store = Store.from_settings(settings)
        print(f"starting {args.devices} simulated devices in their own process…", flush=True)
        t = time.perf_counter()
        sim, devices = start_simulator(tmp / "sim", args.devices, key.with_suffix(".pub"))
        print(f"  up in {time.perf_counter() - t:.1f} s", flush=True)
        register(store, devices)

        cold, res = timed_sweep(store, settings)
        bad = res.failures
        print(f"cold sweep: {cold:.2f} s, {len(res.results)} ok, {len(bad)} failed", flush=True)
        if bad:
            print("  e.g.", next(iter(bad.values())))
        bare = BareSweep(devices, key)
        bare.open()
        warm_times, bare_times, sim_cpu, warm_cpu, bare_cpu = [], [], [], [], []
        for _ in range(args.warm_runs):  # interleaved, so both see the same machine load
            c0, m0 = cpu_seconds(sim.pid), own_cpu_seconds()
            w, res = timed_sweep(store, settings)
            sim_cpu.append(cpu_seconds(sim.pid) - c0)
            warm_cpu.append(own_cpu_seconds() - m0)
            if res.failures or len(res.results) != args.devices:
                raise SystemExit(f"warm sweep: {len(res.failures)} failed: {list(res.failures.values())[:3]}")
            warm_times.append(w)
            m0 = own_cpu_seconds()
            bare_times.append(bare.sweep())
            bare_cpu.append(own_cpu_seconds() - m0)
        bare.close()
        stats = pooling.pool_for(settings).stats()
        print(f"warm sweeps: {', '.join(f'{w:.2f}' for w in warm_times)} s; pool {stats}", flush=True)
        print(f"bare asyncssh sweeps: {', '.join(f'{w:.2f}' for w in bare_times)} s", flush=True)
        print(
            f"simulator CPU per warm sweep: {statistics.median(sim_cpu):.2f} s "
            f"({statistics.median(sim_cpu) / args.devices * 1000:.1f} ms per command, on {os.cpu_count()} cores; "
            f"load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        print(
            f"control-plane CPU per warm sweep: {statistics.median(warm_cpu):.2f} s "
            f"(bare asyncssh: {statistics.median(bare_cpu):.2f} s) — the wall time of a sweep over real "
            "devices, whose commands run on their own CPUs",
            flush=True,
        )
        warm, bare_s = statistics.median(warm_times), statistics.median(bare_times)
        warm_1k = warm * 1000 / args.devices

        k = min(args.ansible_devices, args.devices)
        print(f"ansible all -m ping over {k} devices, forks={args.forks}…", flush=True)
        ans = ansible_ping(tmp, devices[:k], key, args.forks)
        per_ansible, per_warm = ans / k, warm / args.devices
        ratio = per_ansible / per_warm
        print(f"  {ans:.2f} s: {per_ansible * 1000:.1f} ms per device; warm sweep "
              f"{per_warm * 1000:.2f} ms per device", flush=True)  # fmt: skip
        print()
        emit(
            [
                Figure(f"warm sweep per 1,000 devices ({args.devices} swept, median of {len(warm_times)})",
                       "<= 2.5 s", warm_1k, "s", warm_1k <= 2.5, warm_1k / BARE_SWEEP_S),
                Figure("per-device cost: ansible ping / warm sweep", ">= 50x", ratio, "x",
                       ratio >= 50, ratio / 50),
                Figure(f"cold sweep, {args.devices} devices (connections opened)", "-",
                       cold, "s", True),
                Figure("warm sweep / bare asyncssh sweep here (EVC's overhead)", "-",
                       warm / bare_s, "x", True),
            ]
        )  # fmt: skip
        print(f"(ratio column of the warm sweep: against the issue's bare asyncssh sweep, {BARE_SWEEP_S} s; "
              f"the bare sweep on this machine now: {bare_s:.2f} s)")  # fmt: skip
    finally:
        pooling.shutdown()
        if sim is not None and sim.poll() is None:
            sim.terminate()
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                sim.kill()
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
