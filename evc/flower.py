"""Flower (Celery monitoring) for a running EVC: find its broker, protect the HTTP API.

`evc up` records its broker's URL in the data directory (:data:`BROKER_FILE`, mode 0600), so
`evc flower` watches the running stack with no extra environment. Flower's UI and HTTP API
(``/api/workers``, ``/api/tasks``) are protected by basic auth with a credential EVC generates
once and keeps in :data:`AUTH_FILE` (mode 0600); it is handed to Flower in its environment
(``FLOWER_BASIC_AUTH``), never on a command line other users can read. Flower listens on
loopback unless told otherwise.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from evc.embedded import write_private
from evc.errors import ConfigError
from evc.settings import Settings, settings_env

#: the running stack's broker URL (it may carry Redis's password: 0600)
BROKER_FILE = "broker-url"
#: Flower's basic-auth credential, ``user:password`` (0600)
AUTH_FILE = "flower-auth"
FLOWER_USER = "evc"


@dataclass(frozen=True)
class FlowerLaunch:
    """How to run Flower for an EVC: the command, its environment, and who may log in."""

    argv: list[str]
    env: dict[str, str]
    user: str
    password: str
    url: str


def record_broker(settings: Settings) -> Path:
    """Note the stack's broker URL in the data directory (called by `evc up`)."""
    path = settings.data_dir / BROKER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, settings.redis_url + "\n")
    return path


def forget_broker(settings: Settings) -> None:
    """Remove the note when the stack stops (a stale URL would point Flower at nothing)."""
    (settings.data_dir / BROKER_FILE).unlink(missing_ok=True)


def broker_url(settings: Settings) -> str:
    """The broker to watch: the configured ``EVC_REDIS_URL``, else the running stack's."""
    if settings.redis_url:
        return settings.redis_url
    path = settings.data_dir / BROKER_FILE
    try:
        url = path.read_text().strip()
    except FileNotFoundError:
        url = ""
    if not url:
        raise ConfigError(
            f"no running EVC stack in {settings.data_dir} (no {BROKER_FILE}): start one with "
            "`evc up`, or set EVC_REDIS_URL to the broker"
        )
    return url


def credential(settings: Settings) -> tuple[str, str]:
    """Flower's ``(user, password)``: made once, kept in the data directory."""
    path = settings.data_dir / AUTH_FILE
    try:
        user, _, password = path.read_text().strip().partition(":")
        if user and password:
            return user, password
    except FileNotFoundError:
        pass
    password = secrets.token_urlsafe(18)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, f"{FLOWER_USER}:{password}\n")
    return FLOWER_USER, password


def launch(settings: Settings, port: int, address: str = "127.0.0.1") -> FlowerLaunch:
    """The command and environment that run Flower against this EVC's broker, protected."""
    s = settings.replace(redis_url=broker_url(settings))
    user, password = credential(s)
    env = {**os.environ, **settings_env(s), "FLOWER_BASIC_AUTH": f"{user}:{password}"}
    argv = [sys.executable, "-m", "celery", "-A", "evc.workers.app", "flower",
            f"--port={port}", f"--address={address}"]  # fmt: skip
    host = "127.0.0.1" if address in ("", "0.0.0.0") else address  # noqa: S104 - only a display URL
    return FlowerLaunch(argv, env, user, password, f"http://{host}:{port}")


__all__ = ["AUTH_FILE", "BROKER_FILE", "FlowerLaunch", "broker_url", "credential", "forget_broker",
           "launch", "record_broker"]  # fmt: skip
