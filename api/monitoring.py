"""Monitoring endpoints: Prometheus HTTP service discovery of the monitored devices, and the
Celery workers' metrics (merged from their prometheus_client multiprocess files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evc.api.deps import get_settings, get_store, require
from flask import Response, request
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from evc import metrics, monitoring
from evc.model import Scope

blp = Blueprint("monitoring", __name__, description="Prometheus service discovery and the workers' metrics")


class TargetsArgs(Schema):
    exporter = fields.String(
        load_default="evc",
        validate=validate.OneOf(monitoring.EXPORTERS),
        metadata={
            "description": "evc: EVC's edge exporter (default); node: prometheus-node-exporter; "
            "infer: the edge inference servers of running deployments"
        },
    )


class TargetGroupSchema(Schema):
    targets = fields.List(fields.String(), metadata={"description": "one host:port"})
    labels = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={
            "description": "device, device_id, cluster, cluster_name, profile, arch, state; "
            "for infer: deployment, model, version, device, device_id, cluster, cluster_name"
        },
    )


@blp.route("/api/v1/prometheus/targets")
@require(Scope.READ)
@blp.arguments(TargetsArgs, location="query")
@blp.response(200, TargetGroupSchema(many=True))
def targets(args: dict[str, Any]) -> Any:
    """Prometheus HTTP service discovery: one target group per monitored device.

    A device is listed once the `exporter` playbook succeeded on it, and no longer once it is
    removed. Use it as an `http_sd_configs` URL with a read-scoped token
    (`authorization: {type: Bearer, credentials_file: ...}`); `?exporter=node` lists the
    prometheus-node-exporter targets of the devices that have one; `?exporter=infer` the edge
    inference servers of the deployments, one target per device where a deployment runs."""
    return monitoring.discovery_targets(get_store(), args["exporter"])


@blp.route("/metrics/workers")
def worker_metrics() -> Response:
    """Prometheus metrics of the Celery workers (jobs, durations, SSH pool, health sweeps, rounds).

    The workers' prefork processes write prometheus_client multiprocess files under
    `<metrics_dir>/workers`; this merges them. 503 when EVC runs without a metrics directory
    (single-process metrics: the workers' are then not reachable from the API)."""
    settings = get_settings()
    if not settings.metrics_dir:
        return _unavailable("EVC runs without a metrics directory (EVC_METRICS_DIR): the workers' metrics are off")
    path = metrics.multiprocess_dir(settings.metrics_dir, "workers")
    if not Path(path).is_dir():
        return _unavailable(f"no worker metrics directory at {path}: no worker has started with it")
    registry = metrics.registry_for_exposition(metrics_dir=path)
    body, content_type = metrics.render(registry, request.headers.get("Accept"))
    return Response(body, content_type=content_type)


def _unavailable(message: str) -> Response:
    return Response(message + "\n", status=503, mimetype="text/plain")
