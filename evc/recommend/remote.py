"""Profiling on one device over SSH: ship the runner (:mod:`evc.device.profile_runner`) and the
model files (named by their sha256, resumable and digest-verified: the deployments' shipping,
:mod:`evc.deployments.ship`; a file already there is not sent again), then run the runner once
per model and read its JSON line.

Layout on the device: ``~/.evc/profile/runner.py``, ``~/.evc/profile/models/<sha256>.onnx``.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from evc import pool as pooling
from evc import ssh
from evc.deployments import ship as shipping
from evc.errors import CommandFailed, DeviceError, SSHTimeout
from evc.fl.channels import put_file, shell_path
from evc.settings import Settings
from evc.store import JSON

REMOTE_DIR = "~/.evc/profile"
RUNNER = f"{REMOTE_DIR}/runner.py"


@dataclass(frozen=True)
class Run:
    """What a device runs: models (sha256 -> bytes), batch sizes, counts, its Python."""

    models: Mapping[str, bytes]
    batches: Sequence[int]
    warmup: int
    timed: int
    max_seconds: float
    python: str


def runner_source() -> bytes:
    return (Path(__file__).resolve().parent.parent / "device" / "profile_runner.py").read_bytes()


def _last_json(text: str) -> JSON | None:
    for line in reversed([x for x in text.splitlines() if x.strip()]):
        try:
            out = json.loads(line)
        except ValueError:
            continue
        return out if isinstance(out, dict) else None
    return None


async def _one_model(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: Run,
                     sha: str, where: str) -> JSON:  # fmt: skip
    path = f"{REMOTE_DIR}/models/{sha}.onnx"
    try:
        await shipping.ship(conn, target, settings, spec.python, path, shipping.Payload(spec.models[sha], sha))
    except shipping.DigestMismatch as exc:
        raise CommandFailed(
            f"the model on {where} does not match sha256 {sha} after the upload", device_id=target.device_id
        ) from exc
    argv = ["--model", path, "--batches", ",".join(str(b) for b in spec.batches), "--warmup", str(spec.warmup),
            "--timed", str(spec.timed), "--max-seconds", str(spec.max_seconds)]  # fmt: skip
    cmd = " ".join(
        [shell_path(spec.python), shell_path(RUNNER)]
        + [shell_path(a) if a.startswith("~/") else shlex.quote(a) for a in argv]
    )
    budget = spec.max_seconds * len(spec.batches) * 3 + settings.ssh_command_timeout_s + 30
    res = await ssh.run(conn, cmd, target, settings, check=False, timeout=budget)
    out = _last_json(str(res.stdout or ""))
    if out is None:
        err = [x for x in str(res.stderr or "").splitlines() if x.strip()]
        why = err[-1] if err else f"exit status {res.exit_status}"
        raise CommandFailed(f"the profiling runner on {where} failed: {why}", device_id=target.device_id)
    if not out.get("ok"):
        raise CommandFailed(f"the profiling runner on {where} failed: {out.get('error')}", device_id=target.device_id)
    return out


async def profile_device(settings: Settings, device: Mapping[str, Any], spec: Run) -> dict[str, JSON]:
    """Run every model of *spec* on *device*: the runner's output by sha256. Raises
    :class:`~evc.errors.DeviceError` with the reason when the device cannot run them."""
    where = str(device.get("name") or device.get("host"))
    source = runner_source()

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> dict[str, JSON]:
        await put_file(conn, RUNNER, source)
        return {sha: await _one_model(conn, target, settings, spec, sha, where) for sha in spec.models}

    return await pooling.pool_for(settings).use(device, op)


def each(settings: Settings, devices: Sequence[Mapping[str, Any]], timeout_s: float, work: Any,
         at_once: int = 0) -> list[tuple[str, JSON]]:  # fmt: skip
    """``work(device)`` on every device (*at_once* at a time; 0: all): each one's ``{"ok": True,
    "out": ...}`` or ``{"ok": False, "error": ...}`` (partial failure is data)."""
    slots = asyncio.Semaphore(at_once or max(1, len(devices)))

    async def one(dev: Mapping[str, Any]) -> tuple[str, JSON]:
        try:
            async with slots:
                out = await asyncio.wait_for(work(dev), timeout_s)
        except TimeoutError:
            return str(dev["id"]), {"ok": False, "error": SSHTimeout("the profiling did not finish in time").to_dict()}
        except DeviceError as exc:
            return str(dev["id"]), {"ok": False, "error": exc.to_dict()}
        return str(dev["id"]), {"ok": True, "out": out}

    async def all_() -> list[tuple[str, JSON]]:
        return list(await asyncio.gather(*(one(d) for d in devices)))

    return pooling.call(all_())
