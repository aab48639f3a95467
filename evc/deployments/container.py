"""A deployment on one device as a container (runtime ``container``), over SSH: the edge
inference server's image (deploy/edge/Dockerfile, ``scripts/build-edge-images``) run by the
device's podman or docker, with the model folder mounted read-only.

On each device, in one SSH connection:

1. the runtime: the first of podman and docker that answers for the device's account (``info``),
   else the device fails with a reason a person can act on (run the ``container-runtime``
   playbook, or deploy with runtime ``process``);
2. the image, by its id (the sha256 of its configuration, the same wherever it came from):
   already there; else pulled from the registry the reference names (digest-pinned where the
   reference carries ``@sha256:``); else, where the device cannot pull (no registry, another
   network, a ``localhost/`` reference), shipped over SSH: ``podman save`` on the controller
   (once per image, kept in ``<data_dir>/images``), the archive sent with the resumable,
   digest-verified ship code (:mod:`evc.deployments.ship`) and ``load``-ed on the device; to
   podman, layer by layer: only the layers the device's images lack (:mod:`evc.deployments.layers`);
3. the model, into ``~/.evc/deploy/<deployment>/models/<name>/<version>/`` as for runtime
   ``process`` (shipped, digest-verified on the device);
4. the container ``evc-infer-<deployment>``: ``--network host`` (the deployment's port on the
   device), the models folder at ``/models`` read-only, ``--restart always`` (started at boot
   where systemd can, :mod:`evc.deployments.boot`), replaced when it exists; then the same
   health gate as a process (ready + one smoke inference, run by the device's Python: the
   standard library only). A container failing its gate is removed.

Rollouts (:func:`switch`) place the new version beside the running one like
:mod:`evc.deployments.switch` and replace the container; removal (:func:`stop_and_remove`)
removes the container and the folder. The images stay on the device (a later deployment
reuses them).
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from evc import __version__, ssh
from evc import pool as pooling
from evc.deployments import boot, layers, remote
from evc.deployments import ship as shipping
from evc.deployments import switch as switching
from evc.errors import CommandFailed, ConfigError, ConnectionDropped
from evc.fl.channels import shell_path
from evc.settings import Settings
from evc.store import JSON, Store

#: the container runtimes tried on a device, in this order
RUNTIMES = ("podman", "docker")
#: image archives shipped to a device wait here (relative to the home) until loaded
REMOTE_IMAGES = ".evc/images"
#: how long a pull (or a load) on a device may take
PULL_TIMEOUT_S = 300.0
#: what a device's deployment may take beyond a process's: a pull, or a ship and a load (the
#: archive over a slow link: ~130 MB at 5 Mbit/s is 210 s)
DELIVERY_TIMEOUT_S = 600.0

#: prints the first runtime that answers for this account; the others' complaints on stderr
_DETECT = """for rt in {runtimes}; do
  command -v "$rt" >/dev/null 2>&1 || continue
  if err=$("$rt" info 2>&1 >/dev/null); then echo "$rt"; exit 0; fi
  echo "$rt is installed but does not answer for $(id -un): $(printf '%s' "$err" | tail -n 1)" >&2
done
exit 3"""


def default_image(settings: Settings) -> str:
    """The edge server's image reference: ``edge_image``, else the one scripts/build-edge-images tags."""
    return settings.edge_image or f"localhost/evc-edge-infer:{__version__}"


def container_name(deployment_id: str) -> str:
    return f"evc-infer-{deployment_id}"


def pullable(ref: str) -> bool:
    """Whether *ref* names a registry a device could pull from (``localhost/...`` does not)."""
    first = ref.split("/", 1)[0]
    return "/" in ref and first != "localhost" and ("." in first or ":" in first)


# ---------------------------------------------------------------------- the controller's side
def _podman(args: list[str], timeout: float = PULL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise ConfigError(
            "runtime container needs podman where EVC's workers run (to read and ship the edge image): "
            "install it (apt-get install podman)"
        ) from exc


@dataclass
class Image:
    """The edge server's image as a deployment job sees it: the reference devices pull, the id
    that runs (the sha256 of its configuration), and its archive, made once when a device needs it."""

    ref: str
    id: str
    tls_verify: bool
    archive_dir: Path
    _payload: shipping.Payload | None = field(default=None, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _layout: layers.Layout | None = field(default=None, repr=False)
    #: what each device it was shipped to got, layer by layer (device id -> LayerShipment.as_json)
    shipped: dict[str, JSON] = field(default_factory=dict, repr=False)

    async def layout(self) -> layers.Layout:
        """The image as an OCI layout (``podman save --format oci-dir``), kept in ``archive_dir`` by id."""
        async with self._lock:
            if self._layout is None:
                path = await asyncio.to_thread(self._save, "oci-dir", ".oci")
                self._layout = layers.read_layout(path)
            return self._layout

    async def payload(self) -> shipping.Payload:
        """The image as an OCI archive (``podman save``), cached in ``archive_dir`` by id."""
        async with self._lock:
            if self._payload is None:
                path = await asyncio.to_thread(self._save, "oci-archive", ".tar")
                self._payload = shipping.Payload(path.read_bytes())
            return self._payload

    def _save(self, fmt: str, suffix: str) -> Path:
        try:
            return save(self.id, fmt, self.archive_dir / f"{self.id}{suffix}")
        except ConfigError as exc:
            raise ConfigError(f"cannot save the edge image {self.ref} to ship it: {exc}") from exc


def save(image: str, fmt: str, path: Path) -> Path:
    """``podman save --format FMT`` of *image* to *path* (a file, or a folder for ``oci-dir``),
    unless it is there already; written beside it first (``<path>-part``, which pruning leaves
    alone) and renamed into place whole. Raises :class:`~evc.errors.ConfigError` with podman's
    complaint."""
    done = path / "index.json" if fmt == "oci-dir" else path
    if done.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + "-part")
    if part.is_dir():
        shutil.rmtree(part)
    else:
        part.unlink(missing_ok=True)
    res = _podman(["save", "--format", fmt, "-o", str(part), image])
    if res.returncode != 0:
        raise ConfigError(res.stderr.strip()[-500:] or f"podman save exited with {res.returncode}")
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    part.rename(path)
    return path


def tagged_archive(ref: str, folder: Path) -> Path | None:
    """The controller's image *ref* as a ``docker-archive`` (which keeps its name, so that a
    device's ``load`` gives it back under *ref*) in *folder*, by image id, made once; the older
    archives in *folder* are removed. None when the controller has no podman or no such image.
    For images that playbooks run by name (the exporter's), where devices cannot pull *ref*."""
    try:
        res = _podman(["image", "inspect", "--format", "{{.Id}}", ref], timeout=60)
    except ConfigError:
        return None
    if res.returncode != 0:
        return None
    image_id = res.stdout.strip().removeprefix("sha256:")
    path = save(ref, "docker-archive", folder / f"{image_id}.tar")
    for old in folder.glob("*.tar"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def prune_archives(store: Store, settings: Settings) -> list[str]:
    """Remove the shipped images in ``<data_dir>/images`` that no deployment references (by
    ``image_id``): archives (``<id>.tar``) and OCI layouts (``<id>.oci/``); the ids removed. Saves
    in progress (``.tar-part``, ``.oci-part``) are left alone. The folder is listed before the
    references are read: an image a deploy job saves meanwhile belongs to an image its record
    already names."""
    folder = settings.data_dir / "images"
    entries = sorted(p for p in folder.iterdir() if p.suffix in (".tar", ".oci")) if folder.is_dir() else []
    if not entries:
        return []
    used = {str(d.get("image_id") or "") for d in store.deployment_records()}
    removed = []
    for path in entries:
        if path.stem in used:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if path.stem not in removed:
            removed.append(path.stem)
    return removed


def resolve(settings: Settings, ref: str | None = None) -> Image:
    """The image *ref* (default :func:`default_image`) on the controller: pulled there when
    absent. Raises :class:`~evc.errors.ConfigError` when it is nowhere to be had."""
    ref = ref or default_image(settings)
    tls = f"--tls-verify={'true' if settings.edge_image_tls_verify else 'false'}"
    res = _podman(["image", "inspect", "--format", "{{.Id}}", ref])
    if res.returncode != 0 and pullable(ref):
        pulled = _podman(["pull", "--quiet", tls, ref])
        if pulled.returncode != 0:
            raise ConfigError(f"cannot pull the edge image {ref}: {pulled.stderr.strip()[-500:]}")
        res = _podman(["image", "inspect", "--format", "{{.Id}}", ref])
    if res.returncode != 0:
        raise ConfigError(
            f"no edge image {ref} where EVC's workers run: build it (scripts/build-edge-images [--push REGISTRY]) "
            "or set edge_image (EVC_EDGE_IMAGE) to one in a registry"
        )
    return Image(ref, res.stdout.strip().removeprefix("sha256:"), settings.edge_image_tls_verify,
                 settings.data_dir / "images")  # fmt: skip


# ---------------------------------------------------------------------- the device's side
async def _run(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, cmd: str,
               timeout: float | None = None) -> asyncssh.SSHCompletedProcess:  # fmt: skip
    return await ssh.run(conn, cmd, target, settings, check=False, timeout=timeout)


def _err(res: asyncssh.SSHCompletedProcess) -> str:
    return remote._last_line(str(res.stderr or ""), res.exit_status)


async def detect(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, where: str) -> str:
    """The container runtime that answers for the device's account: podman or docker."""
    res = await _run(conn, target, settings, _DETECT.format(runtimes=" ".join(RUNTIMES)))
    rt = str(res.stdout or "").strip()
    if res.exit_status == 0 and rt in RUNTIMES:
        return rt
    why = "; ".join(x for x in str(res.stderr or "").strip().splitlines() if x.strip())
    raise CommandFailed(
        f"no container runtime (podman or docker) usable by the account on {where}"
        + (f" ({why})" if why else " (neither is installed)")
        + ": run the container-runtime playbook on it (profile container), or deploy with runtime process",
        device_id=target.device_id,
    )


async def _has(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, rt: str, image: Image,
               ) -> bool:  # fmt: skip
    res = await _run(conn, target, settings, f"{rt} image inspect sha256:{image.id} >/dev/null 2>&1")
    return res.exit_status == 0


async def _ship_image(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, rt: str,
                      image: Image, python: str, where: str) -> None:  # fmt: skip
    """Ship the image's archive (resumable, digest-verified) and load it; to podman, only the
    layers the device lacks (:mod:`evc.deployments.layers`)."""
    if rt == "podman":
        remote_dir = f"~/{REMOTE_IMAGES}/{image.id}.oci"
        got = await layers.ship_image(conn, target, settings, rt, await image.layout(), image.ref, python, remote_dir,
                                      PULL_TIMEOUT_S)  # fmt: skip
        image.shipped[str(target.device_id)] = got.as_json()
        return
    dest = f"~/{REMOTE_IMAGES}/{image.id}.tar"
    payload = await image.payload()
    try:
        await shipping.ship(conn, target, settings, python, dest, payload)
    except shipping.DigestMismatch as exc:
        raise CommandFailed(f"the edge image's archive on {where} does not match after the upload (sha256 "
                            f"{exc.got})", device_id=target.device_id) from exc  # fmt: skip
    load = f"{rt} load -q -i {shell_path(dest)} >/dev/null && rm -f {shell_path(dest)}"
    res = await _run(conn, target, settings, load, timeout=PULL_TIMEOUT_S)
    if res.exit_status != 0:
        raise CommandFailed(f"{rt} on {where} cannot load the edge image: {_err(res)}", device_id=target.device_id)


async def ensure_image(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, rt: str,
                       image: Image, python: str, where: str) -> str:  # fmt: skip
    """Make the image present on the device: ``present``, ``pull`` or ``ship`` (how it came)."""
    if await _has(conn, target, settings, rt, image):
        return "present"
    if pullable(image.ref):
        tls = "" if rt != "podman" else f" --tls-verify={'true' if image.tls_verify else 'false'}"
        res = await _run(conn, target, settings, f"{rt} pull -q{tls} {shlex.quote(image.ref)} >/dev/null",
                         timeout=PULL_TIMEOUT_S)  # fmt: skip
        if res.exit_status == 0 and await _has(conn, target, settings, rt, image):
            return "pull"
    await _ship_image(conn, target, settings, rt, image, python, where)
    if not await _has(conn, target, settings, rt, image):
        raise CommandFailed(f"the edge image {image.id[:12]} is not on {where} after loading it",
                            device_id=target.device_id)  # fmt: skip
    return "ship"


def run_command(rt: str, spec: remote.Spec, image: Image) -> str:
    """The shell command that (re)starts the deployment's container on the device. Pure."""
    name = container_name(spec.deployment)
    models = f"{shell_path(spec.dir + '/models')}:/models:ro"
    args = [
        "run", "--detach", "--name", name, "--label", f"evc.deployment={spec.deployment}",
        "--restart", "always", "--network", "host",
    ]  # fmt: skip
    server = ["--models-dir", "/models", "--host", "0.0.0.0", "--port", str(int(spec.port))]  # noqa: S104
    return (
        f"{rt} rm -f {name} >/dev/null 2>&1; "
        f"{rt} {' '.join(shlex.quote(a) for a in args)} --volume {models} sha256:{image.id} "
        f"{' '.join(shlex.quote(a) for a in server)}"
    )


async def _start(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, rt: str,
                 spec: remote.Spec, image: Image, where: str, what: str = "") -> str:  # fmt: skip
    """Run the container and health-gate it; a failing one is removed again (its log in the
    reason). Returns what starts it at boot (:func:`evc.deployments.boot.enable`)."""
    name = container_name(spec.deployment)
    res = await _run(conn, target, settings, run_command(rt, spec, image))
    if res.exit_status != 0:
        raise CommandFailed(f"{rt} on {where} cannot start the edge server's container: {_err(res)}",
                            device_id=target.device_id)  # fmt: skip
    try:
        await remote._gate(conn, target, settings, spec, where, what)
    except CommandFailed as exc:
        logs = await _run(conn, target, settings, f"{rt} logs --tail 5 {name} 2>&1")
        await _run(conn, target, settings, f"{rt} rm -f {name} >/dev/null 2>&1")
        tail = " | ".join(x for x in str(logs.stdout or "").strip().splitlines() if x.strip())
        raise CommandFailed(str(exc) + (f" (container log: {tail})" if tail else ""),
                            device_id=target.device_id) from exc  # fmt: skip
    return await boot.enable(conn, target, settings, rt)


def _result(rt: str, spec: remote.Spec, image: Image, target: ssh.Target, delivery: str, took: float) -> JSON:
    return {
        "state": "running", "version": spec.version, "sha256": spec.sha256,
        "endpoint": f"{target.host}:{spec.port}", "dir": spec.dir, "runtime": rt,
        "container": container_name(spec.deployment), "image": image.ref, "image_id": image.id,
        "delivery": delivery, "image_s": round(took, 2),
        **({"image_shipped": image.shipped[key]} if (key := str(target.device_id)) in image.shipped else {}),
    }  # fmt: skip


async def _retrying(settings: Settings, device: Mapping[str, Any], op: pooling.Operation[JSON]) -> JSON:
    """*op* on the device; a connection that drops (e.g. mid-upload) is retried: uploads resume."""
    for attempt in range(1, remote.SHIP_ATTEMPTS + 1):
        try:
            return await pooling.pool_for(settings).use(device, op)
        except ConnectionDropped:
            if attempt == remote.SHIP_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def install_and_start(settings: Settings, device: Mapping[str, Any], spec: remote.Spec, image: Image) -> JSON:
    """Deploy *spec* on *device* as a container of *image*: the device's result (``state``
    running, ``version``, ``endpoint``, ``container``, ``delivery`` ...). Raises
    :class:`~evc.errors.DeviceError` with the reason when a step or the gate fails."""
    where = str(device.get("name") or device.get("host"))

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
        rt = await detect(conn, target, settings, where)
        started = time.monotonic()
        delivery = await ensure_image(conn, target, settings, rt, image, spec.python, where)
        took = time.monotonic() - started
        await remote._ship_model(conn, target, settings, spec, where)
        on_boot = await _start(conn, target, settings, rt, spec, image, where)
        return {**_result(rt, spec, image, target, delivery, took), "on_boot": on_boot}

    return await _retrying(settings, device, op)


async def switch(settings: Settings, device: Mapping[str, Any], spec: remote.Spec, image: Image) -> JSON:
    """One device of a rollout: place *spec*'s model beside the running one (the others to
    ``standby/``, as :func:`evc.deployments.switch.switch`), replace the container, gate it."""
    where = str(device.get("name") or device.get("host"))

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
        rt = await detect(conn, target, settings, where)
        started = time.monotonic()
        delivery = await ensure_image(conn, target, settings, rt, image, spec.python, where)
        took = time.monotonic() - started
        shipped = await switching._place(conn, target, settings, spec, where)
        await switching._to_standby(conn, target, settings, spec, where)
        on_boot = await _start(conn, target, settings, rt, spec, image, where, f" on version {spec.version}")
        return {**_result(rt, spec, image, target, delivery, took), "shipped": shipped, "on_boot": on_boot}

    return await _retrying(settings, device, op)


async def stop_and_remove(settings: Settings, device: Mapping[str, Any], deployment_id: str) -> JSON:
    """Remove the deployment's container (whichever runtime runs it) and its folder."""
    name = container_name(deployment_id)
    directory = shell_path(remote.remote_dir(deployment_id))
    cmd = (
        f"left=; for rt in {' '.join(RUNTIMES)}; do command -v $rt >/dev/null 2>&1 || continue; "
        f"$rt rm -f {name} >/dev/null 2>&1; "
        f'if $rt container inspect {name} >/dev/null 2>&1; then left="$left $rt"; fi; done; '
        f'if [ -n "$left" ]; then echo "the container {name} is still there ($left)" >&2; exit 1; fi; '
        f"rm -rf {directory}"
    )

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
        res = await _run(conn, target, settings, cmd)
        if res.exit_status != 0:
            raise CommandFailed(f"cannot remove {name} on {device.get('name') or target.address}: {_err(res)}",
                                device_id=target.device_id)  # fmt: skip
        return {"state": "removed"}

    return await pooling.pool_for(settings).use(device, op)


__all__ = [
    "RUNTIMES", "Image", "container_name", "default_image", "detect", "ensure_image", "install_and_start",
    "pullable", "resolve", "run_command", "stop_and_remove", "switch",
]  # fmt: skip
