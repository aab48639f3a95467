"""The `evc` command as a package: `python -m evc.cli` is the same command as the console script."""

from __future__ import annotations

import subprocess
import sys

import click

from evc.cli import main


def _tree(group: click.Group) -> set[str]:
    out: set[str] = set()
    for name in group.list_commands(click.Context(group)):
        cmd = group.get_command(click.Context(group), name)
        out.add(name)
        if isinstance(cmd, click.Group):
            out |= {f"{name} {sub}" for sub in _tree(cmd)}
    return out


def test_every_command_group_is_registered() -> None:
    tree = _tree(main)
    for name in ("up", "bootstrap", "flower", "sim", "ssh-key", "provision", "events", "health", "audit"):
        assert name in tree
    for name in ("device import", "device retry", "cluster vars", "token enrollments", "fl partition", "job retry"):
        assert name in tree


def test_python_dash_m_runs_the_whole_command() -> None:
    """Commands registered from other modules (device import, ...) are there under -m too."""
    out = subprocess.run(
        [sys.executable, "-m", "evc.cli", "device", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "import" in out and "retry" in out and "add" in out
