"""Device-side code runs on the devices' own Pythons (JetPack 5 ships 3.8): the edge exporter and
the FL client must parse as Python 3.8. Ruff lints them for 3.8 too (pyproject.toml's
``per-file-target-version``); this checks the syntax with the interpreter's own parser."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE_FILES = sorted((ROOT / "evc" / "device").rglob("*.py"))


def test_the_device_side_files_are_found() -> None:
    assert len(DEVICE_FILES) >= 3
    assert all(p.is_file() for p in DEVICE_FILES)


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_device_side_code_parses_as_python_3_8(path: Path) -> None:
    text = path.read_text()
    tree = ast.parse(text, filename=str(path), feature_version=(3, 8))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            assert node.module.split(".")[0] != "evc", f"{path.name} imports {node.module}: not on a device"
        if isinstance(node, ast.Import):
            assert not [a.name for a in node.names if a.name.split(".")[0] == "evc"], f"{path.name} imports evc"
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "zip":
            assert not node.keywords, f"{path.name}: zip(strict=) needs Python 3.10"
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("removeprefix", "removesuffix"), f"{path.name}: str.{node.attr} needs 3.9"
    if path.name not in ("__init__.py", "__main__.py"):
        # annotations such as ``list[int]`` or ``X | None`` are evaluated lazily only with this
        assert "from __future__ import annotations" in text, path.name


def test_the_38_parse_rejects_newer_syntax() -> None:
    """The check has teeth: a ``match`` statement (3.10) does not parse as 3.8."""
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 8))
