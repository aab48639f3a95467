"""Real CPU limits for simulated devices: one cgroup (v1 ``cpu`` controller) per device.

A device given ``cpus`` (0.25 = a quarter of one core, 2 = two cores) runs every command, and
every process those commands start (an edge server under its supervisor, an FL client), in
``/sys/fs/cgroup/cpu/evc-sim/<simulator pid>/<device>``, whose CFS quota is
``cpus * cpu.cfs_period_us``. The kernel throttles the group when it has used its quota in a
period: the device is really slower, nothing sleeps.

The simulator moves the device's own spawner process (:mod:`evc_sim.spawn`) into the group as
soon as it starts, before it is asked to start anything, so commands inherit the group at fork.
Needs the simulator to run as root on a machine with the cgroup v1 ``cpu`` controller mounted
(:func:`unavailable_reason` says why not otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
from pathlib import Path

from evc.errors import ConfigError

#: where the cgroup v1 cpu controller is mounted; the environment variable moves it (tests)
CPU_ROOT = Path(os.environ.get("EVC_SIM_CGROUP_CPU_ROOT", "/sys/fs/cgroup/cpu"))
PERIOD_US = 100_000
#: the smallest quota the kernel takes is 1 ms per period
MIN_CPUS = 0.01
MAX_CPUS = 1024.0
#: the largest CFS weight cgroup v1 takes (a plain process weighs 1024)
MAX_SHARES = 262144


def unavailable_reason() -> str | None:
    """None when per-device CPU quotas work here; otherwise why not, in words."""
    if os.geteuid() != 0:
        return "per-device CPU quotas need the simulator to run as root (cgroup v1 'cpu')"
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
        return f"per-device CPU quotas need the cgroup v1 'cpu' controller at {CPU_ROOT}"
    return None


def check_cpus(value: float | str) -> float:
    """*value* as a CPU count (``0.25``: a quarter of a core), or ConfigError."""
    try:
        cpus = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"cpus must be a number of CPUs (e.g. 0.5), not {value!r}") from None
    if not math.isfinite(cpus) or not MIN_CPUS <= cpus <= MAX_CPUS:
        raise ConfigError(f"cpus must be between {MIN_CPUS} and {MAX_CPUS:g}, not {value!r}")
    return cpus


def parse_cpus_list(text: str) -> list[float]:
    """``"0.25,0.5,1"`` → [0.25, 0.5, 1.0] (the CLI's ``--cpus``)."""
    return [check_cpus(part) for part in text.split(",") if part.strip()]


def group_of(device: str, owner_pid: int | None = None) -> Path:
    """The cgroup of simulated device *device* in the simulator process *owner_pid* (this one)."""
    return CPU_ROOT / "evc-sim" / str(owner_pid or os.getpid()) / device


def create(device: str, cpus: float) -> Path:
    """Make (or reuse) the device's cgroup with a quota of *cpus*; its path.

    The groups above it get the largest CFS weight: otherwise every simulated device together
    would weigh as much as one process of the machine, and on a busy machine their quotas would
    never be reached (a device would get less than its share, all devices alike).
    """
    reason = unavailable_reason()
    if reason:
        raise ConfigError(reason)
    path = group_of(device)
    path.mkdir(parents=True, exist_ok=True)
    for parent in (path.parent, path.parent.parent):
        (parent / "cpu.shares").write_text(f"{MAX_SHARES}\n")
    set_quota(path, cpus)
    return path


def set_quota(path: Path, cpus: float) -> None:
    """Give the cgroup at *path* a quota of *cpus* CPUs (and a weight in proportion, so devices
    under one simulator share in the ratio of their quotas when the machine is short)."""
    cpus = check_cpus(cpus)
    (path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
    (path / "cpu.cfs_quota_us").write_text(f"{max(1000, round(cpus * PERIOD_US))}\n")
    (path / "cpu.shares").write_text(f"{min(MAX_SHARES, max(2, round(cpus * 1024)))}\n")


def add_pid(path: Path, pid: int) -> None:
    """Move process *pid* (all its threads) into the cgroup at *path*."""
    (path / "cgroup.procs").write_text(f"{pid}\n")


def pids(path: Path) -> list[int]:
    """The processes in the cgroup at *path* (none when it is gone)."""
    try:
        text = (path / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def remove(path: Path) -> None:
    """Move what is left in the cgroup to the root group and remove it (and the simulator's
    folder above it when that is empty). Never raises for a group that is gone."""
    for _ in range(50):  # a spawner that is exiting may still be listed for a moment
        for pid in pids(path):
            with contextlib.suppress(OSError):
                add_pid(CPU_ROOT, pid)
        try:
            path.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.02)
    with contextlib.suppress(OSError):  # the simulator's folder, once its last device is gone
        path.parent.rmdir()
