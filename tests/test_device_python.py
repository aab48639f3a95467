"""Device-side code runs on the devices' own Pythons (JetPack 5 ships 3.8): the edge exporter and
the FL client must parse as Python 3.8. Ruff lints them for 3.8 too (pyproject.toml's
``per-file-target-version``); this checks the syntax with the interpreter's own parser."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE_FILES = sorted((ROOT / "evc" / "exporter").glob("*.py")) + [ROOT / "evc" / "fl" / "client.py"]


def test_the_device_side_files_are_found() -> None:
    assert len(DEVICE_FILES) >= 3
    assert all(p.is_file() for p in DEVICE_FILES)


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_device_side_code_parses_as_python_3_8(path: Path) -> None:
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


def test_the_38_parse_rejects_newer_syntax() -> None:
    """The check has teeth: a ``match`` statement (3.10) does not parse as 3.8."""
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 8))
