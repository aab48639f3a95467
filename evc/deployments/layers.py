"""An image shipped to a device layer by layer: only the layers the device lacks cross the link.

On the controller the image is saved once as an OCI image layout (``podman save --format
oci-dir``: ``index.json``, ``oci-layout`` and ``blobs/sha256/<digest>``, layers gzip-compressed)
and kept in ``<data_dir>/images/<image id>.oci``. The layout's config lists each layer's
uncompressed digest (``rootfs.diff_ids``), which is what a device's podman reports of the
images it holds (``podman image inspect --format {{.RootFS.Layers}}``). So, on a device:

1. the device lists the layers of all its images (one command);
2. the manifest, the config and each layer whose ``diff_id`` is not among them are sent into
   ``~/.evc/images/<image id>.oci/blobs/sha256/`` with the resumable, digest-verified ship code
   (:mod:`evc.deployments.ship`: a blob's name is its sha256, so the check is the content
   address; a blob already there whole is not sent again);
3. ``index.json`` and ``oci-layout`` are written beside them, and the runtime loads the folder
   (as an ``oci-archive``: ``tar`` of those few files; podman 4 cannot name an image loaded from
   a folder under ``~/.evc``):
   podman takes the layers it has from its own store (a version that changes only its top
   layer sends that layer, the manifest and the config);
4. should the load refuse the partial layout (a layer the device got in another compression,
   e.g. pulled from a registry, that its store cannot match to this blob), every blob is sent
   and the load runs once more. The folder is removed after a load.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from evc import ssh
from evc.deployments import ship as shipping
from evc.errors import CommandFailed, ConfigError
from evc.fl.channels import shell_path
from evc.settings import Settings

#: lists the uncompressed digests of every layer of every image the device's runtime holds
_LIST = "{rt} images -q --no-trunc | sort -u | xargs -r {rt} image inspect --format '{{{{json .RootFS.Layers}}}}'"


@dataclass(frozen=True)
class Layout:
    """An OCI image layout of one image on the controller (read from its files)."""

    root: Path
    manifest: str  # the blobs' sha256 hex digests
    config: str
    layers: tuple[str, ...]
    diff_ids: tuple[str, ...]  # "sha256:<hex>" of each layer uncompressed, in the same order

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest

    def blobs(self) -> list[str]:
        return [self.manifest, self.config, *self.layers]


def _hex(digest: str) -> str:
    algo, _, value = digest.partition(":")
    if algo != "sha256" or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ConfigError(f"the image layout names a blob {digest!r}: only sha256 digests are shipped")
    return value


def read_layout(root: Path) -> Layout:
    """The one image of the layout at *root* (``podman save --format oci-dir``)."""
    index = json.loads((root / "index.json").read_text())
    manifests = index.get("manifests") or []
    if len(manifests) != 1:
        raise ConfigError(f"the image layout {root} holds {len(manifests)} images, not one")
    manifest = _hex(manifests[0]["digest"])
    man = json.loads((root / "blobs" / "sha256" / manifest).read_bytes())
    config = _hex(man["config"]["digest"])
    cfg = json.loads((root / "blobs" / "sha256" / config).read_bytes())
    layers = tuple(_hex(x["digest"]) for x in man.get("layers") or [])
    diff_ids = tuple(str(x) for x in (cfg.get("rootfs") or {}).get("diff_ids") or [])
    if len(diff_ids) != len(layers):
        raise ConfigError(f"the image layout {root}: {len(layers)} layers but {len(diff_ids)} diff_ids")
    return Layout(root, manifest, config, layers, diff_ids)


def parse_layers(text: str) -> set[str]:
    """The digests in :data:`_LIST`'s output (one JSON list per image; ``null`` for none). Pure."""
    out: set[str] = set()
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, list):
            out.update(str(x) for x in value)
    return out


def missing(layout: Layout, have: Iterable[str]) -> list[str]:
    """The blobs to send to a device that holds the layers *have* (uncompressed digests):
    the manifest, the config and every layer it lacks. Pure."""
    held = set(have)
    return [layout.manifest, layout.config,
            *[b for b, d in zip(layout.layers, layout.diff_ids, strict=True) if d not in held]]  # fmt: skip


@dataclass
class LayerShipment:
    """What one layered ship did: blobs and bytes sent, layers the device had, whether the
    partial load was refused (and everything was sent)."""

    blobs: int = 0
    sent_bytes: int = 0
    image_bytes: int = 0
    layers_reused: int = 0
    layers_sent: int = 0
    full_retry: bool = False
    sent: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {"sent_bytes": self.sent_bytes, "image_bytes": self.image_bytes, "layers_sent": self.layers_sent,
                "layers_reused": self.layers_reused, "full_retry": self.full_retry}  # fmt: skip


def _index(layout: Layout, ref: str) -> str:
    size = layout.blob(layout.manifest).stat().st_size
    return json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{layout.manifest}",
        "size": size, "annotations": {"org.opencontainers.image.ref.name": ref}}]})  # fmt: skip


async def device_layers(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings,
                        rt: str) -> set[str]:  # fmt: skip
    """The uncompressed digests of the layers of the images the device's *rt* holds."""
    res = await ssh.run(conn, _LIST.format(rt=rt), target, settings, check=False)
    return parse_layers(str(res.stdout or "")) if res.exit_status == 0 else set()


async def _send(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, python: str,
                layout: Layout, remote: str, blobs: list[str], report: LayerShipment) -> None:  # fmt: skip
    for digest in blobs:
        payload = shipping.Payload(layout.blob(digest).read_bytes())
        if payload.sha256 != digest:
            raise ConfigError(f"the blob {digest[:12]} in {layout.root} is damaged: remove that folder (made again)")
        st = await shipping.ship(conn, target, settings, python, f"{remote}/blobs/sha256/{digest}", payload)
        report.blobs += 1
        report.sent_bytes += st.sent
        report.sent.append(digest)


async def ship_image(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, rt: str,
                     layout: Layout, ref: str, python: str, remote: str, timeout: float) -> LayerShipment:  # fmt: skip
    """Send what the device lacks of *layout* into the folder *remote* (``~/...``) and load it
    with *rt*; see the module doc. Raises :class:`~evc.errors.CommandFailed` when it does not load."""
    have = await device_layers(conn, target, settings, rt)
    todo = missing(layout, have)
    report = LayerShipment(image_bytes=sum(layout.blob(b).stat().st_size for b in layout.blobs()))
    report.layers_sent = len(todo) - 2
    report.layers_reused = len(layout.layers) - report.layers_sent
    await _send(conn, target, settings, python, layout, remote, todo, report)
    folder = shell_path(remote)
    head = (f"printf '%s' {shlex.quote(_index(layout, ref))} > {folder}/index.json && "
            f"printf '%s' '{{\"imageLayoutVersion\": \"1.0.0\"}}' > {folder}/oci-layout")  # fmt: skip
    # podman 4 names an image loaded from a folder after the folder's path (refused when a part of
    # it starts with a dot, as ~/.evc): an oci-archive of the layout's few files is loaded instead
    tar = shell_path(remote + ".tar")
    load = (f"{head} && tar -C {folder} -cf {tar} oci-layout index.json blobs && {rt} load -q -i {tar} >/dev/null; "
            f"rc=$?; rm -f {tar}; exit $rc")  # fmt: skip
    res = await ssh.run(conn, load, target, settings, check=False, timeout=timeout)
    if res.exit_status != 0 and len(todo) < len(layout.blobs()):
        report.full_retry = True
        rest = [b for b in layout.blobs() if b not in todo]
        await _send(conn, target, settings, python, layout, remote, rest, report)
        report.layers_sent, report.layers_reused = len(layout.layers), 0
        res = await ssh.run(conn, load, target, settings, check=False, timeout=timeout)
    await ssh.run(conn, f"rm -rf {folder}", target, settings, check=False)
    if res.exit_status != 0:
        err = [x for x in str(res.stderr or "").splitlines() if x.strip()]
        raise CommandFailed(f"{rt} on {target.address} cannot load the image's layers: "
                            f"{' | '.join(err)[-1500:] if err else f'exit status {res.exit_status}'}",
                            device_id=target.device_id)  # fmt: skip
    return report


__all__ = ["LayerShipment", "Layout", "device_layers", "missing", "parse_layers", "read_layout", "ship_image"]
