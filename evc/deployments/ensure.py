"""One device of a re-convergence, over SSH: make it serve the deployment's version again,
doing only what is missing.

The device reports in one pass the sha256 of its model, edge-server bundle and supervisor and
whether the supervised server runs. All there and running: the server is only health-gated
(ready + one smoke inference), nothing sent, nothing restarted. Otherwise the missing pieces are
shipped (the model resumably and digest-verified, :mod:`evc.deployments.ship`; nothing when its
digest matches), other versions go to ``standby/`` and the server is (re)started and gated. A
running server that fails its gate is stopped and started afresh once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import asyncssh

from evc import pool as pooling
from evc import ssh
from evc.deployments import remote, switch
from evc.errors import CommandFailed
from evc.fl.channels import shell_path
from evc.settings import Settings
from evc.store import JSON

#: run by the deployment's Python on the device (stdin): the sha256 of each argv path (or null)
_PROBE = r"""
import hashlib, json, sys
out = []
for p in sys.argv[1:]:
    try:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
        out.append(h.hexdigest())
    except OSError:
        out.append(None)
print(json.dumps(out))
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def probe(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings,
                spec: remote.Spec) -> JSON:  # fmt: skip
    """What the device holds: ``model``, ``bundle``, ``supervise`` digests (None: missing) and
    whether the supervised server ``running``."""
    paths = [f"{spec.model_dir}/model.onnx", f"{spec.dir}/{remote.BUNDLE}", f"{spec.dir}/supervise.sh"]
    cmd = f"{shell_path(spec.python)} -S - " + " ".join(shell_path(p) for p in paths)
    res = await remote._run(conn, target, settings, cmd, input=_PROBE)
    try:
        model, bundle, supervise = json.loads(remote._last_line(str(res.stdout or ""), res.exit_status))
    except ValueError:
        model = bundle = supervise = None
    status = await remote._run(conn, target, settings, f"sh {shell_path(spec.dir + '/supervise.sh')} status")
    return {"model": model, "bundle": bundle, "supervise": supervise, "running": status.exit_status == 0}


async def _restart(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: remote.Spec,
                   where: str, have: JSON, bundle: bytes) -> bool:  # fmt: skip
    """Ship what is missing and (re)start the server; returns whether the model was shipped."""
    script = remote.supervise_script(spec.python, spec.port, threads=spec.threads)
    if have["bundle"] != _sha(bundle) or have["supervise"] != _sha(script.encode()):
        await remote._put_server(conn, target, settings, spec, where, bundle)  # stops it first
    else:
        await remote._run(conn, target, settings, f"sh {shell_path(spec.dir + '/supervise.sh')} stop; true")
    shipped = have["model"] != spec.sha256
    if shipped:
        await remote._ship_model(conn, target, settings, spec, where)
    await switch._to_standby(conn, target, settings, spec, where)
    await remote._start_server(conn, target, settings, spec, where)
    await remote._gate(conn, target, settings, spec, where, " after re-convergence")
    return shipped


async def ensure(settings: Settings, device: Mapping[str, Any], spec: remote.Spec) -> JSON:
    """Make *device* serve *spec*, doing only what is missing (see the module's docstring).
    Returns the device's result (``state`` running, ``version``, ``sha256``, ``endpoint``,
    ``shipped``, ``restarted``); raises :class:`~evc.errors.DeviceError` with the reason."""
    where = str(device.get("name") or device.get("host"))
    bundle = remote.bundle_bytes()

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
        await remote._check_python(conn, target, settings, spec, where)
        have = await probe(conn, target, settings, spec)
        script = remote.supervise_script(spec.python, spec.port, threads=spec.threads).encode()
        fresh = (have["model"], have["bundle"], have["supervise"]) == (spec.sha256, _sha(bundle), _sha(script))
        restarted, shipped = True, False
        if fresh and have["running"]:
            try:
                await remote._gate(conn, target, settings, spec, where, " (re-converging)")
                restarted = False
            except CommandFailed:  # the gate stopped it: start it afresh
                have["running"] = False
        if restarted:
            shipped = await _restart(conn, target, settings, spec, where, have, bundle)
        return {
            "state": "running", "version": spec.version, "sha256": spec.sha256, "reason": None,
            "endpoint": f"{target.host}:{spec.port}", "dir": spec.dir, "shipped": shipped, "restarted": restarted,
        }  # fmt: skip

    return await pooling.pool_for(settings).use(device, op)


__all__ = ["ensure", "probe"]
