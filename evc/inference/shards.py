"""Data sets already on the devices: the FL shards an ``fl-partition`` job pushed
(``~/.evc/fl/data/<name>/shard.npz``, arrays ``X`` and ``y``), named ``fl-shards:<name>``.

The job reads each target device's shard over its pooled SSH connection (SFTP) and runs the
items, device after device in the job's target order, through the same dynamic split as an
uploaded data set: a fast device also answers a slow one's items. A device without the shard
is skipped and named in the summary (partial failure is data); none with it fails the job.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any

import asyncssh
import numpy as np

from evc import pool as pooling
from evc import ssh
from evc.errors import CommandFailed, DeviceError, ValidationError
from evc.fl.channels import sftp_path
from evc.fl.service import DEFAULT_SHARD_PATH, NAME_RE
from evc.inference.datasets import Data
from evc.model import Device
from evc.settings import Settings

PREFIX = "fl-shards:"


def is_shards(ref: str) -> bool:
    return ref.startswith(PREFIX)


def shard_name(ref: str) -> str:
    """The FL data set name of ``fl-shards:<name>`` (422 for a bad one)."""
    name = ref[len(PREFIX) :] or "digits"
    if not NAME_RE.match(name):
        raise ValidationError(f"{ref!r}: the name after {PREFIX} must be letters, digits, '.', '_' or '-'")
    return name


async def _read(settings: Settings, device: Device, path: str) -> bytes:
    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> bytes:
        try:
            async with conn.start_sftp_client() as sftp, sftp.open(sftp_path(path), "rb") as fh:
                data: Any = await fh.read()
                return bytes(data)
        except asyncssh.SFTPError as exc:
            raise CommandFailed(f"no {path} on {target.address}: {exc.reason}", device_id=target.device_id) from exc

    result: Any = await pooling.pool_for(settings).use(device, op)
    return bytes(result)


def gather(settings: Settings, devices: Sequence[Device], ref: str) -> tuple[Data, dict[str, int], dict[str, str]]:
    """The shards of *devices* (in order) as one data set; (data, items per device name,
    why each device without one had none)."""
    path = DEFAULT_SHARD_PATH.format(dataset=shard_name(ref))

    async def all_() -> list[bytes | BaseException]:
        return list(await asyncio.gather(*(_read(settings, d, path) for d in devices), return_exceptions=True))

    xs, ys, counts, missing = [], [], {}, {}
    for dev, raw in zip(devices, pooling.call(all_()), strict=True):
        name = str(dev.get("name") or dev["id"])
        if isinstance(raw, BaseException):
            missing[name] = raw.message if isinstance(raw, DeviceError) else f"{type(raw).__name__}: {raw}"
            continue
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                x, y = np.asarray(z["X"]), np.asarray(z["y"])
        except Exception as exc:  # a damaged shard: that device's items are missing, said why
            missing[name] = f"{path} is not a readable shard ({exc})"
            continue
        xs.append(x)
        ys.append(y)
        counts[name] = len(x)
    if not xs:
        raise DeviceError(f"no device has the shard {path}: run an FL partition first (evc fl partition); "
                          + "; ".join(f"{n}: {why}" for n, why in list(missing.items())[:5]))  # fmt: skip
    return Data(np.concatenate(xs), np.concatenate(ys)), counts, missing


__all__ = ["PREFIX", "gather", "is_shards", "shard_name"]
