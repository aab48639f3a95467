"""Prometheus series of the watched recommendations, computed from the store at scrape time
(as the fleet's are: a model or device that is gone has no series at the next scrape).

- ``evc_recommend_chosen{model, device, variant}``: 1 for the variant recommended per device;
- ``evc_recommend_latency_ms{model, device, variant, source}``: its p50 at the batch asked,
  ``source`` measured (a profile) or predicted (the predictor, also when a profile exists).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)


class WatchStore(Protocol):
    def recommendation_watches(self) -> dict[str, Any]: ...


def families(watches: Mapping[str, Any]) -> list[Metric]:
    """The families for the watched recommendations (pure)."""
    chosen = GaugeMetricFamily("evc_recommend_chosen", "The variant recommended per device (1).",
                               labels=["model", "device", "variant"])  # fmt: skip
    latency = GaugeMetricFamily("evc_recommend_latency_ms", "p50 of the recommended variant.",
                                labels=["model", "device", "variant", "source"])  # fmt: skip
    for model, w in sorted(watches.items()):
        for dev_id, c in sorted((w.get("chosen") or {}).items()):
            if not c.get("label"):
                continue
            name = str(c.get("name") or dev_id)
            chosen.add_metric([model, name, c["label"]], 1.0)
            if c.get("source") == "measured" and c.get("p50_ms") is not None:
                latency.add_metric([model, name, c["label"], "measured"], float(c["p50_ms"]))
            if c.get("predicted_p50_ms") is not None:
                latency.add_metric([model, name, c["label"], "predicted"], float(c["predicted_p50_ms"]))
    return [chosen, latency]


class RecommendCollector:
    def __init__(self, store: WatchStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            watches = self.store.recommendation_watches()
        except Exception:  # noqa: BLE001 - a broken store must not break the whole /metrics page
            log.warning("recommendation metrics: store unreadable", exc_info=True)
            return
        yield from families(watches)
