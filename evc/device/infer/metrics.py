"""The server's Prometheus metrics, served at ``/metrics``.

prometheus_client when it is importable (then the process collector's ``process_*`` metrics
come too); else a small built-in implementation of the same metrics in the text format, so a
device with only onnxruntime and numpy is still scraped.

- ``evc_infer_requests_total{model,version,status}``: inference requests by HTTP status
- ``evc_infer_request_duration_seconds{model,version}``: histogram, request read to response
  ready to send (successful inferences)
- ``evc_infer_compute_duration_seconds{model,version}``: histogram, ONNX Runtime alone
- ``evc_infer_batch_size{model,version}``: histogram, the first dimension of the first input
- ``evc_infer_errors_total{model,reason}``: failed inference requests (``bad_request``,
  ``not_found``, ``unavailable``, ``internal``); a model name that is not served is ``_unknown``
- ``evc_infer_model_ready{model,version,sha256}``: 1 when the version serves, else 0
- ``evc_infer_build_info{version}``: 1
"""

from __future__ import annotations

import math
import threading
from typing import Any, Iterable, Sequence

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN = "_unknown"


# ----------------------------------------------------------------------- built-in fallback
def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v)}.0"
    return repr(float(v))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (), registry: Any = None, **kw: Any) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        self._kw = kw
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> Any:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._child())
        return child

    def clear(self) -> None:
        with self._lock:
            self._children = {}

    def _child(self) -> Any:
        raise NotImplementedError

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, child in sorted(self._children.items()):
            yield from child.lines(self.name, self.labelnames, key)


class _Value:
    def __init__(self, suffix: str) -> None:
        self.value = 0.0
        self.suffix = suffix
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def lines(self, name: str, labelnames: Sequence[str], key: Sequence[str]) -> Iterable[str]:
        yield f"{name}{self.suffix}{_labels(labelnames, key)} {_fmt(self.value)}"


class _Buckets:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = list(buckets) + [math.inf]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self.counts[i] += 1
                    break

    def lines(self, name: str, labelnames: Sequence[str], key: Sequence[str]) -> Iterable[str]:
        total = 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            le = f'le="{_fmt(bound)}"'
            yield f"{name}_bucket{_labels(labelnames, key, le)} {_fmt(total)}"
        yield f"{name}_count{_labels(labelnames, key)} {_fmt(total)}"
        yield f"{name}_sum{_labels(labelnames, key)} {_fmt(self.sum)}"


class Counter(_Metric):
    kind = "counter"

    def _child(self) -> Any:
        return _Value("_total")


class Gauge(_Metric):
    kind = "gauge"

    def _child(self) -> Any:
        return _Value("")


class Histogram(_Metric):
    kind = "histogram"

    def _child(self) -> Any:
        return _Buckets(self._kw.get("buckets", LATENCY_BUCKETS))


class Registry:
    """The built-in registry: its metrics in the Prometheus text format."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> None:
        self.metrics.append(metric)

    def render(self) -> bytes:
        lines = [line for m in self.metrics for line in m.lines()]
        return ("\n".join(lines) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------- the metrics
class InferMetrics:
    """The inference server's metrics, on prometheus_client or the built-in fallback."""

    def __init__(self, server_version: str, use_prometheus_client: bool = True) -> None:
        self.backend = "builtin"
        kinds: Any = (Counter, Gauge, Histogram)
        registry: Any = Registry()
        if use_prometheus_client:
            try:
                import prometheus_client as pc

                registry = pc.CollectorRegistry(auto_describe=False)
                pc.ProcessCollector(registry=registry)
                kinds = (pc.Counter, pc.Gauge, pc.Histogram)
                self.backend = "prometheus_client"
            except ImportError:
                pass
        self.registry = registry
        self._served: dict[tuple[str, str, int], tuple[Any, ...]] = {}
        counter, gauge, histogram = kinds
        mv = ["model", "version"]
        self.requests = counter(
            "evc_infer_requests",
            "Inference requests by model, version and HTTP status",
            mv + ["status"],
            registry=registry,
        )
        self.latency = histogram(
            "evc_infer_request_duration_seconds",
            "Inference request time, request read to response ready (successful requests)",
            mv,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.compute = histogram(
            "evc_infer_compute_duration_seconds",
            "Time in ONNX Runtime per inference request",
            mv,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.batch = histogram(
            "evc_infer_batch_size", "Batch size of inference requests", mv, registry=registry, buckets=BATCH_BUCKETS
        )
        self.errors = counter(
            "evc_infer_errors", "Failed inference requests by model and reason", ["model", "reason"], registry=registry
        )
        self.ready = gauge("evc_infer_model_ready", "1 when a model version serves", mv + ["sha256"], registry=registry)
        gauge("evc_infer_build_info", "The edge inference server's version", ["version"], registry=registry).labels(
            server_version
        ).set(1)

    def served(self, model: str, version: str, status: int, seconds: float, compute: float, batch: int | None) -> None:
        """A successful inference."""
        key = (model, version, status)
        children = self._served.get(key)
        if children is None:  # labels() costs a few microseconds: look the children up once
            mv = (model, version)
            children = self._served[key] = (
                self.requests.labels(*mv, str(status)),
                self.latency.labels(*mv),
                self.compute.labels(*mv),
                self.batch.labels(*mv),
            )
        requests, latency, compute_s, batch_size = children
        requests.inc()
        latency.observe(seconds)
        compute_s.observe(compute)
        if batch is not None:
            batch_size.observe(batch)

    def failed(self, model: str, version: str, status: int, reason: str) -> None:
        """A failed inference (*model* is ``_unknown`` for a name that is not served)."""
        self.requests.labels(model, version, str(status)).inc()
        self.errors.labels(model, reason).inc()

    def models(self, versions: Iterable[Any]) -> None:
        """Set ``evc_infer_model_ready`` from the repository's versions."""
        self.ready.clear()
        for mv in versions:
            self.ready.labels(mv.name, mv.version, mv.sha256).set(1 if mv.ready else 0)

    def render(self) -> tuple[bytes, str]:
        if self.backend == "prometheus_client":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        return self.registry.render(), TEXT_CONTENT_TYPE
