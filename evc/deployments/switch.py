"""One device of a rollout, over SSH: switch a deployment's edge server to another version of
its model, keeping the version it ran beside it so that it can go back.

Layout on the device (``DIR`` = ``~/.evc/deploy/<deployment>``, as :mod:`evc.deployments.remote`
writes it)::

    DIR/models/<name>/<version>/       the version the server serves (one)
    DIR/standby/<name>/<version>/      the version it served before (kept for a rollback)

:func:`switch` ships the new version next to the running one while the server still serves
(skipped when the device already holds it with the right digest, in ``models/`` or in
``standby/``) and checks its sha256 on the device. Where the server runs from this EVC's bundle
and supervisor (same python and port), the switch is live, with no restart: SIGHUP makes the
server load the new version beside the running one (it rescans its folder; the old version keeps
answering), the new version is gated (its own ready endpoint + one smoke inference), then the
other versions go to ``standby/`` and a second SIGHUP unloads them; a failing gate takes the new
version out again and the device never stops answering. Otherwise the server is restarted on the
new version (the only time the device is unavailable: the rollout's ``max_unavailable`` counts
these), the other versions moved to ``standby/``, and health-gated like a first deployment. Going
back is the same call with the previous version: it is in ``models/`` or ``standby/``, nothing
is shipped.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping
from typing import Any

import asyncssh

from evc import pool as pooling
from evc import ssh
from evc.deployments import remote
from evc.deployments import ship as shipping
from evc.errors import CommandFailed
from evc.fl.channels import put_file, shell_path
from evc.settings import Settings
from evc.store import JSON

STANDBY = "standby"

#: run by the deployment's Python on the device (stdin): the sha256 of the file argv[1]
_HASH = (
    "import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'rb') as f:\n"
    "    for b in iter(lambda: f.read(1 << 20), b''):\n        h.update(b)\nprint(h.hexdigest())\n"
)


def standby_dir(spec: remote.Spec) -> str:
    return f"{spec.dir}/{STANDBY}/{spec.name}"


async def _hash(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: remote.Spec,
                path: str) -> str:  # fmt: skip
    res = await remote._run(conn, target, settings, f"{shell_path(spec.python)} - {shell_path(path)}", input=_HASH)
    return str(res.stdout or "").strip() if res.exit_status == 0 else ""


async def _place(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: remote.Spec,
                 where: str) -> bool:  # fmt: skip
    """Put *spec*'s model into ``models/<name>/<version>/``, verified: moved back from
    ``standby/`` or already there when the digest matches (no transfer), else shipped. Returns
    whether bytes were shipped."""
    model = f"{spec.model_dir}/model.onnx"
    spare = f"{standby_dir(spec)}/{spec.version}"
    if await _hash(conn, target, settings, spec, model) == spec.sha256:
        return False
    if await _hash(conn, target, settings, spec, f"{spare}/model.onnx") == spec.sha256:
        cmd = f"rm -rf {shell_path(spec.model_dir)} && mkdir -p {shell_path(spec.dir + '/models/' + spec.name)} && "
        cmd += f"mv {shell_path(spare)} {shell_path(spec.model_dir)}"
        res = await remote._run(conn, target, settings, cmd)
        if res.exit_status == 0:
            return False
    # resumable (a retry after a drop resumes the .part), digest-verified on the device
    try:
        await shipping.ship(conn, target, settings, spec.python, model, shipping.Payload(spec.model, spec.sha256))
    except shipping.DigestMismatch as exc:
        raise CommandFailed(
            f"the model on {where} does not match sha256 {spec.sha256} after the upload (sha256 {exc.got})",
            device_id=target.device_id,
        ) from exc
    meta = {"sha256": spec.sha256, "name": spec.name, "version": spec.version, "deployment": spec.deployment}
    await put_file(conn, f"{spec.model_dir}/model.json", json.dumps(meta).encode())
    return True


async def _to_standby(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings,
                      spec: remote.Spec, where: str) -> None:  # fmt: skip
    """Every other version of the model goes to standby/ (the one it replaces is kept there)."""
    models, spare, keep = (shell_path(f"{spec.dir}/models/{spec.name}"), shell_path(standby_dir(spec)),
                           shlex.quote(spec.version))  # fmt: skip
    cmd = (
        f'mkdir -p {spare} && for v in $(ls {models}); do if [ "$v" != {keep} ]; then '
        f'rm -rf {spare}/"$v"; mv {models}/"$v" {spare}/; fi; done; '
        f'for v in $(ls {spare}); do [ -d {models}/"$v" ] && rm -rf {spare}/"$v"; done; true'
    )
    res = await remote._run(conn, target, settings, cmd)
    if res.exit_status != 0:
        raise CommandFailed(
            f"cannot switch versions on {where}: {remote._last_line(str(res.stderr or ''), res.exit_status)}",
            device_id=target.device_id,
        )


#: the health gate of a live switch: waits for the version itself to be ready (the server's
#: other versions answer meanwhile), then one smoke inference; the server is left running
LIVE_GATE = remote.GATE.replace('call("/v2/health/ready")', 'call("/v2/models/%s/versions/%s/ready" % (name, version))')


#: after the second SIGHUP: wait until the server lists no other version of the model (it
#: rescans within a second), so that the old version is gone when the switch reports done
ONLY = r"""
import json, sys, time, urllib.request
port, name, version, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
deadline = time.time() + timeout
while True:
    try:
        req = urllib.request.Request("http://127.0.0.1:%s/v2/repository/index" % port, data=b"{}",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            index = json.loads(r.read())
        if not [e for e in index if e.get("name") == name and e.get("version") != version]:
            print("ok"); break
    except Exception:
        pass
    if time.time() > deadline:
        print("timeout"); break
    time.sleep(0.1)
"""


async def _hup(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: remote.Spec) -> None:
    """SIGHUP to the server: it rescans its folder (new versions load beside the running ones)."""
    pid = shell_path(f"{spec.dir}/server.pid")
    res = await remote._run(conn, target, settings, f'p=$(cat {pid}) && kill -HUP "$p"')
    if res.exit_status != 0:
        raise CommandFailed(f"cannot signal the edge server: {remote._last_line(str(res.stderr or ''), None)}",
                            device_id=target.device_id)  # fmt: skip


async def _live_gate(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings,
                     spec: remote.Spec, where: str) -> None:  # fmt: skip
    args = " ".join(shlex.quote(str(a)) for a in (spec.port, spec.name, spec.version, remote.READY_TIMEOUT_S))
    res = await remote._run(conn, target, settings, f"{shell_path(spec.python)} - {args}", input=LIVE_GATE,
                            timeout=remote.READY_TIMEOUT_S + settings.ssh_command_timeout_s)  # fmt: skip
    try:
        gate = json.loads(remote._last_line(str(res.stdout or ""), res.exit_status))
    except ValueError:
        gate = {"ok": False, "stage": "gate", "error": remote._last_line(str(res.stderr or ""), res.exit_status)}
    if not gate.get("ok"):
        stage = "not ready" if gate.get("stage") == "ready" else "failed its smoke inference"
        raise CommandFailed(f"the edge server on {where} {stage} on version {spec.version}: {gate.get('error')}",
                            device_id=target.device_id)  # fmt: skip


async def _live(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: remote.Spec,
                where: str) -> None:  # fmt: skip
    """Switch without a restart: the server loads *spec* beside the running version (SIGHUP),
    gated; then the others go to standby (SIGHUP again). On a failing gate the new version is
    taken out again, the server goes on serving the old one, and CommandFailed is raised."""
    await _hup(conn, target, settings, spec)
    try:
        await _live_gate(conn, target, settings, spec, where)
    except CommandFailed:
        spare = shell_path(f"{standby_dir(spec)}/{spec.version}")
        await remote._run(conn, target, settings, f"mkdir -p {shell_path(standby_dir(spec))} && rm -rf {spare} && "
                          f"mv {shell_path(spec.model_dir)} {spare}")  # fmt: skip
        await _hup(conn, target, settings, spec)
        raise
    await _to_standby(conn, target, settings, spec, where)
    await _hup(conn, target, settings, spec)
    args = " ".join(shlex.quote(str(a)) for a in (spec.port, spec.name, spec.version, remote.READY_TIMEOUT_S))
    await remote._run(conn, target, settings, f"{shell_path(spec.python)} - {args}", input=ONLY,
                      timeout=remote.READY_TIMEOUT_S + settings.ssh_command_timeout_s)  # fmt: skip


async def _can_reload(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings,
                      spec: remote.Spec) -> bool:  # fmt: skip
    """Whether the server runs, started by this EVC's bundle and supervisor (same python, port)."""
    from evc.deployments import ensure

    have = await ensure.probe(conn, target, settings, spec)
    script = remote.supervise_script(spec.python, spec.port, threads=spec.threads).encode()
    return bool(have["running"]) and (have["bundle"], have["supervise"]) == (
        hashlib.sha256(remote.bundle_bytes()).hexdigest(),
        hashlib.sha256(script).hexdigest(),
    )


async def switch(settings: Settings, device: Mapping[str, Any], spec: remote.Spec) -> JSON:
    """Make *device* serve *spec* (another version of the deployment's model): ship it beside
    the running one, restart the server on it, the others kept in ``standby/``, health-gate it.
    Returns the device's result (``state`` running, ``version``, ``sha256``, ``endpoint``,
    ``shipped``); raises :class:`~evc.errors.CommandFailed` with the reason when a step or the
    gate fails (the server is left stopped then: the caller switches back)."""
    where = str(device.get("name") or device.get("host"))

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
        await remote._check_python(conn, target, settings, spec, where)
        shipped = await _place(conn, target, settings, spec, where)
        if await _can_reload(conn, target, settings, spec):  # no restart: it answers throughout
            await _live(conn, target, settings, spec, where)
            mode = "reload"
        else:  # the server and its supervisor (a device that missed the first deployment has neither)
            await remote._put_server(conn, target, settings, spec, where, remote.bundle_bytes())
            await _to_standby(conn, target, settings, spec, where)
            await remote._start_server(conn, target, settings, spec, where)
            await remote._gate(conn, target, settings, spec, where, f" on version {spec.version}")
            mode = "restart"
        return {
            "state": "running", "version": spec.version, "sha256": spec.sha256, "reason": None,
            "endpoint": f"{target.host}:{spec.port}", "dir": spec.dir, "shipped": shipped, "switch": mode,
        }  # fmt: skip

    return await pooling.pool_for(settings).use(device, op)


__all__ = ["STANDBY", "standby_dir", "switch"]
