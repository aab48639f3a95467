"""The two tiers of collaborative inference: the edge (a running deployment's edge server on one
device, reached at its endpoint or through a given one) and the cloud (ONNX Runtime in the
worker, on a registered model version); and the labelled data sets the jobs read."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from evc.errors import Conflict, ValidationError
from evc.inference import cuts
from evc.inference.link import EdgeClient, parse_endpoint
from evc.model import JSON, DeploymentDeviceState, Device
from evc.models import registry
from evc.models.quantize import load_eval_set
from evc.settings import Settings
from evc.store import Store

#: the echo model put next to a deployment's model: its input back, so that items can be sent
#: from the device to the cloud over the link (hard examples; the input cut of a split)
ECHO = ("evc-echo", "1")


@dataclass(frozen=True)
class Edge:
    """A running deployment on one device: where to reach its server, and its model's bytes."""

    deployment: JSON
    device: Device
    endpoint: str
    model: bytes

    @property
    def name(self) -> tuple[str, str]:
        return str(self.deployment["model"]), str(self.deployment["served_version"])


def _deployment_model(store: Store, settings: Settings, dep: Mapping[str, Any]) -> bytes:
    rec = (
        registry.get_variant(store, dep["model"], dep["version"], dep["variant"])
        if dep.get("variant")
        else registry.get_version(store, dep["model"], dep["version"])
    )
    return registry.storage(settings, rec).read_verified(rec["sha256"], registry.record_ref(rec), rec.get("storage"))


def running_target(store: Store, deployment_id: str, device: str | None = None) -> tuple[JSON, str, str]:
    """(deployment, device id, endpoint) of a device on which *deployment_id* runs (*device*, or the first)."""
    dep = store.get_deployment(deployment_id)
    states = store.deployment_devices(deployment_id)
    running = [d for d in dep["devices"] if states.get(d, {}).get("state") == DeploymentDeviceState.RUNNING]
    if device is not None and device not in dep["devices"]:
        raise ValidationError(f"device {device} is not in deployment {deployment_id}", field="device")
    pick = [device] if device is not None else running
    if not pick or pick[0] not in running:
        raise Conflict(
            f"deployment {deployment_id} is not running on {'device ' + str(device) if device else 'any device'}"
        )
    return dep, pick[0], str(states[pick[0]]["endpoint"])


def edge_of(store: Store, settings: Settings, params: Mapping[str, Any]) -> Edge:
    """The job's edge tier: ``params.deployment`` on ``params.device`` (or its first running
    device), reached at ``params.endpoint`` when given (a gateway or a link), else its own."""
    dep, dev_id, endpoint = running_target(store, str(params["deployment"]), params.get("device"))
    if params.get("endpoint"):
        endpoint = str(params["endpoint"])
        parse_endpoint(endpoint)
    return Edge(dep, store.get_device(dev_id), endpoint, _deployment_model(store, settings, dep))


def echo_model(model: bytes) -> bytes:
    """The echo model for *model*'s input (same name, type and shape)."""
    m = onnx.load_from_string(model)
    return bytes(cuts.identity_model(m, m.graph.input[0].name).SerializeToString())


class Cloud:
    """ONNX Runtime in this process on a model's bytes; ``run`` answers its first output and
    the seconds it took. One intra-op thread, no spinning: a worker runs several jobs at once."""

    def __init__(self, model: bytes) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        out = self.session.run(None, {self.input: x})[0]
        return np.asarray(out), time.perf_counter() - t0

    def close(self) -> None:
        pass


class DeviceCloud:
    """The cloud tier on a designated device: its running deployment, over HTTP (binary tensors)."""

    def __init__(self, endpoint: str, model: str, version: str) -> None:
        self.client, self.model, self.version = EdgeClient(endpoint), model, version

    def run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        r = self.client.infer(self.model, self.version, x)
        return r.output, r.seconds

    def close(self) -> None:
        self.client.close()


def cloud_model(store: Store, settings: Settings, spec: Mapping[str, Any]) -> bytes:
    """The bytes of the cloud tier's model: ``{"model": name, "version": v}`` in the registry."""
    rec = registry.get_version(store, str(spec["model"]), str(spec["version"]))
    return registry.storage(settings, rec).read_verified(rec["sha256"], registry.record_ref(rec), rec.get("storage"))


def check_cloud(store: Store, spec: Mapping[str, Any]) -> None:
    """That the cloud tier *spec* names exists (a registry version, or a running deployment)."""
    if spec.get("deployment"):
        running_target(store, str(spec["deployment"]), spec.get("device"))
    else:
        registry.get_version(store, str(spec["model"]), str(spec["version"]))


#: what runs the cloud tier's model
CloudTier = Cloud | DeviceCloud


def cloud_of(store: Store, settings: Settings, spec: Mapping[str, Any]) -> CloudTier:
    """The job's cloud tier: ONNX Runtime in this worker, or a designated device's deployment."""
    if spec.get("deployment"):
        dep, _, endpoint = running_target(store, str(spec["deployment"]), spec.get("device"))
        return DeviceCloud(endpoint, str(dep["model"]), str(dep["served_version"]))
    return Cloud(cloud_model(store, settings, spec))


def load_set(settings: Settings, digest: str) -> tuple[np.ndarray, np.ndarray]:
    """A stored labelled data set (an ``.npz`` with ``X`` and ``y``), X as float32."""
    x, y = load_eval_set(registry.storage(settings).read_verified(digest, registry.EVAL_SETS))
    return x.astype(np.float32), y


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def latency_stats(seconds: list[float]) -> JSON:
    """Mean, p50 and p95 of per-request latencies, in ms."""
    a = np.asarray(seconds, np.float64) * 1e3
    if not len(a):
        return {"mean": None, "p50": None, "p95": None}
    return {"mean": round(float(a.mean()), 3), "p50": round(float(np.percentile(a, 50)), 3),
            "p95": round(float(np.percentile(a, 95)), 3)}  # fmt: skip


__all__ = [
    "ECHO", "Cloud", "CloudTier", "DeviceCloud", "Edge", "batches", "check_cloud", "cloud_model", "cloud_of",
    "echo_model", "edge_of", "latency_stats", "load_set", "running_target",
]  # fmt: skip
