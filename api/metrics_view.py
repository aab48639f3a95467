"""Prometheus exposition for the API's /metrics: process metrics plus the fleet collector."""

from __future__ import annotations

from typing import Any

from flask import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from evc.store import Store


def exposition(store: Store, app: Any) -> Response:
    ext = app.extensions["evc"]
    registry = ext.get("metrics_registry")
    if registry is None:
        registry = ext["metrics_registry"] = _build_registry(store)
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def _build_registry(store: Store) -> CollectorRegistry:
    from evc import metrics
    from evc.recommend.metrics import RecommendCollector

    registry = metrics.registry_for_exposition()
    registry.register(metrics.FleetCollector(store))
    registry.register(RecommendCollector(store))
    return registry
