"""Profiles and function levels: plans per profile and level, gating with reasons (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evc import profiles
from evc.errors import PreconditionFailed, ValidationError


def dev(i: str, priv: str = "root", level: int = 0, mem_mb: int = 4096, cpus: int = 4) -> dict:
    return {
        "id": i,
        "name": i,
        "privilege": priv,
        "level": level,
        "facts": {"memory_bytes": mem_mb * 1024 * 1024, "cpus": cpus, "arch": "aarch64"},
    }


def names(steps):
    return [(s.level, s.playbook, s.devices) for s in steps]


def test_four_profiles_are_defined_as_data() -> None:
    assert set(profiles.profiles()) == {"direct", "container", "k3s", "k8s"}
    for p in profiles.profiles().values():
        d = p.to_dict()
        assert d["description"] and set(d["levels"]) == {"1", "2", "3", "4"}
        assert d["levels"]["4"]["steps"][-1]["playbook"] == "fl-client"


@pytest.mark.parametrize(
    "profile,target,expected",
    [
        ("direct", 1, [(1, "devenv")]),
        ("direct", 4, [(1, "devenv"), (2, "exporter"), (4, "fl-client")]),
        ("container", 3, [(1, "devenv"), (1, "container-runtime"), (2, "exporter"), (3, "container-runtime")]),
        ("k8s", 3, [(1, "devenv"), (2, "exporter"), (3, "container-runtime"), (3, "k8s-node")]),
    ],
)
def test_plans_per_profile_and_level(profile, target, expected) -> None:
    steps, blocked = profiles.plan(profiles.get(profile), [dev("a"), dev("b")], target)
    assert not blocked
    assert [(s.level, s.playbook) for s in steps] == expected
    assert all(s.devices == ("a", "b") for s in steps)


def test_k3s_server_and_agents() -> None:
    steps, _ = profiles.plan(profiles.get("k3s"), [dev("s"), dev("a1"), dev("a2")], 3, server_id="s")
    l3 = [(s.playbook, s.devices) for s in steps if s.level == 3]
    assert l3 == [("k3s-server", ("s",)), ("k3s-agent", ("a1", "a2"))]


def test_devices_already_at_a_level_skip_its_steps() -> None:
    steps, _ = profiles.plan(profiles.get("direct"), [dev("a", level=2), dev("b")], 2)
    assert names(steps) == [(1, "devenv", ("b",)), (2, "exporter", ("b",))]


def test_requirements_block_with_reasons() -> None:
    steps, blocked = profiles.plan(
        profiles.get("k8s"), [dev("ok"), dev("low", priv="user"), dev("small", mem_mb=512, cpus=1)], 1
    )
    assert names(steps) == [(1, "devenv", ("ok",))]
    assert "privilege is 'user'" in blocked["low"] and "'sudo'" in blocked["low"]
    assert "512 MiB" in blocked["small"] and "1 CPU" in blocked["small"]
    # the direct profile takes any account
    _, blocked = profiles.plan(profiles.get("direct"), [dev("low", priv="user")], 4)
    assert not blocked


def test_operation_gating_names_devices_and_level() -> None:
    profiles.require_level("provision", [dev("a")])
    with pytest.raises(PreconditionFailed) as e:
        profiles.require_level("fl", [dev("a", level=4), dev("b", level=2)])
    assert "L4" in e.value.message and "b (L2)" in e.value.message and "a (L4)" not in e.value.message


def test_bad_profile_and_target() -> None:
    with pytest.raises(ValidationError):
        profiles.get("swarm")
    with pytest.raises(ValidationError):
        profiles.plan(profiles.get("direct"), [], 5)


def test_l1_python_feeds_the_exporter_and_the_fl_client(tmp_path: Path) -> None:
    """Issue 11.2: L1's devenv makes a Python with numpy and prometheus_client; L2 (host) and
    L4 use it unless the cluster says otherwise; FL jobs use it from L1 on."""
    from evc.levels import cluster_vars, fl_python
    from evc.settings import load_settings

    settings = load_settings(env={}, data_dir=tmp_path)

    (step,) = [s for s in profiles.get("direct").steps(1) if s.playbook == "devenv"]
    assert {"numpy", "prometheus-client"} <= set(step.vars["packages"]) and step.vars["system_site_packages"]
    cl = {"id": "cl_x", "profile": "direct", "target_level": 0, "vars": {}}
    assert cluster_vars(None, settings, cl, "exporter", {})["python"] == "~/evc/venv/bin/python"  # type: ignore[arg-type]
    assert cluster_vars(None, settings, cl, "fl-client", {})["python"] == "~/evc/venv/bin/python"  # type: ignore[arg-type]
    assert "python" not in cluster_vars(None, settings, cl, "exporter", {"mode": "container"})  # type: ignore[arg-type]
    assert fl_python(cl) == "python3" and fl_python({**cl, "target_level": 2}) == "~/evc/venv/bin/python"
    own = {**cl, "target_level": 4, "vars": {"devenv": {"venv": "envs/a"}, "fl-client": {"python": "/opt/py"}}}
    assert cluster_vars(None, settings, own, "exporter", {})["python"] == "~/envs/a/bin/python"  # type: ignore[arg-type]
    assert fl_python(own) == "/opt/py"
