"""A deployment on one device, over SSH: ship the edge inference server and the model into
``~/.evc/deploy/<deployment>/``, verify the model's digest on the device, start the server
supervised in user space, health-gate it (ready + one smoke inference); and undo all that.

Layout on the device (``DIR`` = ``~/.evc/deploy/<deployment>``)::

    DIR/evc-edge-infer.pyz                        the edge server (evc/device/infer) as a zip app
    DIR/models/<name>/<version>/model.onnx        the model, its digest checked on the device
    DIR/models/<name>/<version>/model.json        {"sha256": ...}: the server serves nothing else
    DIR/supervise.sh                              start|stop|status: restarts the server if it dies
    DIR/server.log, DIR/server.pid, DIR/supervisor.pid

Where the account has a systemd manager, ``evc-infer-<deployment>.service`` runs ``supervise.sh
start`` at boot (:mod:`evc.deployments.boot`); removal disables it.

Everything runs with the deployment's Python (it needs numpy and onnxruntime); a device whose
Python lacks them fails with a reason a person can act on.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from evc import pool as pooling
from evc import ssh
from evc.deployments import boot
from evc.deployments import ship as shipping
from evc.errors import CommandFailed, ConnectionDropped
from evc.fl.channels import put_file, shell_path
from evc.settings import Settings
from evc.store import JSON

#: the folder of every deployment on a device, relative to the account's home
REMOTE_ROOT = ".evc/deploy"
BUNDLE = "evc-edge-infer.pyz"
#: the edge server's package name inside the bundle
BUNDLE_PACKAGE = "evc_edge_infer"
_BUNDLE_MAIN = f"""# EVC's edge inference server as a zip application: python {BUNDLE} --help
from {BUNDLE_PACKAGE}.cli import main

raise SystemExit(main())
"""
#: attempts at one device when its connection drops (each one resumes the model's upload)
SHIP_ATTEMPTS = 3
#: how long the server gets to answer ready after its start
READY_TIMEOUT_S = 30.0

#: the supervisor: POSIX sh; PY, PORT and the server's arguments are filled in (quoted)
SUPERVISE = r"""#!/bin/sh
# EVC's supervisor for one deployment's edge inference server (written by EVC; edits are undone).
#   supervise.sh start|stop|status|run
set -u
dir=$(cd "$(dirname "$0")" && pwd) || exit 1
spid=$dir/supervisor.pid
cpid=$dir/server.pid
log=$dir/server.log
alive() {  # the pid in file $1 when it is this deployment's (after a reboot it may be another's)
  p=$(cat "$1" 2>/dev/null) || return 1
  case "$p" in '' | *[!0-9]*) return 1 ;; esac
  kill -0 "$p" 2>/dev/null || return 1
  if [ -r "/proc/$p/cmdline" ] && ! tr '\0' ' ' <"/proc/$p/cmdline" | grep -qF "/${dir##*/}/"; then return 1; fi
  echo "$p"
}
stop_pid() {
  kill -TERM "$1" 2>/dev/null || return 0
  n=0
  while kill -0 "$1" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1 2>/dev/null || sleep 1; n=$((n + 1)); done
  kill -KILL "$1" 2>/dev/null || true
}
case "${1:-}" in
start)
  if alive "$spid" >/dev/null; then exit 0; fi
  : >"$log"
  if command -v setsid >/dev/null 2>&1; then
    setsid nohup sh "$dir/supervise.sh" run </dev/null >>"$log" 2>&1 &
  else
    nohup sh "$dir/supervise.sh" run </dev/null >>"$log" 2>&1 &
  fi
  echo $! >"$spid"
  ;;
run)
  child=
  trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; fi; rm -f "$cpid"; exit 0' TERM INT
  trap '' HUP
  while :; do
    __PY__ "$dir/__BUNDLE__" --models-dir "$dir/models" --host __HOST__ --port __PORT__ &
    child=$!
    echo "$child" >"$cpid"
    wait "$child"
    echo "$(date '+%Y-%m-%d %H:%M:%S') server exited with status $?; restarting in 2 s"
    sleep 2
  done
  ;;
stop)
  if p=$(alive "$spid"); then stop_pid "$p"; fi
  if p=$(alive "$cpid"); then stop_pid "$p"; fi
  rm -f "$spid" "$cpid"
  ;;
status)
  alive "$spid" && alive "$cpid"
  ;;
*)
  echo "usage: $0 start|stop|status|run" >&2
  exit 2
  ;;
esac
"""

#: run by the deployment's Python on the device: numpy and onnxruntime are there
_CHECK = "import onnxruntime, numpy; print(onnxruntime.__version__)"

#: the health gate, run by the deployment's Python on the device (stdin): waits for ready,
#: reads the model's inputs, sends zeros of their shapes, prints one JSON line
GATE = r"""
import json, sys, time, urllib.request, urllib.error
port, name, version, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
base = "http://127.0.0.1:%s" % port
def call(path, body=None):
    req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()
deadline, last = time.time() + timeout, "no answer"
while True:
    try:
        status, _ = call("/v2/health/ready")
        if status == 200:
            break
        last = "status %s" % status
    except urllib.error.HTTPError as e:
        last = "status %s: %s" % (e.code, e.read()[:300].decode("utf-8", "replace"))
    except Exception as e:
        last = str(e)
    if time.time() > deadline:
        print(json.dumps({"ok": False, "stage": "ready", "error": last})); sys.exit(0)
    time.sleep(0.3)
path = "/v2/models/%s/versions/%s" % (name, version)
try:
    meta = json.loads(call(path)[1])
    inputs = [{"name": i["name"], "datatype": i["datatype"],
               "shape": [d if d >= 0 else 1 for d in i["shape"]]} for i in meta["inputs"]]
    for i in inputs:
        n = 1
        for d in i["shape"]:
            n *= d
        i["data"] = [False] * n if i["datatype"] == "BOOL" else ([""] * n if i["datatype"] == "BYTES" else [0] * n)
    out = json.loads(call(path + "/infer", json.dumps({"inputs": inputs}).encode())[1])
    names = [o["name"] for o in out.get("outputs", [])]
    print(json.dumps({"ok": bool(names), "stage": "infer", "outputs": names,
                      "error": None if names else "the smoke inference returned no outputs"}))
except urllib.error.HTTPError as e:
    body = e.read()[:300].decode("utf-8", "replace")
    print(json.dumps({"ok": False, "stage": "infer", "error": "status %s: %s" % (e.code, body)}))
except Exception as e:
    print(json.dumps({"ok": False, "stage": "infer", "error": "%s: %s" % (type(e).__name__, e)}))
"""


def infer_source() -> Path:
    """The ``evc/device/infer`` package directory of this EVC installation."""
    return Path(__file__).resolve().parent.parent / "device" / "infer"


def bundle_bytes(source: Path | None = None) -> bytes:
    """The edge server as a zip application (stdlib + numpy + onnxruntime on the device). Pure;
    byte-identical for the same sources: sorted entries, fixed timestamps, stored."""
    src = source or infer_source()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        entries = [("__main__.py", _BUNDLE_MAIN.encode())]
        entries += [(f"{BUNDLE_PACKAGE}/{p.name}", p.read_bytes()) for p in sorted(src.glob("*.py"))]
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def remote_dir(deployment_id: str) -> str:
    return f"~/{REMOTE_ROOT}/{deployment_id}"


def supervise_script(python: str, port: int, host: str = "0.0.0.0", threads: int = 0) -> str:  # noqa: S104
    """The supervisor; *threads* > 0 sets ONNX Runtime's intra-op threads per model (0: its default)."""
    return (
        SUPERVISE.replace("__PY__", shell_path(python))
        .replace("__BUNDLE__", BUNDLE)
        .replace("__HOST__", shlex.quote(host))
        .replace("__PORT__", str(int(port)) + (f" --threads {int(threads)}" if threads else ""))
    )


def python_hint(python: str, where: str, error: str) -> str:
    """Why *python* on *where* cannot run the edge server (*error*: its last stderr line)."""
    if "No module named" in error:
        missing = "onnxruntime" if "onnxruntime" in error else ("numpy" if "numpy" in error else "a module")
        return (
            f"{python} on {where} has no {missing}; install onnxruntime and numpy for it "
            f"(pip install onnxruntime) or deploy with python set to an interpreter that has "
            f"them (`evc deploy --python`, POST /api/v1/deployments python) ({error})"
        )
    if "not found" in error or "No such file" in error:
        return f"{python} on {where} does not exist; deploy with python set to an interpreter the device has ({error})"
    return f"{python} on {where} cannot run the edge inference server: {error}"


@dataclass(frozen=True)
class Spec:
    """What one device gets: the deployment, the model (name, served version, bytes, digest),
    the Python that runs the server and its port."""

    deployment: str
    name: str
    version: str
    model: bytes
    sha256: str
    python: str
    port: int
    #: ONNX Runtime intra-op threads per model on the device (0: its default)
    threads: int = 0

    @property
    def dir(self) -> str:
        return remote_dir(self.deployment)

    @property
    def model_dir(self) -> str:
        return f"{self.dir}/models/{self.name}/{self.version}"


def _last_line(text: str, status: int | None) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"exit status {status}"


async def _run(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, cmd: str,
               input: str | None = None, timeout: float | None = None) -> asyncssh.SSHCompletedProcess:  # fmt: skip
    return await ssh.run(conn, cmd, target, settings, input=input, check=False, timeout=timeout)


async def _log_tail(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: Spec) -> str:
    res = await _run(conn, target, settings, f"tail -n 5 {shell_path(spec.dir + '/server.log')} 2>/dev/null")
    return " | ".join(x for x in str(res.stdout or "").strip().splitlines() if x.strip())


def _failed(target: ssh.Target, message: str) -> CommandFailed:
    return CommandFailed(message, device_id=target.device_id)


async def _check_python(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: Spec,
                        where: str) -> str:  # fmt: skip
    """Check that the deployment's Python runs the server (numpy, onnxruntime): onnxruntime's version."""
    res = await _run(conn, target, settings, f"{shell_path(spec.python)} -c {shlex.quote(_CHECK)}")
    if res.exit_status != 0:
        raise _failed(target, python_hint(spec.python, where, _last_line(str(res.stderr or ""), res.exit_status)))
    return str(res.stdout or "").strip()


async def _put_server(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: Spec,
                      where: str, bundle: bytes) -> None:  # fmt: skip
    """Stop what an earlier attempt left running, then ship the server and its supervisor."""
    await _run(conn, target, settings, f"sh {shell_path(spec.dir + '/supervise.sh')} stop 2>/dev/null; true")
    try:
        await put_file(conn, f"{spec.dir}/{BUNDLE}", bundle)
        await put_file(
            conn, f"{spec.dir}/supervise.sh", supervise_script(spec.python, spec.port, threads=spec.threads).encode()
        )
    except asyncssh.SFTPError as exc:
        raise _failed(target, f"cannot write to {spec.dir} on {where}: {exc.reason}") from exc


async def _ship_model(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: Spec,
                      where: str) -> None:  # fmt: skip
    """The model: resumable (a retry after a drop resumes the .part), digest-verified on the
    device; then its model.json."""
    payload = shipping.Payload(spec.model, spec.sha256)
    try:
        await shipping.ship(conn, target, settings, spec.python, f"{spec.model_dir}/model.onnx", payload)
    except shipping.DigestMismatch as exc:
        raise _failed(
            target, f"the model on {where} does not match sha256 {spec.sha256} after the upload (sha256 {exc.got})"
        ) from exc
    meta = {"sha256": spec.sha256, "name": spec.name, "version": spec.version, "deployment": spec.deployment}
    await put_file(conn, f"{spec.model_dir}/model.json", json.dumps(meta).encode())


async def _start_server(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: Spec,
                        where: str) -> None:  # fmt: skip
    res = await _run(conn, target, settings, f"sh {shell_path(spec.dir + '/supervise.sh')} start")
    if res.exit_status != 0:
        raise _failed(
            target, f"the edge server did not start on {where}: {_last_line(str(res.stderr or ''), res.exit_status)}"
        )


async def _gate(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, spec: Spec,
                where: str, what: str = "") -> None:  # fmt: skip
    """Health-gate the server (ready + one smoke inference); a failing one is stopped again and
    raises (*what* follows the stage in the message)."""
    args = " ".join(shlex.quote(str(a)) for a in (spec.port, spec.name, spec.version, READY_TIMEOUT_S))
    res = await _run(conn, target, settings, f"{shell_path(spec.python)} - {args}", input=GATE,
                     timeout=READY_TIMEOUT_S + settings.ssh_command_timeout_s)  # fmt: skip
    try:
        gate = json.loads(_last_line(str(res.stdout or ""), res.exit_status))
    except ValueError:
        gate = {"ok": False, "stage": "gate", "error": _last_line(str(res.stderr or ""), res.exit_status)}
    if not gate.get("ok"):
        log = await _log_tail(conn, target, settings, spec)
        await _run(conn, target, settings, f"sh {shell_path(spec.dir + '/supervise.sh')} stop; true")
        stage = "not ready" if gate.get("stage") == "ready" else "failed its smoke inference"
        raise _failed(
            target,
            f"the edge server on {where} {stage}{what}: {gate.get('error')}" + (f" (server log: {log})" if log else ""),
        )


async def install_and_start(settings: Settings, device: Mapping[str, Any], spec: Spec) -> JSON:
    """Deploy *spec* on *device*: returns the device's result (``state`` running, ``version``,
    ``sha256``, ``endpoint``). Raises :class:`~evc.errors.DeviceError` (CommandFailed with the
    reason) when any step fails; a server that started but failed its gate is stopped again."""
    where = str(device.get("name") or device.get("host"))
    bundle = bundle_bytes()

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
        ort_version = await _check_python(conn, target, settings, spec, where)
        await _put_server(conn, target, settings, spec, where, bundle)
        await _ship_model(conn, target, settings, spec, where)
        await _start_server(conn, target, settings, spec, where)
        await _gate(conn, target, settings, spec, where)
        on_boot = await boot.enable_process(conn, target, settings, spec.deployment, f"{REMOTE_ROOT}/{spec.deployment}")
        return {
            "state": "running", "version": spec.version, "sha256": spec.sha256,
            "endpoint": f"{target.host}:{spec.port}", "onnxruntime": ort_version, "dir": spec.dir,
            "on_boot": on_boot,
        }  # fmt: skip

    # a connection that drops (e.g. mid-upload) is retried at once: the upload resumes
    for attempt in range(1, SHIP_ATTEMPTS + 1):
        try:
            return await pooling.pool_for(settings).use(device, op)
        except ConnectionDropped:
            if attempt == SHIP_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def stop_and_remove(settings: Settings, device: Mapping[str, Any], deployment_id: str) -> JSON:
    """Stop the deployment's server on *device* and remove its folder (nothing there: fine)."""
    directory = shell_path(remote_dir(deployment_id))
    stop = f"if [ -f {directory}/supervise.sh ]; then sh {directory}/supervise.sh stop; fi; rm -rf {directory}"
    cmd = f"{boot.remove_unit_command(deployment_id)}; {stop}"

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
        res = await _run(conn, target, settings, cmd)
        if res.exit_status != 0:
            raise CommandFailed(
                f"cannot remove {remote_dir(deployment_id)} on {device.get('name') or target.address}: "
                f"{_last_line(str(res.stderr or ''), res.exit_status)}",
                device_id=target.device_id,
            )
        return {"state": "removed"}

    return await pooling.pool_for(settings).use(device, op)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = ["BUNDLE", "REMOTE_ROOT", "Spec", "bundle_bytes", "install_and_start", "remote_dir", "stop_and_remove"]
