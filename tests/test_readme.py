"""The README's walkthrough, executed: every command it shows runs, in order, against a fresh
`evc up --sim 3` on a private data directory and port, exits 0 and prints what the README says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from evc.embedded import free_port
from tests.readme_walkthrough import Step, execute, steps

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


# ----------------------------------------------------------------------------- the parser
SAMPLE = """
text
```sh
echo not part of the walkthrough
```
<!-- walkthrough -->
```sh
# a comment
A=1                       # trailing comment
echo "$A" \\
  two
# expect: ^1 two$
scripts/up   # not run by the README test: the test starts the stack itself
```
"""


def test_parser_takes_marked_blocks_continuations_expectations_and_not_run_marks() -> None:
    got = steps(SAMPLE)
    assert [s.command.split()[0] for s in got] == ["A=1", "echo", "scripts/up"]
    assert got[1].command == 'echo "$A" \\\n  two'
    assert got[1].expect == ["^1 two$"]
    assert got[2].not_run == "the test starts the stack itself"
    assert got[0].line == 9


def test_parser_refuses_a_mark_without_a_block() -> None:
    with pytest.raises(ValueError, match="must be followed"):
        steps("<!-- walkthrough -->\ntext\n")


def test_driver_keeps_shell_state_and_stops_at_the_first_failure(tmp_path: Path) -> None:
    run = [Step("X=41", 1), Step("echo $((X + 1))", 2, expect=["^42$"]), Step("false", 3), Step("echo never", 4)]
    outcomes, _ = execute(run, tmp_path, {**os.environ}, tmp_path / "out", timeout=30)
    assert [o.rc for o in outcomes] == [0, 0, 1]
    assert outcomes[1].ok and outcomes[1].output == "42\n"


def test_readme_has_a_walkthrough() -> None:
    got = steps(README.read_text())
    assert len(got) >= 10, "the README's walkthrough blocks are missing their <!-- walkthrough --> marks"


# ----------------------------------------------------------------------------- the real run
def _api_ready(url: str, token_file: Path, devices: int) -> bool:
    if not token_file.exists():
        return False
    try:
        r = requests.get(
            f"{url}/api/v1/devices",
            headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
            timeout=2,
        )
    except requests.RequestException:
        return False
    if not r.ok:
        return False
    items = r.json()["items"]
    return len(items) >= devices and all(d["state"] not in ("pending", "registering") for d in items)


@pytest.fixture
def evc_up(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`evc up --sim 3` on a private data directory and port; the environment a reader would have."""
    data = tmp_path / "evc-data"
    port = free_port("127.0.0.1")
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
        "EVC_DATA_DIR": str(data),
        "EVC_API_BIND": f"127.0.0.1:{port}",
        "EVC_URL": f"http://127.0.0.1:{port}",
        "HOME": str(tmp_path / "home"),
        # the simulated devices run on this machine, so their load is the test machine's: under a
        # loaded CI runner they would read as degraded, and FL (health-aware) would leave them out
        "EVC_HEALTH_LOAD_PER_CPU_THRESHOLD": "50",
    }
    (tmp_path / "home").mkdir()
    log = open(tmp_path / "evc-up.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(Path(bindir) / "evc"), "up", "--sim", "3"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not _api_ready(env["EVC_URL"], data / "admin-token", 3):
            if proc.poll() is not None:
                pytest.fail(f"evc up exited with {proc.returncode}:\n{(tmp_path / 'evc-up.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"evc up not ready in 180 s:\n{(tmp_path / 'evc-up.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield env
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.mark.integration
@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(evc_up: dict[str, str], tmp_path: Path) -> None:
    all_steps = steps(README.read_text())
    run = [s for s in all_steps if not s.not_run]
    for s in all_steps:
        if s.not_run:
            print(f"README line {s.line}: not run here ({s.not_run}): {s.command}")
    outcomes, _ = execute(run, ROOT, evc_up, tmp_path / "walkthrough", timeout=900)
    for o in outcomes:
        assert o.ok, (
            f"README line {o.step.line}: `{o.step.command}` "
            + ("did not finish" if o.rc is None else f"exited {o.rc}")
            + (f"; expected output matching {o.step.expect}" if o.rc == 0 else "")
            + f"\n--- output ---\n{o.output[-4000:]}"
        )
    assert len(outcomes) == len(run), "the walkthrough stopped early"
