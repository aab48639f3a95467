"""Secrets at rest: values a playbook schema marks ``secret`` are sealed (Fernet) with a key kept
in the data directory, opened only where the Ansible variables are built, masked everywhere else."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from evc.errors import ConfigError
from evc.settings import Settings

#: how a sealed value starts; what follows is a Fernet token of the value's JSON
SEALED_PREFIX = "evc-sealed:v1:"
#: what the API shows instead of a secret that is set (secrets are write-only)
MASK = "********"
KEY_FILE = "secrets.key"


def key_path(settings: Settings) -> Path:
    return settings.data_dir / KEY_FILE


def _load_or_create_key(path: Path) -> bytes:
    """The key at *path*; created (mode 0600, atomically: two processes agree) when missing."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key() + b"\n")
        try:
            os.link(tmp, path)  # fails when another process made the key first: use theirs
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


class Vault:
    """Seal and open secret values with the data directory's key."""

    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError as exc:
            raise ConfigError(f"the secrets key is not a valid Fernet key: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> Vault:
        path = key_path(settings)
        try:
            return cls(_load_or_create_key(path))
        except OSError as exc:
            raise ConfigError(f"cannot read or create the secrets key {path}: {exc.strerror}") from exc

    def seal(self, value: Any) -> str:
        """*value* (any JSON) encrypted and authenticated; an already sealed value is kept."""
        if is_sealed(value):
            return str(value)
        return SEALED_PREFIX + self._fernet.encrypt(json.dumps(value).encode()).decode()

    def open(self, value: Any) -> Any:
        """The clear value of a sealed one (anything else, e.g. stored before sealing, as is)."""
        if not is_sealed(value):
            return value
        try:
            return json.loads(self._fernet.decrypt(str(value)[len(SEALED_PREFIX) :].encode()))
        except InvalidToken as exc:
            raise ConfigError(
                "a stored secret cannot be decrypted with this data directory's secrets key "
                f"({KEY_FILE}); the API and workers must share one key"
            ) from exc

    def seal_fields(self, values: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
        """*values* with the fields *names* sealed (empty and missing ones left alone)."""
        names = set(names)
        return {k: self.seal(v) if k in names and v not in (None, "") else v for k, v in values.items()}

    def open_fields(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {k: self.open(v) for k, v in values.items()}


def masked(values: Mapping[str, Any]) -> dict[str, Any]:
    """*values* as the API shows them: every sealed value replaced by :data:`MASK`."""
    return {k: MASK if is_sealed(v) else v for k, v in values.items()}
