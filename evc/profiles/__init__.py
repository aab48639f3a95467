"""Interworking profiles and function levels, loaded from ``profiles.yml`` (data, not ifs)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from evc.errors import ConfigError, PreconditionFailed, ValidationError
from evc.model import LEVEL_NAMES, PRIVILEGE_RANK, Privilege

LEVELS: dict[int, str] = LEVEL_NAMES
MAX_LEVEL = max(LEVELS)

#: the function level each operation needs on every device it touches
OPERATION_LEVELS: dict[str, int] = {
    "provision": 0,
    "monitoring-target": 2,
    "deploy": 3,
    "fl": 4,
    "inference": 4,
}


@dataclass(frozen=True)
class Requirements:
    privilege: str = Privilege.USER
    min_memory_mb: int = 0
    min_cpus: int = 0
    archs: tuple[str, ...] = ()

    def unmet(self, device: Mapping[str, Any]) -> list[str]:
        """Why *device* cannot be a member (empty when it can)."""
        why: list[str] = []
        priv = device.get("privilege") or Privilege.USER
        if PRIVILEGE_RANK.get(priv, 0) < PRIVILEGE_RANK[self.privilege]:
            why.append(f"the account's privilege is {priv!r}; this profile needs {self.privilege!r} or more")
        facts = device.get("facts") or {}
        mem = facts.get("memory_bytes")
        if self.min_memory_mb and mem is not None and mem < self.min_memory_mb * 1024 * 1024:
            why.append(f"{mem // (1024 * 1024)} MiB of memory; this profile needs {self.min_memory_mb} MiB")
        cpus = facts.get("cpus")
        if self.min_cpus and cpus is not None and cpus < self.min_cpus:
            why.append(f"{cpus} CPU(s); this profile needs {self.min_cpus}")
        if self.archs and facts.get("arch") not in self.archs:
            why.append(f"architecture {facts.get('arch')!r} is not one of {list(self.archs)}")
        return why


@dataclass(frozen=True)
class Step:
    playbook: str
    role: str = "all"  # "all" | "server" | "agent"
    vars: Mapping[str, Any] = field(default_factory=dict)

    def applies(self, device_id: str, server_id: str | None) -> bool:
        if self.role == "server":
            return device_id == server_id
        if self.role == "agent":
            return device_id != server_id
        return True


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    requires: Requirements
    levels: Mapping[int, tuple[Step, ...]]
    server_role: bool = False

    def steps(self, level: int) -> tuple[Step, ...]:
        return self.levels.get(level, ())

    def playbooks(self) -> set[str]:
        """Every playbook this profile's levels run (what cluster ``vars`` may name)."""
        return {s.playbook for lvl in LEVELS for s in self.steps(lvl)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "requires": {
                "privilege": self.requires.privilege, "min_memory_mb": self.requires.min_memory_mb,
                "min_cpus": self.requires.min_cpus, "archs": list(self.requires.archs),
            },
            "server_role": self.server_role,
            "levels": {
                str(lvl): {"name": LEVELS[lvl], "steps": [
                    {"playbook": s.playbook, "role": s.role, "vars": dict(s.vars)} for s in self.steps(lvl)]}
                for lvl in range(1, MAX_LEVEL + 1)
            },
        }  # fmt: skip


def _load(path: Path) -> dict[str, Profile]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read profiles from {path}: {exc}") from exc
    out: dict[str, Profile] = {}
    for name, spec in raw.items():
        req = spec.get("requires") or {}
        if req.get("privilege", Privilege.USER) not in PRIVILEGE_RANK:
            raise ConfigError(f"profile {name}: unknown privilege {req.get('privilege')!r}")
        levels: dict[int, tuple[Step, ...]] = {}
        for lvl, steps in (spec.get("levels") or {}).items():
            if int(lvl) not in LEVELS or int(lvl) == 0:
                raise ConfigError(f"profile {name}: level {lvl} is not 1..{MAX_LEVEL}")
            levels[int(lvl)] = tuple(
                Step(s["playbook"], s.get("role", "all"), dict(s.get("vars") or {})) for s in steps or []
            )
        out[name] = Profile(
            name=name,
            description=" ".join(str(spec.get("description", "")).split()),
            requires=Requirements(
                privilege=req.get("privilege", "user"),
                min_memory_mb=int(req.get("min_memory_mb", 0)),
                min_cpus=int(req.get("min_cpus", 0)),
                archs=tuple(req.get("archs") or ()),
            ),
            levels=levels,
            server_role=bool(spec.get("server_role", False)),
        )
    return out


@cache
def profiles() -> dict[str, Profile]:
    return _load(Path(__file__).with_name("profiles.yml"))


def names() -> list[str]:
    """The profiles' names, in the order profiles.yml lists them (the API's and CLI's choices)."""
    return list(profiles())


def get(name: str) -> Profile:
    try:
        return profiles()[name]
    except KeyError:
        raise ValidationError(
            f"unknown profile {name!r}; choose one of {sorted(profiles())}", field="profile"
        ) from None


@dataclass(frozen=True)
class PlannedStep:
    level: int
    playbook: str
    devices: tuple[str, ...]
    vars: Mapping[str, Any]


def plan(
    profile: Profile, devices: Iterable[Mapping[str, Any]], target: int, server_id: str | None = None
) -> tuple[list[PlannedStep], dict[str, str]]:
    """The steps that raise *devices* to *target*, in order, and the devices that cannot be
    members at all (with the reason). Pure: unit-tested per profile and level."""
    if not 0 <= target <= MAX_LEVEL:
        raise ValidationError(f"target level is 0..{MAX_LEVEL}", field="target")
    blocked: dict[str, str] = {}
    eligible: list[Mapping[str, Any]] = []
    for d in devices:
        why = profile.requires.unmet(d)
        if why:
            blocked[d["id"]] = "; ".join(why)
        else:
            eligible.append(d)
    steps: list[PlannedStep] = []
    for lvl in range(1, target + 1):
        for step in profile.steps(lvl):
            ids = tuple(
                d["id"] for d in eligible
                if int(d.get("level") or 0) < lvl and step.applies(d["id"], server_id)
            )  # fmt: skip
            if ids:
                steps.append(PlannedStep(lvl, step.playbook, ids, step.vars))
    return steps, blocked


def require_level(operation: str, devices: Iterable[Mapping[str, Any]]) -> None:
    """Refuse an operation on devices below the level it needs, saying which and why."""
    need = OPERATION_LEVELS[operation]
    low = [d for d in devices if int(d.get("level") or 0) < need]
    if low:
        names = ", ".join(f"{d['name']} (L{int(d.get('level') or 0)})" for d in low[:10])
        raise PreconditionFailed(
            f"{operation} needs function level L{need} ({LEVELS[need]}); below it: {names}. "
            "Raise the cluster: POST /api/v1/clusters/{id}/level",
            needed_level=need, devices=[d["id"] for d in low],
        )  # fmt: skip
