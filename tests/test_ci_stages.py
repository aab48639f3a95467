"""scripts/test (what .ci/run runs) in stages: lint, unit tests, integration tests, stopping at the
first stage that fails with its exit status; with arguments, pytest alone. Run in a copy of the
scripts with stand-in ruff, mypy and pytest that record their calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/bin/sh
echo "{name} $*" >> "$CALLS"
[ "{name} $*" = "$FAIL_ON" ] && exit "$FAIL_RC"
exit 0
"""


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A checkout with only what the scripts read, and a venv of stand-ins."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    for pkg in ("evc", "api", "tasks", "workers", "sim/evc_sim", "tests", "bench"):
        (repo / pkg).mkdir(parents=True)
    shutil.copy(ROOT / "sim" / "pyproject.toml", repo / "sim" / "pyproject.toml")
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "ruff", "mypy", "pytest"):
        (bin_dir / name).write_text(STUB.format(name=name))
        (bin_dir / name).chmod(0o755)
    stamp = repo / ".venv" / ".evc-installed-test"
    stamp.touch()
    os.utime(stamp, (2**31, 2**31))  # newer than pyproject.toml: bootstrap installs nothing
    # bootstrap finds the OS programs it checks for: it installs nothing either
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("sshd", "ssh", "prometheus", "chromium", "chromedriver"):
        (tools / name).write_text("#!/bin/sh\nexit 0\n")
        (tools / name).chmod(0o755)
    return repo


def run_test(repo: Path, *args: str, fail_on: str = "never-matches", rc: int = 1) -> tuple[int, list[str], str]:
    calls = repo.parent / "calls"
    calls.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PATH": f"{repo.parent / 'tools'}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "FAIL_ON": fail_on,
        "FAIL_RC": str(rc),
    }
    env.pop("VENV", None)
    res = subprocess.run(
        [str(repo / "scripts" / "test"), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    made = calls.read_text().splitlines() if calls.exists() else []
    return res.returncode, made, res.stdout + res.stderr


LINT = ["ruff format --check .", "ruff check ."]
UNIT = "pytest -q -m not integration"
INTEGRATION = "pytest -q -m integration"


def test_all_stages_in_order(repo: Path) -> None:
    code, calls, out = run_test(repo)
    assert code == 0, out
    assert calls[:2] == LINT, calls
    assert calls[2].startswith("mypy ") and calls[2].endswith(" evc evc_sim tests bench"), calls
    assert calls[3:] == [UNIT, INTEGRATION], calls


def test_a_lint_failure_stops_before_the_tests_and_every_gate_reports(repo: Path) -> None:
    code, calls, out = run_test(repo, fail_on=LINT[1])
    assert code == 1, out
    assert calls[:2] == LINT and calls[2].startswith("mypy "), calls  # the gates after it still ran
    assert not [c for c in calls if c.startswith("pytest")], calls
    assert "ruff check: FAILED" in out and "later stages not run" in out, out


def test_a_unit_failure_stops_before_integration_with_its_exit_status(repo: Path) -> None:
    code, calls, out = run_test(repo, fail_on=UNIT, rc=3)
    assert code == 3, out
    assert calls[-1] == UNIT, calls
    assert "unit tests FAILED (exit 3)" in out, out


def test_an_integration_failure_is_the_exit_status(repo: Path) -> None:
    code, calls, out = run_test(repo, fail_on=INTEGRATION, rc=2)
    assert code == 2, out
    assert calls[-1] == INTEGRATION, calls


def test_arguments_give_a_focused_pytest_run_only(repo: Path) -> None:
    code, calls, out = run_test(repo, "-k", "registration")
    assert code == 0, out
    assert calls == ["pytest -q -k registration"], calls


def test_ci_runs_scripts_test() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "scripts/test" in lines
