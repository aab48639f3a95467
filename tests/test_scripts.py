"""The scripts that set up and test EVC never touch the host's own services (issue 10 point 14)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHIMS = ("systemctl", "service", "pkill", "killall", "kill", "apt-get", "sudo", "invoke-rc.d")
# what stops, disables or kills a host's service, or kills processes by name; and the host's own Redis
HOST_SERVICE_CALL = re.compile(
    r"\b(?:systemctl|pkill|killall|invoke-rc\.d|pidof|pgrep)\b"
    r"|\bservice\s+\S+\s+(?:stop|restart|disable)\b"
    r"|\b(?:localhost|127\.0\.0\.1):6379\b"
)
GUARD = Path(__file__).resolve()  # this file names the calls it looks for


def host_service_calls(paths: list[Path]) -> list[str]:
    """`path:line: text` for each line of the text files at (or under) *paths* that would touch
    the host's services."""
    found = []
    for top in paths:
        for path in sorted(top.rglob("*")) if top.is_dir() else [top]:
            if path.resolve() == GUARD or not path.is_file() or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue  # data files
            for n, line in enumerate(text.splitlines(), 1):
                if HOST_SERVICE_CALL.search(line):
                    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                    found.append(f"{name}:{n}: {line.strip()}")
    return found


def test_tests_and_ci_leave_the_hosts_services_alone(tmp_path: Path) -> None:
    """Tests and CI start their own Redis, sshd and stack on their own ports: nothing under
    tests/, .ci/ or scripts/ stops, disables or kills a service, kills by name, or talks to
    the host's Redis on 6379. The guard itself is the one file allowed to name these calls."""
    assert (ROOT / ".ci").is_dir() and (ROOT / "tests").is_dir()
    assert host_service_calls([ROOT / "tests", ROOT / ".ci", ROOT / "scripts", ROOT / "Makefile"]) == []
    planted = tmp_path / "planted.sh"  # the scan finds what it is meant to find
    bad = ["systemctl stop redis-server", "pkill -f redis", "killall sshd", "service redis-server stop",
           "kill $(pidof redis-server)", "redis-cli -h 127.0.0.1:6379 shutdown", "systemctl disable ssh"]  # fmt: skip
    good = ["kill -TERM $pid", "os.kill(proc.pid, signal.SIGTERM)", "redis://:pw@redis:6379/0", "servicemonitor"]
    planted.write_text("\n".join(bad + good) + "\n")
    hits = [h.split(": ", 1)[1] for h in host_service_calls([planted])]
    assert hits == bad, hits


def test_bootstrap_leaves_the_hosts_services_alone(tmp_path: Path) -> None:
    """Run scripts/bootstrap with every package missing, through shims that record what it
    calls: it may install packages, never stop, disable or kill anything."""
    assert (
        host_service_calls([*sorted(p for p in (ROOT / "scripts").rglob("*") if p.is_file()), ROOT / "Makefile"]) == []
    )
    shims = tmp_path / "bin"
    shims.mkdir()
    calls = tmp_path / "calls"
    for name in SHIMS:
        (shims / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        (shims / name).chmod(0o755)
    for tool in ("bash", "dirname", "id", "touch", "env", "cat"):  # what the script needs, and no ssh
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if real and not (shims / tool).exists():
            (shims / tool).symlink_to(real)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".evc-installed-test").touch()
    os.utime(venv / ".evc-installed-test", (2**31, 2**31))  # newer than pyproject.toml: no pip run
    res = subprocess.run(
        [str(ROOT / "scripts" / "bootstrap"), "test"],
        env={"PATH": str(shims), "VENV": str(venv), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    made = calls.read_text().splitlines() if calls.exists() else []
    assert any(c.startswith("apt-get install") for c in made), (made, res.stdout, res.stderr)  # the path ran
    assert not [c for c in made if c.split()[0] in ("systemctl", "service", "pkill", "killall", "kill", "invoke-rc.d")]


def test_the_constraints_pin_every_dependency_scripts_bootstrap_installs() -> None:
    """deploy/constraints.txt (scripts/lock) pins each of EVC's and the simulator's requirements,
    test and flower extras included, to one version: a dependency added to pyproject.toml
    without `scripts/lock` would be installed unpinned."""
    import tomllib

    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    sim = tomllib.loads((ROOT / "sim" / "pyproject.toml").read_text())["project"]
    wanted = [*meta["dependencies"], *meta["optional-dependencies"]["test"], *meta["optional-dependencies"]["flower"],
              *sim.get("dependencies", [])]  # fmt: skip
    names = {re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower()) for r in wanted}
    # pip freeze leaves out the packaging tools; evc itself is the project
    missing = sorted(names - set(pins) - {"setuptools", "wheel", "pip", "evc"})
    assert not missing, f"unpinned in deploy/constraints.txt (run scripts/lock): {missing}"
