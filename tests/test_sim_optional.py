"""The simulator is a distribution of its own (sim/, evc-sim): without it, `evc sim` and
`evc up --sim N` say how to install it and fail, before anything starts. Fast, no services."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from evc import simulator
from evc.cli import main
from evc.errors import ConfigError
from evc.settings import load_settings
from evc.stack import Stack


@pytest.fixture
def no_simulator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """evc_sim not importable (as where evc-sim is not installed), a fresh data directory."""
    monkeypatch.setitem(sys.modules, "evc_sim", None)
    monkeypatch.setenv("EVC_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_the_simulator_is_installed_for_the_tests() -> None:
    assert simulator.installed()
    import evc_sim

    assert Path(evc_sim.__file__).parent.parent.name == "sim"


@pytest.mark.parametrize("args", [["sim", "--devices", "1"], ["up", "--sim", "2"]])
def test_cli_says_how_to_install_the_simulator(no_simulator: Path, args: list[str]) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "the simulator is not installed: pip install ./sim (scripts/up does it)" in res.output
    assert not (no_simulator / "stack.json").exists()  # nothing was started


def test_stack_refuses_to_start_the_simulator(no_simulator: Path) -> None:
    stack = Stack(load_settings(), sim_devices=1)
    with pytest.raises(ConfigError, match="the simulator is not installed"):
        stack._start_sim({})
    assert not stack.children


def test_the_simulated_fleet_stages_system_paths(tmp_path: Path) -> None:
    """`evc up --sim` gives its workers a device_sysroot every simulated account can write
    (sticky), so the playbooks' system paths (/etc/containers, units) never reach this machine's."""
    from evc.stack import sim_sysroot

    old = os.umask(0o077)  # evc up's
    try:
        root = sim_sysroot(tmp_path / "data")
    finally:
        os.umask(old)
    assert root.is_dir() and root.stat().st_mode & 0o7777 == 0o1777
    if os.geteuid() == 0:  # every simulated account reaches its device's folder
        assert root.parent.stat().st_mode & 0o7777 == 0o755
    assert sim_sysroot(tmp_path / "data") == root and sim_sysroot(tmp_path / "other") != root
    stack = Stack(load_settings(data_dir=tmp_path / "data", redis_url="redis://127.0.0.1:1/0"), sim_devices=1)
    try:
        stack._configure()  # no Redis is started: one is configured
        assert stack.settings.device_sysroot == str(root)
    finally:
        if os.geteuid() == 0:
            shutil.rmtree(root, ignore_errors=True)
