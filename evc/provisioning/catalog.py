"""The playbook catalog: EVC's playbooks plus operator directories, with metadata and schemas."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import evc
from evc.errors import ConfigError, NotFound, ValidationError
from evc.model import Privilege, strings
from evc.provisioning import params
from evc.settings import Settings

log = logging.getLogger(__name__)

JSON = dict[str, Any]

#: a playbook name: a file stem, never a path
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: privilege levels from least to most; a playbook states the least it needs
PRIVILEGES: tuple[str, ...] = strings(*Privilege)
PRIVILEGE_RANK = {p: i for i, p in enumerate(PRIVILEGES)}
_PRIVILEGE_WORDS = {
    "user": "an unprivileged account",
    "sudo": "root or passwordless sudo",
    "root": "the root account",
}
META_SUFFIX = ".meta.yml"
META_KEYS = frozenset({"description", "min_privilege", "params", "tags", "check_mode"})


def builtin_dir() -> Path:
    """Where EVC's own playbooks live: ``evc/playbooks`` when packaged, else the repo's."""
    pkg = Path(evc.__file__).resolve().parent
    for cand in (pkg / "playbooks", pkg.parent / "playbooks"):
        if cand.is_dir():
            return cand
    return pkg.parent / "playbooks"


def validate_name(name: str) -> str:
    """*name* when it is a plain playbook name (no path, no traversal, no suffix), else a 422."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValidationError(
            "a playbook name is lower-case letters, digits, '-' and '_' (no paths)",
            field="playbook",
        )
    return name


@dataclass(frozen=True)
class PlaybookSpec:
    """One runnable playbook: where it is, what it needs and what it accepts."""

    name: str
    path: Path
    description: str
    min_privilege: str = "user"
    schema: JSON = field(default_factory=lambda: dict(params.OPEN_SCHEMA))
    source: str = "builtin"
    tags: tuple[str, ...] = ()
    check_mode: bool = True

    @property
    def directory(self) -> Path:
        return self.path.parent

    def validate(self, extra_vars: Mapping[str, Any] | None) -> JSON:
        """The request's extra_vars checked against this playbook's schema, defaults filled."""
        return params.validate(self.schema, extra_vars, self.name)

    def artifact_params(self) -> list[str]:
        """Parameters naming an operator-supplied artifact file (``format: artifact``)."""
        props: Mapping[str, Any] = self.schema.get("properties") or {}
        return [n for n, s in props.items() if s.get("format") == "artifact"]

    def refusal(self, privilege: str | None) -> str | None:
        """Why a device at *privilege* cannot run this playbook, or None when it can."""
        have = PRIVILEGE_RANK.get(privilege or "", -1)
        if have >= PRIVILEGE_RANK[self.min_privilege]:
            return None
        shown = privilege or "unknown"
        return (
            f"playbook {self.name!r} needs {_PRIVILEGE_WORDS[self.min_privilege]}; "
            f"the device's account has privilege level {shown!r}"
        )

    def public(self) -> JSON:
        return {
            "name": self.name,
            "description": self.description,
            "min_privilege": self.min_privilege,
            "params": self.schema,
            "source": self.source,
            "tags": list(self.tags),
            "check_mode": self.check_mode,
        }


def _load_meta(path: Path) -> JSON:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read playbook metadata {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"playbook metadata {path} must be a mapping")
    unknown = set(data) - META_KEYS
    if unknown:
        raise ConfigError(f"playbook metadata {path}: unknown keys {sorted(unknown)}")
    return data


def load_spec(path: Path, source: str) -> PlaybookSpec:
    """A spec for the playbook file *path* and its ``<name>.meta.yml`` if there is one."""
    name = path.stem
    meta_path = path.with_name(name + META_SUFFIX)
    meta = _load_meta(meta_path) if meta_path.is_file() else {}
    schema = meta.get("params") or dict(params.OPEN_SCHEMA)
    try:
        params.check_schema(schema, f"{name}.params")
    except (ValueError, re.error) as exc:
        raise ConfigError(f"playbook metadata {meta_path}: {exc}") from exc
    minp = str(meta.get("min_privilege", "user"))
    if minp not in PRIVILEGE_RANK:
        raise ConfigError(f"playbook metadata {meta_path}: min_privilege must be in {PRIVILEGES}")
    return PlaybookSpec(
        name=name,
        path=path,
        description=str(meta.get("description") or f"operator playbook {path.name}").strip(),
        min_privilege=minp,
        schema=schema,
        source=source,
        tags=tuple(meta.get("tags") or ()),
        check_mode=bool(meta.get("check_mode", True)),
    )


class Catalog:
    """The playbooks EVC can run: its own directory first, then each operator directory.

    A name found in an earlier directory shadows a later one (operators cannot silently
    replace EVC's playbooks)."""

    def __init__(self, dirs: Iterable[tuple[Path, str]]) -> None:
        self.dirs = [(Path(d), src) for d, src in dirs]

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        extra = [(d, "operator") for d in settings.extra_playbook_dirs()]
        return cls([(builtin_dir(), "builtin"), *extra])

    def _find(self, directory: Path, name: str) -> Path | None:
        root = directory.resolve()
        for suffix in (".yml", ".yaml"):
            cand = directory / (name + suffix)
            if cand.is_file() and cand.resolve().parent == root:
                return cand
        return None

    def get(self, name: str) -> PlaybookSpec:
        """The playbook called *name*; a 422 for a name that is a path, a 404 when unknown."""
        validate_name(name)
        for directory, source in self.dirs:
            found = self._find(directory, name)
            if found is not None:
                return load_spec(found, source)
        raise NotFound(f"no playbook named {name!r}", playbook=name)

    def names(self) -> list[str]:
        seen: list[str] = []
        for directory, _ in self.dirs:
            if not directory.is_dir():
                log.warning("playbook directory %s does not exist", directory)
                continue
            for p in sorted(directory.iterdir()):
                if p.suffix not in (".yml", ".yaml") or p.stem.endswith(".meta"):
                    continue
                if NAME.match(p.stem) and p.is_file() and p.stem not in seen:
                    seen.append(p.stem)
        return seen

    def list(self) -> list[PlaybookSpec]:
        """Every runnable playbook; one with broken metadata is left out (and logged), so that
        one bad file does not hide the rest of the catalog."""
        specs = []
        for name in self.names():
            try:
                specs.append(self.get(name))
            except ConfigError as exc:
                log.error("playbook %s left out of the catalog: %s", name, exc.message)
        return specs
