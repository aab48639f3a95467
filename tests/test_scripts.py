"""The scripts that set up and test EVC never touch the host's own services (issue 10 point 14)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHIMS = ("systemctl", "service", "pkill", "killall", "kill", "apt-get", "sudo", "invoke-rc.d")


def test_bootstrap_leaves_the_hosts_services_alone(tmp_path: Path) -> None:
    """Run scripts/bootstrap with every package missing, through shims that record what it
    calls: it may install packages, never stop, disable or kill anything."""
    for script in [*sorted(p for p in (ROOT / "scripts").rglob("*") if p.is_file()), ROOT / "Makefile"]:
        text = script.read_text()
        found = re.findall(r"\b(?:systemctl|pkill|killall)\b|\bservice\s+\S+\s+(?:stop|restart)", text)
        assert not found, f"{script.name} calls {found}"
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
