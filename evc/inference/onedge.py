"""What collaborative inference does on a device over SSH: put extra models (a split's heads,
the echo model) next to a running deployment's model, have its edge server load them (SIGHUP:
it rescans its folder), and time models on the device with its own ONNX Runtime.

Extra models live in the deployment's folder (``~/.evc/deploy/<id>/models/<name>/<version>/``,
each with its ``model.json`` digest pin), so removing the deployment removes them too.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import asyncssh

from evc import pool as pooling
from evc import ssh
from evc.deployments.remote import remote_dir
from evc.errors import CommandFailed
from evc.fl.channels import put_file, shell_path
from evc.settings import Settings
from evc.store import JSON

#: run by the deployment's Python on the device (stdin): times each model on zeros of its input,
#: with the batch given and the edge server's intra-op threads (0: ONNX Runtime's default);
#: prints the median seconds of each, in order
PROFILE = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
batch, rounds, threads, paths = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
so = ort.SessionOptions()
if threads > 0:
    so.intra_op_num_threads = threads
out = []
for p in paths:
    s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 1 for d in i.shape[1:]]
    x = {i.name: np.zeros(shape, np.float32)}
    s.run(None, x); s.run(None, x)
    ts = []
    for _ in range(rounds):
        t = time.perf_counter(); s.run(None, x); ts.append(time.perf_counter() - t)
    ts.sort(); out.append(ts[len(ts) // 2])
print(json.dumps(out))
"""


def model_path(deployment_id: str, name: str, version: str) -> str:
    return f"{remote_dir(deployment_id)}/models/{name}/{version}/model.onnx"


async def _put_models(conn: asyncssh.SSHClientConnection, deployment_id: str, models: Mapping[tuple[str, str], bytes]
                      ) -> None:  # fmt: skip
    for (name, version), data in models.items():
        path = model_path(deployment_id, name, version)
        await put_file(conn, path, data)
        meta = {"sha256": hashlib.sha256(data).hexdigest(), "name": name, "version": version}
        await put_file(conn, path.rsplit("/", 1)[0] + "/model.json", json.dumps(meta).encode())


async def _reload(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, deployment_id: str
                  ) -> None:  # fmt: skip
    pid = shell_path(remote_dir(deployment_id) + "/server.pid")
    res = await ssh.run(conn, f'kill -HUP "$(cat {pid})"', target, settings, check=False)
    if res.exit_status != 0:
        raise CommandFailed(
            f"the edge server of {deployment_id} is not running on {target.address}: {str(res.stderr or '').strip()}",
            device_id=target.device_id,
        )


async def install_models(settings: Settings, device: Mapping[str, Any], deployment_id: str,
                         models: Mapping[tuple[str, str], bytes]) -> None:  # fmt: skip
    """Put *models* ((name, version) → bytes) into the deployment's folder and reload its server."""

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> None:
        await _put_models(conn, deployment_id, models)
        await _reload(conn, target, settings, deployment_id)

    await pooling.pool_for(settings).use(device, op)


async def profile(settings: Settings, device: Mapping[str, Any], python: str, paths: Sequence[str],
                  batch: int, rounds: int = 15, threads: int = 0) -> dict[str, float]:  # fmt: skip
    """The median time (s) of each model at *paths* on the device at batch *batch*."""
    args = " ".join(shlex.quote(a) if not a.startswith("~/") else shell_path(a)
                    for a in [str(batch), str(rounds), str(int(threads)), *paths])  # fmt: skip

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
        res = await ssh.run(conn, f"{shell_path(python)} - {args}", target, settings, input=PROFILE, check=False,
                            timeout=settings.ssh_command_timeout_s * 4)  # fmt: skip
        if res.exit_status != 0:
            err = str(res.stderr or "").strip().splitlines()
            raise CommandFailed(f"profiling on {target.address} failed: {err[-1] if err else res.exit_status}",
                                device_id=target.device_id)  # fmt: skip
        return {"times": json.loads(str(res.stdout).strip().splitlines()[-1])}

    out = await pooling.pool_for(settings).use(device, op)
    return {p: float(t) for p, t in zip(paths, out["times"], strict=True)}


__all__ = ["PROFILE", "install_models", "model_path", "profile"]
