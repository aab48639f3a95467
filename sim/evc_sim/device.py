"""What a simulated device is: its public description, its faults, the state file listing them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from evc.errors import ConfigError

Privilege = Literal["root", "sudo", "user"]
FaultMode = Literal["ok", "down", "refuse_auth", "slow", "drop"]

PRIVILEGES: tuple[Privilege, ...] = get_args(Privilege)
FAULT_MODES: tuple[FaultMode, ...] = get_args(FaultMode)


@dataclass
class SimDevice:
    """One simulated edge device as a client sees it, plus the fault it currently injects.

    ``mode``: ``ok``; ``down`` (listener closed, connections refused); ``refuse_auth`` (every key
    rejected); ``slow`` (each command starts ``slow_s`` late); ``drop`` (the connection is cut
    ``drop_after_s`` after a command starts, before its exit status is sent).
    """

    name: str
    host: str
    port: int
    username: str
    host_key_public: str
    home: Path
    privilege: Privilege
    mode: FaultMode = "ok"
    slow_s: float = 2.0
    drop_after_s: float = 0.2
    #: a real CPU limit (cgroup CFS quota, :mod:`evc_sim.cpuquota`): 0.25 = a quarter of a core
    cpus: float | None = None

    @property
    def authorized_keys_path(self) -> Path:
        return self.home / ".ssh" / "authorized_keys"

    @property
    def address(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "host_key": self.host_key_public,
            "privilege": self.privilege,
            "home": str(self.home),
            "mode": self.mode,
            **({"cpus": self.cpus} if self.cpus is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimDevice:
        return cls(
            name=str(data["name"]),
            host=str(data["host"]),
            port=int(data["port"]),
            username=str(data["username"]),
            host_key_public=str(data["host_key"]),
            home=Path(data["home"]),
            privilege=check_privilege(str(data["privilege"])),
            mode=check_mode(str(data.get("mode", "ok"))),
            cpus=float(data["cpus"]) if data.get("cpus") is not None else None,
        )


def check_privilege(value: str) -> Privilege:
    if value not in PRIVILEGES:
        raise ConfigError(f"unknown privilege level {value!r}; use one of {', '.join(PRIVILEGES)}")
    return cast(Privilege, value)


def check_mode(value: str) -> FaultMode:
    if value not in FAULT_MODES:
        raise ConfigError(f"unknown fault mode {value!r}; use one of {', '.join(FAULT_MODES)}")
    return cast(FaultMode, value)


def write_state(path: Path, devices: Iterable[SimDevice], **extra: Any) -> None:
    """Atomically write the JSON device list another process reads (``{"devices": [...]}``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**extra, "devices": [d.to_dict() for d in devices]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_state(path: Path) -> list[SimDevice]:
    """The devices listed in a state file written by :func:`write_state`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read simulator state {path}: {exc}") from exc
    return [SimDevice.from_dict(d) for d in data.get("devices", [])]


def key_identity(line: str) -> tuple[str, str] | None:
    """``(type, base64)`` of an authorized_keys / public key line, ignoring options and comment."""
    tokens = line.split()
    for i, tok in enumerate(tokens[:-1]):
        if tok.startswith(("ssh-", "ecdsa-", "sk-")) and tokens[i + 1].startswith("AAAA"):
            return tok, tokens[i + 1]
    return None
