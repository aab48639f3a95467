"""Pure parts of re-convergence, levels, rollouts' failure budget and the deploy CLI (no services)."""

from __future__ import annotations

import click
import pytest

from evc.cli.deployments import parse_pairs
from evc.deployments import converge, events, prereq, servers, switch
from evc.deployments.rollout import allowed_failures
from evc.errors import ValidationError


def test_overall_state_from_the_devices() -> None:
    run, back, lost = {"state": "running"}, {"state": "rolled-back"}, {"state": "unreachable"}
    assert converge.overall({"a": run, "b": back}, ["a", "b"]) == "running"
    assert converge.overall({"a": run, "b": lost}, ["a", "b"]) == "partial"
    assert converge.overall({"a": lost}, ["a"]) == "failed"
    assert converge.overall({"a": run, "x": lost}, ["a"]) == "running"  # a device that left does not count
    assert converge.overall({}, []) == "running"  # a cluster with no members yet


def test_required_level_per_runtime() -> None:
    assert prereq.required_level("process", python_given=False) == 1
    assert prereq.required_level("process", python_given=True) == 0
    assert prereq.required_level("container", python_given=True) == 3
    devs: list[dict[str, object]] = [{"id": "a", "level": 0}, {"id": "b", "level": 2}, {"id": "c"}]
    assert [d["id"] for d in prereq.below(devs, 1)] == ["a", "c"]
    podman = {"id": "p", "level": 0, "facts": {"podman": True}}
    assert prereq.below([podman], 3, "container") == [] and prereq.below([podman], 1, "process") == [podman]


@pytest.mark.parametrize(
    "budget, devices, allowed",
    [(None, 10, None), (0, 10, 0), (0.0, 10, 0), (2, 10, 2), (0.25, 10, 2), (0.5, 3, 1), (0.1, 5, 0), (1.0, 4, 1)],
)
def test_failure_budget(budget: float | None, devices: int, allowed: int | None) -> None:
    assert allowed_failures(budget, devices) == allowed


@pytest.mark.parametrize("bad", [-1, 1.5, 2.25])
def test_failure_budget_refuses_nonsense(bad: float) -> None:
    with pytest.raises(ValidationError):
        allowed_failures(bad, 10)


def test_unreachable_is_a_device_event() -> None:
    dep = {"id": "dep_1", "model": "m", "served_version": "1", "state": "running"}
    before = {"d1": {"state": "running", "version": "1", "updated_at": 1.0}}
    after = {"d1": {"state": "unreachable", "reason": "device offline: 3 misses", "version": "1", "updated_at": 2.0}}
    (ev,) = events.changes("deploy", (dep, before), ({**dep, "state": "partial"}, after), {"d1": "sim-1"}, at=3.0)
    assert (ev["event"], ev["state"], ev["name"], ev["deployment_state"]) == (
        "deployment.device", "unreachable", "sim-1", "partial",
    )  # fmt: skip
    assert "sim-1: unreachable (device offline: 3 misses)" in events.webhook_body([ev])["text"]


def test_ports_and_labels_parse() -> None:
    assert parse_pairs(("a=1,b=2", "c=3"), "K=V") == [("a", "1"), ("b", "2"), ("c", "3")]
    assert parse_pairs(("role = cam ,",), "K=V") == [("role", "cam")]
    for bad in ("a", "=1", "a="):
        with pytest.raises(click.BadParameter):
            parse_pairs((bad,), "K=V")


def test_live_gate_waits_for_the_version_itself() -> None:
    assert 'call("/v2/models/%s/versions/%s/ready" % (name, version))' in switch.LIVE_GATE
    assert 'call("/v2/health/ready")' not in switch.LIVE_GATE
    compile(switch.LIVE_GATE, "gate", "exec")
    compile(switch.ONLY, "only", "exec")


def test_the_server_probe_reads_listening_ports() -> None:
    cmd = servers.probe_command([8600, 80, 8600])
    assert cmd.count("grep") == 2 and ":2198 " in cmd and ":0050 " in cmd
    assert servers.parse_probe("up 80\ndown 8600\ngarbage\ndown x\n") == {8600}
    assert servers.probe_command([]) == "true"


def test_the_boot_units_of_a_process_deployment() -> None:
    from evc.deployments import boot

    cmd = boot.process_command("dep_1a", ".evc/deploy/dep_1a")
    assert (
        "unit=evc-infer-dep_1a.service" in cmd and "ExecStart=/bin/sh %h/.evc/deploy/dep_1a/supervise.sh start" in cmd
    )
    # the device's systemd tool, with --user or not ($sc), in the generated script (never run here)
    assert '$sc enable "$unit"' in cmd and "enable-linger" in cmd
    assert "$sc disable evc-infer-dep_1a.service" in boot.remove_unit_command("dep_1a")
    for bad in ("a b", "x;rm", "$(id)"):
        with pytest.raises(ValueError):
            boot.unit_name(bad)
    with pytest.raises(ValueError):
        boot.process_command("dep_1a", ".evc/deploy/$(id)")
