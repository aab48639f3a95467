"""Choosing a variant per device (pure): the constraints, the objective, and why each other
variant lost, in words.

A *candidate* is a variant (``None``: the version itself, shown as ``base``) with its accuracy;
an *estimate* of a (device, variant) pair is measured (a profile) or predicted, with its
uncertainty. The constraints: ``max_latency_ms`` (on the p95), ``min_accuracy``; memory (the
peak RSS measured for the variant, against the device's memory). The objective: ``accuracy``
(the most accurate, then the fastest), ``latency`` (the lowest p50) or ``throughput`` (the most
inferences per second).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OBJECTIVES = ("accuracy", "latency", "throughput")


@dataclass(frozen=True)
class Candidate:
    variant: str | None
    sha256: str
    accuracy: float | None

    @property
    def label(self) -> str:
        return self.variant or "base"


@dataclass(frozen=True)
class Figures:
    """One (device, variant) pair's figures at the batch asked: measured or predicted."""

    p50_ms: float
    p95_ms: float
    throughput_ips: float
    source: str  # "measured" | "predicted"
    uncertainty: float
    peak_rss_bytes: int | None = None


@dataclass(frozen=True)
class Constraints:
    objective: str = "accuracy"
    max_latency_ms: float | None = None
    min_accuracy: float | None = None


def _fails(c: Candidate, f: Figures | None, k: Constraints, memory: int | None) -> str | None:
    """Why *c* cannot run on the device under *k* (None: it can)."""
    if f is None:
        return f"{c.label}: no figures (the device is neither calibrated nor profiled with it)"
    if k.min_accuracy is not None:
        if c.accuracy is None:
            return f"{c.label}: accuracy unknown < {k.min_accuracy:g}"
        if c.accuracy < k.min_accuracy:
            return f"{c.label}: accuracy {c.accuracy:.3f} < {k.min_accuracy:g}"
    if k.max_latency_ms is not None and f.p95_ms > k.max_latency_ms:
        return f"{c.label}: {f.p95_ms:.3g} ms p95 ({f.source}) > {k.max_latency_ms:g} ms"
    if memory and f.peak_rss_bytes and f.peak_rss_bytes > memory:
        return f"{c.label}: needs {f.peak_rss_bytes >> 20} MiB, the device has {memory >> 20} MiB"
    return None


def _key(c: Candidate, f: Figures, objective: str) -> tuple[float, ...]:
    """Sort key: the best first."""
    acc = c.accuracy if c.accuracy is not None else -1.0
    if objective == "latency":
        return (f.p50_ms, -acc)
    if objective == "throughput":
        return (-f.throughput_ips, -acc)
    return (-acc, f.p50_ms)


def _lost(c: Candidate, f: Figures, best: Candidate, bf: Figures, objective: str) -> str:
    if objective == "latency":
        return f"{c.label}: {f.p50_ms:.3g} ms p50 > {bf.p50_ms:.3g} ms of {best.label} (objective latency)"
    if objective == "throughput":
        return (f"{c.label}: {f.throughput_ips:.4g}/s < {bf.throughput_ips:.4g}/s of {best.label} "
                "(objective throughput)")  # fmt: skip
    acc, bacc = c.accuracy, best.accuracy
    if acc is not None and bacc is not None and acc < bacc:
        return f"{c.label}: accuracy {acc:.3f} < {bacc:.3f} of {best.label} (objective accuracy)"
    return f"{c.label}: as accurate as {best.label} but {f.p50_ms:.3g} ms p50 > {bf.p50_ms:.3g} ms"


def figures_view(f: Figures) -> dict[str, Any]:
    return {
        "p50_ms": round(f.p50_ms, 4), "p95_ms": round(f.p95_ms, 4), "throughput_ips": round(f.throughput_ips, 3),
        "source": f.source, "uncertainty": round(f.uncertainty, 3), "peak_rss_bytes": f.peak_rss_bytes,
    }  # fmt: skip


def choose(
    candidates: Sequence[Candidate],
    figures: Mapping[str | None, Figures | None],
    constraints: Constraints,
    memory_bytes: int | None = None,
) -> dict[str, Any]:
    """One device's recommendation: ``variant`` (None with ``reason`` when none fits), its
    ``figures``, and ``rejected`` (a sentence per other variant)."""
    ok: list[tuple[Candidate, Figures]] = []
    rejected: list[str] = []
    for c in candidates:
        f = figures.get(c.variant)
        why = _fails(c, f, constraints, memory_bytes)
        if why:
            rejected.append(why)
        elif f is not None:
            ok.append((c, f))
    if not ok:
        return {"variant": None, "label": None, "figures": None, "rejected": rejected,
                "reason": "no variant meets the constraints: " + "; ".join(rejected)}  # fmt: skip
    ok.sort(key=lambda cf: _key(cf[0], cf[1], constraints.objective))
    best, bf = ok[0]
    rejected += [_lost(c, f, best, bf, constraints.objective) for c, f in ok[1:]]
    return {
        "variant": best.variant, "label": best.label, "sha256": best.sha256, "accuracy": best.accuracy,
        "figures": figures_view(bf), "rejected": rejected, "reason": None,
    }  # fmt: skip
