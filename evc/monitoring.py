"""Monitoring plumbing: the edge exporter bundle the ``exporter`` playbook ships, the exporter record
it leaves on a device, and the Prometheus HTTP service-discovery target list built from the registry.

:func:`exporter_bundle` packs ``evc/device/exporter`` (stdlib and prometheus_client only) as one zip
application, ``evc_edge_exporter`` inside, so that the playbook copies one file (one checksum,
replaced atomically) and the device runs ``python evc-edge-exporter.pyz --port 9110``.

A device is *monitored* once the ``exporter`` playbook succeeded on it: the provisioning service
then calls :func:`record_exporter`, which stores ``exporter = {"port", "listen", "mode",
"node_exporter"}`` on the device record (``state: absent`` clears it). ``GET
/api/v1/prometheus/targets`` answers with :func:`discovery_targets`: one target group per
monitored device, so a device appears when it is monitored and disappears when it is removed.

Target labels (plain labels; Prometheus adds them to every series it scrapes from the target):

- ``device``: the device's name, the label ``evc_device_up`` and the dashboards use;
- ``device_id``: EVC's id of the device;
- ``cluster``: the device's cluster id or "", the same value ``evc_device_up{cluster}`` carries,
  so that fleet and exporter series join and the dashboards' ``$cluster`` filter matches both;
- ``cluster_name``: the cluster's name or "";
- ``profile``: the cluster's profile (direct, container, k3s, k8s) or "";
- ``arch``: the device's CPU architecture from its facts, or "";
- ``state``: the device's state when Prometheus last refreshed the list.

``?exporter=infer`` lists the edge inference servers of the deployments instead: one target group
per device where a deployment is ``running`` (its endpoint ``host:port``, ``/metrics``), labelled
``deployment``, ``model``, ``version`` (the version served, ``<version>-<variant>`` for a
variant), ``device``, ``device_id``, ``cluster`` and ``cluster_name``.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from evc.errors import NotFound

if TYPE_CHECKING:
    from evc.settings import Settings

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Exporter = Literal["evc", "node", "infer"]

#: the exporters a target list can name: EVC's edge exporter, prometheus-node-exporter, and the
#: edge inference servers of running deployments
EXPORTERS: tuple[Exporter, ...] = ("evc", "node", "infer")
DEFAULT_PORT = 9110
DEFAULT_NODE_EXPORTER_PORT = 9100
#: listen addresses that mean "every interface": Prometheus reaches the device at its host
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - compared, not bound
#: the device fields target groups are built from (device_fields reads only these)
DEVICE_FIELDS = ("name", "host", "state", "cluster_id", "facts", "exporter")


#: the exporter's package name inside the bundle (and in tests/fixtures/prometheus.py)
BUNDLE_PACKAGE = "evc_edge_exporter"
_BUNDLE_MAIN = f"""# EVC's edge exporter as a zip application: python evc-edge-exporter.pyz --help
from {BUNDLE_PACKAGE}.cli import main

raise SystemExit(main())
"""


class DiscoveryStore(Protocol):
    """What :func:`discovery_targets` and :func:`record_exporter` need from the store."""

    def device_fields(self, ids: Iterable[str] | None, fields: Sequence[str]) -> list[JSON]: ...

    def get_cluster(self, cluster_id: str) -> Mapping[str, Any]: ...

    def update_device(self, device_id: str, **changes: Any) -> Mapping[str, Any]: ...

    def deployment_ids(self, offset: int = 0, limit: int | None = None) -> tuple[list[str], int]: ...

    def get_deployment(self, deployment_id: str) -> Mapping[str, Any]: ...

    def deployment_devices(self, deployment_id: str) -> Mapping[str, Mapping[str, Any]]: ...


# --- what the exporter playbook ships -----------------------------------------------------------


def exporter_source() -> Path:
    """The ``evc/device/exporter`` package directory of this EVC installation."""
    return Path(__file__).resolve().parent / "device" / "exporter"


def client_library_source() -> Path:
    """The ``prometheus_client`` package directory of this EVC installation (pure Python)."""
    import prometheus_client

    return Path(prometheus_client.__file__).resolve().parent


def bundle_bytes(source: Path | None = None, client_source: Path | None = None) -> bytes:
    """The zip application of the exporter package at *source*, carrying the controller's own
    ``prometheus_client`` (pure Python), so a device needs nothing but python3 — no download, no
    OS package, whatever the account may install. Pure; byte-identical for the same sources:
    sorted entries, fixed timestamps and modes, stored uncompressed."""
    src = source or exporter_source()
    lib = client_source or client_library_source()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        entries = [("__main__.py", _BUNDLE_MAIN.encode())]
        entries += [(f"{BUNDLE_PACKAGE}/{p.name}", p.read_bytes()) for p in sorted(src.glob("*.py"))]
        entries += [
            (f"prometheus_client/{p.relative_to(lib).as_posix()}", p.read_bytes())
            for p in sorted(lib.rglob("*.py"))
            if "__pycache__" not in p.parts
        ]
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def exporter_bundle(cache_dir: Path, source: Path | None = None) -> Path:
    """The exporter's zip application in *cache_dir* (EVC's private data), named by its content,
    written once (atomically: concurrent jobs may build it at the same time)."""
    data = bundle_bytes(source)
    path = Path(cache_dir) / f"evc-edge-exporter-{hashlib.sha256(data).hexdigest()[:16]}.pyz"
    if path.is_file() and path.stat().st_size == len(data):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bundle-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- the record the exporter playbook leaves ----------------------------------------------------


def exporter_record(values: Mapping[str, Any]) -> JSON | None:
    """The device's ``exporter`` field after a successful ``exporter`` run with *values* (the
    playbook's validated variables); None when the run removed the exporter (``state: absent``)."""
    if values.get("state", "present") == "absent":
        return None
    node = bool(values.get("node_exporter"))
    return {
        "port": int(values.get("exporter_port") or DEFAULT_PORT),
        "listen": str(values.get("listen") or "0.0.0.0"),  # noqa: S104 - the exporter's default
        "mode": str(values.get("mode") or "auto"),
        "node_exporter": (
            {"port": int(values.get("node_exporter_port") or DEFAULT_NODE_EXPORTER_PORT)} if node else None
        ),
    }


def exporter_image_archive(settings: Settings, values: JSON) -> JSON:
    """The ``exporter`` playbook's variables, with ``image_archive`` set (when it is not) to the
    controller's archive of ``image`` in mode container when devices cannot pull that image
    (``localhost/...``, what scripts/build-edge-images tags): saved once per image id in
    ``<data_dir>/images/exporter/``, copied to each device and loaded where the image is absent.
    Unchanged when the controller has no such image (the device may hold it)."""
    from evc.deployments.container import pullable, tagged_archive

    image = str(values.get("image") or "")
    if values.get("mode") != "container" or values.get("image_archive") or not image or pullable(image):
        return dict(values)
    path = tagged_archive(image, settings.data_dir / "images" / "exporter")
    return {**values, "image_archive": str(path)} if path else dict(values)


def record_exporter(store: DiscoveryStore, device_id: str, values: Mapping[str, Any]) -> None:
    """Mark *device_id* monitored (or no longer monitored) after the ``exporter`` playbook
    succeeded on it; the provisioning service's per-playbook success hook. A device removed
    while the job ran stays removed."""
    try:
        store.update_device(device_id, exporter=exporter_record(values))
    except NotFound:
        log.info("device %s was removed while its exporter was provisioned", device_id)


# --- HTTP service discovery ---------------------------------------------------------------------


def _address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def scrape_host(device: Mapping[str, Any], listen: str) -> str:
    """Where Prometheus reaches an exporter listening on *listen*: the device's host, unless the
    exporter is bound to one specific, non-loopback address (a VPN or management interface)."""
    host = str(device.get("host") or "")
    if listen in _WILDCARDS:
        return host
    try:
        if ipaddress.ip_address(listen).is_loopback:
            return host
    except ValueError:
        return host
    return listen


def target_port(record: Mapping[str, Any], exporter: Exporter) -> int | None:
    """The port of *exporter* in a device's exporter record; None when it is not installed."""
    if exporter == "evc":
        return int(record.get("port") or DEFAULT_PORT)
    node = record.get("node_exporter")
    if not node:
        return None
    return int((node if isinstance(node, Mapping) else {}).get("port") or DEFAULT_NODE_EXPORTER_PORT)


def target_groups(
    devices: Iterable[Mapping[str, Any]],
    clusters: Mapping[str, Mapping[str, Any]],
    exporter: Exporter = "evc",
) -> list[JSON]:
    """Prometheus HTTP SD target groups for the monitored *devices* (pure).

    *clusters* maps cluster ids to cluster records (name, profile); a device of an unknown
    cluster keeps its cluster id with an empty name and profile. Devices without an exporter
    record, or without *exporter*, are left out; the list is sorted by device name."""
    groups: list[tuple[str, JSON]] = []
    for dev in devices:
        record = dev.get("exporter")
        if not isinstance(record, Mapping) or not dev.get("host"):
            continue
        port = target_port(record, exporter)
        if port is None:
            continue
        cluster_id = str(dev.get("cluster_id") or "")
        cluster = clusters.get(cluster_id) or {}
        facts = dev.get("facts") or {}
        name = str(dev.get("name") or dev.get("id") or "")
        labels = {
            "device": name,
            "device_id": str(dev.get("id") or ""),
            "cluster": cluster_id,
            "cluster_name": str(cluster.get("name") or ""),
            "profile": str(cluster.get("profile") or ""),
            "arch": str(facts.get("arch") or "") if isinstance(facts, Mapping) else "",
            "state": str(dev.get("state") or ""),
        }
        host = scrape_host(dev, str(record.get("listen") or ""))
        groups.append((name, {"targets": [_address(host, port)], "labels": labels}))
    return [g for _, g in sorted(groups, key=lambda item: item[0])]


def infer_target_groups(
    deployments: Iterable[tuple[Mapping[str, Any], Mapping[str, Mapping[str, Any]]]],
    devices: Mapping[str, Mapping[str, Any]],
    clusters: Mapping[str, Mapping[str, Any]],
) -> list[JSON]:
    """Prometheus HTTP SD target groups for the edge inference servers (pure).

    *deployments* are (deployment record, device id -> that device's deployment state) pairs;
    *devices* maps device ids to device records (name, cluster). A device is listed where its
    state is ``running`` with an endpoint; the list is sorted by deployment, then device name."""
    groups: list[tuple[tuple[str, str], JSON]] = []
    for dep, states in deployments:
        for device_id, st in states.items():
            endpoint = str(st.get("endpoint") or "")
            if st.get("state") != "running" or not endpoint:
                continue
            dev = devices.get(device_id) or {}
            cluster_id = str(dev.get("cluster_id") or dep.get("cluster") or "")
            name = str(dev.get("name") or device_id)
            labels = {
                "deployment": str(dep.get("id") or ""),
                "model": str(dep.get("model") or ""),
                "version": str(st.get("version") or dep.get("served_version") or dep.get("version") or ""),
                "device": name,
                "device_id": device_id,
                "cluster": cluster_id,
                "cluster_name": str((clusters.get(cluster_id) or {}).get("name") or ""),
            }
            groups.append(((labels["deployment"], name), {"targets": [endpoint], "labels": labels}))
    return [g for _, g in sorted(groups, key=lambda item: item[0])]


def _clusters(store: DiscoveryStore, ids: Iterable[str]) -> dict[str, Mapping[str, Any]]:
    clusters: dict[str, Mapping[str, Any]] = {}
    for cluster_id in set(ids):
        try:
            clusters[cluster_id] = store.get_cluster(cluster_id)
        except NotFound:
            pass
    return clusters


def _infer_targets(store: DiscoveryStore) -> list[JSON]:
    deployments = []
    for dep_id in store.deployment_ids()[0]:
        try:
            deployments.append((store.get_deployment(dep_id), store.deployment_devices(dep_id)))
        except NotFound:  # removed while the list was read
            continue
    wanted = {d for _, states in deployments for d in states}
    devices = {str(d["id"]): d for d in store.device_fields(sorted(wanted), ("name", "cluster_id")) if d}
    clusters = _clusters(store, (str(d["cluster_id"]) for d in devices.values() if d.get("cluster_id")))
    return infer_target_groups(deployments, devices, clusters)


def discovery_targets(store: DiscoveryStore, exporter: Exporter = "evc") -> list[JSON]:
    """The target list ``GET /api/v1/prometheus/targets`` serves, read from the store."""
    if exporter == "infer":
        return _infer_targets(store)
    devices = [d for d in store.device_fields(None, DEVICE_FIELDS) if d.get("exporter")]
    clusters = _clusters(store, (str(d["cluster_id"]) for d in devices if d.get("cluster_id")))
    return target_groups(devices, clusters, exporter)


__all__ = [
    "BUNDLE_PACKAGE",
    "DEFAULT_NODE_EXPORTER_PORT",
    "DEFAULT_PORT",
    "EXPORTERS",
    "DiscoveryStore",
    "Exporter",
    "discovery_targets",
    "bundle_bytes",
    "exporter_bundle",
    "exporter_record",
    "exporter_source",
    "infer_target_groups",
    "record_exporter",
    "scrape_host",
    "target_groups",
    "target_port",
]
