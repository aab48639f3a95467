"""The repository's layout: no symlinks, and the wheel and sdist carry every package.

evc.api, evc.tasks and evc.workers live in the design card's top-level folders, mapped by
setuptools' package-dir (pyproject.toml); the playbooks install as evc/playbooks. The simulator
and the test sshd launcher are a distribution of their own (sim/: evc-sim, package evc_sim),
never in the evc wheel.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"evc.api": "api", "evc.tasks": "tasks", "evc.workers": "workers", "evc.playbooks": "playbooks"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tracked() -> list[tuple[str, str]]:
    out = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [(line.split()[0], line.split("\t", 1)[1]) for line in out.splitlines()]


def _packages_on_disk() -> set[str]:
    found = {"evc.playbooks"}
    for init in (ROOT / "evc").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for name, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(ROOT / folder).parts)))
    return found


def test_no_symlinks_are_tracked() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    links = [path for mode, path in _tracked() if mode == "120000"]
    assert links == [], f"symlinks in the repository: {links}"


def test_every_package_is_listed_and_mapped() -> None:
    tool = _pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == MAPPED
    listed = set(tool["packages"])
    assert listed == _packages_on_disk(), "pyproject's [tool.setuptools] packages and the tree differ"


def test_the_fl_client_playbook_finds_the_client() -> None:
    """playbooks/fl-client.yml looks for the client beside its own folder: <repo>/evc/device in a
    checkout, evc/device beside evc/playbooks once installed (the wheel test checks that one)."""
    text = (ROOT / "playbooks" / "fl-client.yml").read_text()
    assert "playbook_dir ~ '/../evc/device/fl_client.py'" in text
    assert "playbook_dir ~ '/../device/fl_client.py'" in text
    assert (ROOT / "playbooks" / ".." / "evc" / "device" / "fl_client.py").is_file()


def test_the_simulator_is_a_distribution_of_its_own() -> None:
    sim = tomllib.loads((ROOT / "sim" / "pyproject.toml").read_text())
    assert sim["project"]["name"] == "evc-sim"
    assert "evc" in sim["project"]["dependencies"]
    on_disk = {".".join(i.parent.relative_to(ROOT / "sim").parts) for i in (ROOT / "sim").rglob("__init__.py")}
    assert set(sim["tool"]["setuptools"]["packages"]) == on_disk == {"evc_sim"}
    assert not (ROOT / "evc" / "sim").exists() and not (ROOT / "evc" / "sshd.py").exists()


#: issue 12: no function or method longer than this many lines, no module longer than MAX_MODULE
MAX_FUNCTION = 60
MAX_MODULE = 600


def test_no_function_or_module_is_too_long() -> None:
    """Every tracked .py file outside tests/ and bench/: functions and methods at most
    MAX_FUNCTION lines (from ``def`` to the last line, decorators not counted), modules at most
    MAX_MODULE."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    offenders: list[str] = []
    for _mode, path in _tracked():
        if not path.endswith(".py") or path.startswith(("tests/", "bench/")) or not (ROOT / path).is_file():
            continue
        text = (ROOT / path).read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE:
            offenders.append(f"{path}: module of {lines} lines")
        for node in ast.walk(ast.parse(text, filename=path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION:
                    offenders.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    assert offenders == [], f"over {MAX_FUNCTION} lines a function or {MAX_MODULE} a module: {offenders}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tracked files alone, as a clean checkout has them (the builds write into it)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    dest = tmp_path_factory.mktemp("checkout")
    for _mode, path in _tracked():
        src, dst = ROOT / path, dest / path
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    return dest


def _build(kind: str, src: Path, out: Path) -> Path:
    code = f"import sys; from setuptools import build_meta as b; print(b.build_{kind}(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_wheel_and_sdist_carry_the_mapped_folders(checkout: Path, tmp_path: Path) -> None:
    wheel = _build("wheel", checkout, tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, installed in (("api", "evc/api"), ("tasks", "evc/tasks"), ("workers", "evc/workers")):
        for src in (ROOT / folder).glob("*.py"):
            assert f"{installed}/{src.name}" in names, f"{installed}/{src.name} is not in the wheel"
    for src in (ROOT / "playbooks").rglob("*"):
        if src.is_file() and "__pycache__" not in src.parts:
            rel = src.relative_to(ROOT / "playbooks").as_posix()
            assert f"evc/playbooks/{rel}" in names, f"playbook file {rel} is not in the wheel"
    assert "evc/fl/digits.npz" in names and "evc/profiles/profiles.yml" in names
    # the web console's templates and assets (served by EVC itself)
    for src in (ROOT / "api" / "ui").rglob("*"):
        if src.is_file() and "__pycache__" not in src.parts:
            rel = src.relative_to(ROOT / "api").as_posix()
            assert f"evc/api/{rel}" in names, f"console file {rel} is not in the wheel"
    # device-side code, where the exporter bundle and the fl-client playbook look for it
    assert "evc/device/fl_client.py" in names and "evc/device/exporter/__main__.py" in names
    simulator = sorted(n for n in names if n.startswith(("evc/sim/", "evc_sim/")) or n == "evc/sshd.py")
    assert simulator == [], f"simulator code in the evc wheel: {simulator}"

    sdist = _build("sdist", checkout, tmp_path)
    members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
    for folder in ("api", "tasks", "workers", "playbooks"):
        tracked = [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for src in tracked:
            rel = src.relative_to(ROOT).as_posix()
            assert rel in members, f"{rel} is not in the sdist"


@pytest.mark.slow
def test_the_simulator_wheel_carries_evc_sim(checkout: Path, tmp_path: Path) -> None:
    wheel = _build("wheel", checkout / "sim", tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in (ROOT / "sim" / "evc_sim").glob("*.py"):
        assert f"evc_sim/{src.name}" in names, f"evc_sim/{src.name} is not in the evc-sim wheel"
    assert {"evc_sim/sshd.py", "evc_sim/spawn_helper.py"} <= names
    assert not [n for n in names if n.startswith("evc/")], "the evc-sim wheel carries evc's files"
