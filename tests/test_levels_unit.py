"""The level job with a fake step runner and an in-memory store: which playbooks run on which
devices, in what order, and what each device's level and reason end up as (no Redis, no SSH)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evc import profiles
from evc.errors import LevelNotReached
from evc.jobs import JobRun, Partial, new_job
from evc.levels import level_info, level_verdict, raise_level
from evc.settings import load_settings
from tests.fixtures.fakes import FakeStore, online_device

JSON = dict[str, Any]


class FakeRunner:
    """Records each step; a device fails a playbook as *fail* says, or reports a change as
    *changed* says ((playbook, device) pairs)."""

    def __init__(self, fail: dict[tuple[str, str], str] | None = None, changed: set[tuple[str, str]] = frozenset()):  # type: ignore[assignment]
        self.fail = fail or {}
        self.changed = set(changed)
        self.calls: list[tuple[str, tuple[str, ...], bool]] = []

    def __call__(self, run: JobRun, playbook: str, ids: list[str], vars_: JSON, check: bool) -> dict[str, JSON]:
        self.calls.append((playbook, tuple(ids), check))
        out: dict[str, JSON] = {}
        for d in ids:
            status = self.fail.get((playbook, d), "ok")
            out[d] = {"status": status, "changed": (playbook, d) in self.changed}
            if status != "ok":
                out[d]["message"] = "boom"
        return out


def level_job(tmp_path: Path, devices: list[JSON], target: int, profile: str = "direct", **params: Any):
    store = FakeStore(devices, [{"id": "cl_1", "profile": profile, "target_level": target, "vars": {}}])
    job = new_job(
        "level", targets=[d["id"] for d in devices], params={"cluster_id": "cl_1", "target": target, **params}
    )
    job["state"] = "running"
    store.put_job(job)
    settings = load_settings(env={}, data_dir=tmp_path)
    return store, settings, JobRun(store, store.get_job(job["id"]))  # type: ignore[arg-type]


def test_steps_run_in_level_order_and_every_device_reaches_the_target(tmp_path: Path) -> None:
    store, settings, run = level_job(tmp_path, [online_device("d1"), online_device("d2")], target=2)
    runner = FakeRunner()
    summary = raise_level(store, settings, run, runner)
    assert runner.calls == [("devenv", ("d1", "d2"), False), ("exporter", ("d1", "d2"), False)]
    assert isinstance(summary, dict) and summary["reached"] == 2 and summary["stopped"] == {}
    assert store.devices["d1"]["level"] == 2 and store.devices["d1"]["level_detail"] == {"level": 2}
    results = store.results(run.id)
    assert results["d2"] == {"level": 2, "level_name": profiles.LEVELS[2]}
    assert run.job["progress"]["done"] == 2


def test_a_failed_step_stops_the_device_below_that_level(tmp_path: Path) -> None:
    store, settings, run = level_job(tmp_path, [online_device("d1"), online_device("d2")], target=4)
    runner = FakeRunner(fail={("exporter", "d2"): "failed"})
    out = raise_level(store, settings, run, runner)
    assert isinstance(out, Partial) and "1 of 2 devices did not reach L4" in out.message
    # d2 takes no further step once it failed
    assert [c for c in runner.calls if c[0] == "fl-client"] == [("fl-client", ("d1",), False)]
    assert store.devices["d2"]["level"] == 1
    assert store.results(run.id)["d2"]["stopped"] == f"L2 {profiles.LEVELS[2]}: exporter failed: boom"


def test_no_device_reaching_the_target_fails_the_job(tmp_path: Path) -> None:
    store, settings, run = level_job(tmp_path, [online_device("d1")], target=1)
    with pytest.raises(LevelNotReached) as exc:
        raise_level(store, settings, run, FakeRunner(fail={("devenv", "d1"): "unreachable"}))
    assert exc.value.details["stopped"] == {"d1": f"L1 {profiles.LEVELS[1]}: devenv unreachable: boom"}


def test_offline_devices_take_no_new_work(tmp_path: Path) -> None:
    devices = [online_device("d1"), online_device("d2", state="offline", level=1)]
    store, settings, run = level_job(tmp_path, devices, target=1)
    runner = FakeRunner()
    out = raise_level(store, settings, run, runner)
    assert runner.calls == [("devenv", ("d1",), False)]
    assert isinstance(out, Partial)
    assert store.results(run.id)["d2"]["stopped"] == "device is offline: no new work"
    assert store.devices["d2"]["level"] == 1  # untouched


def test_check_mode_reports_what_would_change_and_records_nothing(tmp_path: Path) -> None:
    store, settings, run = level_job(tmp_path, [online_device("d1", level=0)], target=2, check=True)
    runner = FakeRunner(changed={("exporter", "d1")})
    summary = raise_level(store, settings, run, runner)
    assert all(check for _, _, check in runner.calls)
    assert isinstance(summary, dict) and summary["check"] is True
    assert store.results(run.id)["d1"]["would_change"] == ["exporter"]
    assert store.results(run.id)["d1"]["level"] == 0
    assert store.device_updates == []


def test_converge_rechecks_every_step_and_reapplies_only_drift(tmp_path: Path) -> None:
    store, settings, run = level_job(
        tmp_path, [online_device("d1", level=2), online_device("d2", level=2)], 2, converge=True
    )
    runner = FakeRunner(changed={("exporter", "d2")})
    raise_level(store, settings, run, runner)
    assert runner.calls == [
        ("devenv", ("d1", "d2"), True),
        ("exporter", ("d1", "d2"), True),
        ("exporter", ("d2",), False),  # only the drifted device, applied
    ]
    res = store.results(run.id)
    assert res["d2"]["reapplied"] == ["exporter"] and "reapplied" not in res["d1"]
    assert store.devices["d2"]["level_detail"] == {"level": 2}  # the record keeps no "reapplied"


def test_level_info_keeps_a_higher_level_unless_converging() -> None:
    info, recorded = level_info(2, 3, None, [], check=False, converge=False)
    assert info == {"level": 3} and recorded == {"level": 2}
    info, recorded = level_info(2, 3, None, [], check=False, converge=True)
    assert info == {"level": 2} and recorded == {"level": 2}
    info, recorded = level_info(4, 1, (3, "k3s-agent failed"), ["exporter"], check=False, converge=False)
    assert info == {"level": 2, "stopped": f"L3 {profiles.LEVELS[3]}: k3s-agent failed", "reapplied": ["exporter"]}
    assert recorded == {"level": 2, "stopped": f"L3 {profiles.LEVELS[3]}: k3s-agent failed"}
    info, recorded = level_info(4, 1, (2, "x"), ["devenv"], check=True, converge=False)
    assert info == {"level": 1, "would_change": ["devenv"], "stopped": f"L2 {profiles.LEVELS[2]}: x"}
    assert recorded is None


def test_level_verdict() -> None:
    assert level_verdict("c", 2, False, False, {"a": {"level": 2}})["reached"] == 1  # type: ignore[index]
    short: dict[str, JSON] = {"a": {"level": 2}, "b": {"level": 1, "stopped": "why"}}
    out = level_verdict("c", 2, False, False, short)
    assert isinstance(out, Partial) and out.message == "1 of 2 devices did not reach L2: b: why"
    assert isinstance(level_verdict("c", 2, True, False, short), dict)  # check mode never fails
    many = {f"d{i}": {"level": 0, "stopped": "x"} for i in range(7)}
    with pytest.raises(LevelNotReached, match=r"no device reached L2: d0: x; .* \.\.\.$"):
        level_verdict("c", 2, False, False, many)
