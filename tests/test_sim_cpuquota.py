"""Real per-device CPU limits in the simulator (cgroup v1 CFS quotas, evc_sim.cpuquota)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from evc.errors import ConfigError
from evc_sim import SimDevice, SimulatorThread, cpuquota
from evc_sim.accounts import available_privileges
from tests.fixtures.sim import MakeDevices, connect

# a second of wall time busy in a child of the shell: prints the CPU seconds it got and its cgroup
BUSY = (
    "python3 -c '"
    "import time\n"
    "t = time.time()\n"
    "while time.time() - t < 1.0: pass\n"
    'print(time.process_time()); print(open("/proc/self/cgroup").read())'
    "'; true"
)


def _run(dev: SimDevice, key: Path, command: str) -> str:
    async def go() -> str:
        async with await connect(dev, key) as conn:
            res = await conn.run(command, check=True, timeout=30)
            return str(res.stdout)

    return asyncio.run(go())


def _cpu_line(cgroups: str) -> str:
    """The cgroup path of the cpu controller in a /proc/PID/cgroup text."""
    for line in cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "cpu" in parts[1].split(","):
            return parts[2]
    raise AssertionError(f"no cpu controller in {cgroups!r}")


@pytest.fixture(autouse=True)
def _quotas_work() -> None:
    reason = cpuquota.unavailable_reason()
    if reason:
        pytest.skip(reason)


def test_commands_and_their_children_run_under_the_devices_quota(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    slow, fast = sim_devices(2, cpus=(0.2, 1.0))
    assert (slow.cpus, fast.cpus) == (0.2, 1.0)
    out = _run(slow, evc_key_path, BUSY)
    used = float(out.splitlines()[0])
    assert used <= 0.32, f"a 0.2-CPU device got {used:.2f} CPU s in 1 s"
    assert _cpu_line(out).startswith("/evc-sim/") and _cpu_line(out).endswith(f"/{slow.name}")
    group = cpuquota.group_of(slow.name)
    assert (group / "cpu.cfs_quota_us").read_text().strip() == "20000"
    assert (group / "cpu.shares").read_text().strip() == str(round(0.2 * 1024))
    for parent in (group.parent, group.parent.parent):  # the fleet is not one process's share
        assert (parent / "cpu.shares").read_text().strip() == str(cpuquota.MAX_SHARES)
    out_fast = _run(fast, evc_key_path, BUSY)
    assert float(out_fast.splitlines()[0]) > used
    assert _cpu_line(out_fast).endswith(f"/{fast.name}")


def test_the_limit_changes_at_once_and_goes_with_the_device(simulator: SimulatorThread, evc_key_path: Path) -> None:
    dev = simulator.add("cq-change", cpus=0.5)
    group = cpuquota.group_of(dev.name)
    try:
        simulator.set_cpus(dev.name, 0.1)
        assert (group / "cpu.cfs_quota_us").read_text().strip() == "10000"
        used = float(_run(dev, evc_key_path, BUSY).splitlines()[0])
        assert used <= 0.2
    finally:
        simulator.remove(dev.name)
    assert not group.exists()


@pytest.mark.skipif("root" not in available_privileges(), reason="root devices need the simulator as root")
def test_a_root_device_in_its_namespaces_is_limited_too(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    (dev,) = sim_devices(1, privilege="root", cpus=(0.2,))
    out = _run(dev, evc_key_path, BUSY)
    assert float(out.splitlines()[0]) <= 0.32


def test_a_device_without_a_limit_is_not_in_a_group(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    (dev,) = sim_devices(1)
    assert dev.cpus is None
    assert "evc-sim" not in _cpu_line(_run(dev, evc_key_path, BUSY))


def test_bad_limits_are_refused(simulator: SimulatorThread) -> None:
    for bad in ("0", "-1", "x", "nan", "1e9"):
        with pytest.raises(ConfigError):
            cpuquota.check_cpus(bad)
    assert cpuquota.parse_cpus_list("0.25, 0.5,1") == [0.25, 0.5, 1.0]
    with pytest.raises(ConfigError):
        simulator.add("cq-bad", cpus=0)
    dev = simulator.add("cq-nolimit")
    try:
        with pytest.raises(ConfigError, match="no CPU limit"):
            simulator.set_cpus(dev.name, 0.5)
    finally:
        simulator.remove(dev.name)
