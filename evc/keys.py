"""EVC's own SSH key pair: ed25519, created on first start, private key mode 0600."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import asyncssh

from evc.settings import Settings


def ensure_keypair(settings: Settings) -> Path:
    """Create the key pair in the data directory if missing; return the private key path.

    Safe when several processes (API and worker replicas on shared storage) start at once: the
    creator holds an exclusive lock, and the public key is written before the private key
    appears, so a present private key always has its own public key beside it."""
    path = settings.key_path
    pub = path.with_suffix(".pub")
    if path.exists() and pub.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with open(path.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists() and pub.exists():
            return path
        key = asyncssh.generate_private_key("ssh-ed25519", comment="evc")
        tmp, tmp_pub = path.with_suffix(".tmp"), path.with_suffix(".pub.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        tmp_pub.write_bytes(key.export_public_key())
        os.replace(tmp_pub, pub)
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
