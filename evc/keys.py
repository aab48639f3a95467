"""EVC's own SSH key pair: ed25519, created on first start, private key mode 0600."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from evc.settings import Settings


def ensure_keypair(settings: Settings) -> Path:
    """Create the key pair in the data directory if missing; return the private key path."""
    path = settings.key_path
    pub = path.with_suffix(".pub")
    if path.exists() and pub.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="evc")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    pub.write_bytes(key.export_public_key())
    os.replace(tmp, path)
    return path


def public_key(settings: Settings) -> str:
    """EVC's public key as one authorized_keys line."""
    ensure_keypair(settings)
    return settings.key_path.with_suffix(".pub").read_text().strip()


def install_command(pub: str) -> str:
    """The one line a device owner runs, as the account EVC will use, to install the key."""
    import shlex

    return (
        "umask 077 && mkdir -p ~/.ssh && touch ~/.ssh/authorized_keys && "
        f"(grep -qxF {shlex.quote(pub)} ~/.ssh/authorized_keys || "
        f"echo {shlex.quote(pub)} >> ~/.ssh/authorized_keys)"
    )
