"""Split computing, the ``infer-split`` job: a running deployment's model cut at a single-tensor
cut point, the head on the device (its edge server serves every candidate head, put next to the
model), the tail in the cloud tier (ONNX Runtime in the worker), the cut tensor sent over the
link as a binary tensor.

EVC profiles every head on the device (its own ONNX Runtime, over SSH) and every tail in the
cloud, measures the link's round-trip time and bandwidth through the endpoint, predicts each
cut's end-to-end latency for a request of ``batch`` items and picks the least, with the table of
candidates that says why. ``measure_all`` also measures every cut end to end (the exhaustive
check); with ``data`` (a labelled set) the chosen cut runs over it and reports its accuracy.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from evc import pool as pooling
from evc.context import Context
from evc.errors import ValidationError
from evc.inference import cuts, onedge, tiers
from evc.inference.link import EdgeClient, measure_link
from evc.jobs import JobRun
from evc.model import JSON, EventType, Job, JobKindName
from evc.models import registry
from evc.settings import Settings
from evc.store import Store

DEFAULT_BATCH = 16
ROUNDS = 15
#: the echo probe's reply when measuring the bandwidth (bytes)
PROBE_BYTES = 256 * 1024


def submit(ctx: Context, data: Mapping[str, Any]) -> Job:
    """Check a split job's parameters and enqueue it."""
    params = {k: v for k, v in data.items() if v is not None}
    tiers.running_target(ctx.store, str(params["deployment"]), params.get("device"))
    if "data" in params and not registry.storage(ctx).exists(str(params["data"]), registry.EVAL_SETS):
        raise ValidationError(f"no data set sha256:{params['data']} is stored; upload it", field="data")
    job, _ = ctx.submit(JobKindName.INFER_SPLIT, params=params)
    return job


def head_name(edge: tiers.Edge) -> str:
    return f"{edge.deployment['model']}-head"


class Parts:
    """A model's candidate cuts with their heads (bytes) and tails (cloud sessions; None: none)."""

    def __init__(self, model: bytes) -> None:
        m = onnx.load_from_string(model)
        self.cuts = cuts.candidates(m)
        self.heads: list[bytes] = []
        self.tails: list[tiers.Cloud | None] = []
        for c in self.cuts:
            head, tail = cuts.split(m, c)
            self.heads.append(bytes(head.SerializeToString()))
            self.tails.append(None if tail is None else tiers.Cloud(bytes(tail.SerializeToString())))


def _cloud_s(tail: tiers.Cloud | None, t: np.ndarray, rounds: int) -> float:
    if tail is None:
        return 0.0
    tail.run(t)
    return statistics.median(tail.run(t)[1] for _ in range(rounds))


def _run_cut(
    client: EdgeClient, name: str, k: int, tail: tiers.Cloud | None, x: np.ndarray
) -> tuple[np.ndarray, float]:
    r = client.infer(name, f"c{k}", x)
    if tail is None:
        return r.output, r.seconds
    out, s = tail.run(r.output)
    return out, r.seconds + s


def _measure_all(client: EdgeClient, name: str, tails: list[tiers.Cloud | None], x: np.ndarray, rounds: int
                 ) -> list[float]:  # fmt: skip
    """Every cut's end-to-end latency (s): the median over *rounds* requests, the cuts taken in
    turn in each round (so that a busy moment of the machine weighs on all of them alike)."""
    times: list[list[float]] = [[] for _ in tails]
    for k, tail in enumerate(tails):
        _run_cut(client, name, k, tail, x)
    for _ in range(rounds):
        for k, tail in enumerate(tails):
            times[k].append(_run_cut(client, name, k, tail, x)[1])
    return [statistics.median(t) for t in times]


def _profile(settings: Settings, edge: tiers.Edge, parts: Parts, client: EdgeClient, x: np.ndarray, rounds: int
             ) -> tuple[list[float], list[float]]:  # fmt: skip
    """Each head's time on the device and each tail's in the cloud, at the request's batch."""
    paths = [onedge.model_path(edge.deployment["id"], head_name(edge), f"c{k}") for k in range(len(parts.cuts))]
    python = str(edge.deployment["python"])
    threads = int(edge.deployment.get("threads") or 0)
    dev = pooling.call(onedge.profile(settings, edge.device, python, paths, len(x), rounds, threads))
    device_s = [dev[p] for p in paths]
    cloud_s = []
    for k, tail in enumerate(parts.tails):
        t = client.infer(head_name(edge), f"c{k}", x).output if tail is not None else x
        cloud_s.append(_cloud_s(tail, t, rounds))
    return device_s, cloud_s


def _table(preds: list[cuts.Prediction], measured: list[float] | None) -> list[JSON]:
    rows = []
    for i, p in enumerate(preds):
        row: JSON = {
            "cut": p.cut.label, "tensor": p.cut.tensor, "bytes_per_item": p.cut.bytes_per_item,
            "device_ms": round(p.device_s * 1e3, 3), "link_ms": round(p.link_s * 1e3, 3),
            "cloud_ms": round(p.cloud_s * 1e3, 3), "predicted_ms": round(p.total_s * 1e3, 3),
        }  # fmt: skip
        if measured is not None:
            row["measured_ms"] = round(measured[i] * 1e3, 3)
        rows.append(row)
    return rows


def _sample(settings: Settings, p: Mapping[str, Any], batch: int, n_features: int) -> tuple[np.ndarray, Any]:
    if "data" in p:
        x, y = tiers.load_set(settings, str(p["data"]))
        return x, y
    return np.zeros((batch, n_features), np.float32), None


def _choose(p: Mapping[str, Any], preds: list[cuts.Prediction]) -> tuple[int, str]:
    best, why = cuts.choose(preds)
    if "cut" not in p:
        return best.cut.index, why
    k = int(p["cut"])
    if not 0 <= k < len(preds):
        raise ValidationError(f"cut must be 0..{len(preds) - 1}", field="cut")
    return k, f"c{k} was asked for; EVC would pick {why}"


def run_job(store: Store, settings: Settings, run: JobRun) -> JSON:
    """The ``infer-split`` job."""
    p = {"batch": DEFAULT_BATCH, "rounds": ROUNDS, **run.params}
    batch, rounds = int(p["batch"]), int(p["rounds"])
    edge = tiers.edge_of(store, settings, p)
    parts = Parts(edge.model)
    name = head_name(edge)
    heads = {(name, f"c{k}"): h for k, h in enumerate(parts.heads)}
    pooling.call(onedge.install_models(settings, edge.device, edge.deployment["id"], heads))
    run.event(f"{len(parts.cuts)} candidate cuts of {edge.deployment['model']}; heads on {edge.device['name']}",
              type=EventType.STEP)  # fmt: skip
    n_features = parts.cuts[0].bytes_per_item // 4
    x_all, y = _sample(settings, p, batch, n_features)
    x = np.ascontiguousarray(np.resize(x_all, (batch, *x_all.shape[1:])))
    client = EdgeClient(edge.endpoint)
    try:
        for k in range(len(parts.cuts)):
            client.wait_ready(name, f"c{k}")
        device_s, cloud_s = _profile(settings, edge, parts, client, x, rounds)
        run.check_cancel()
        probe = np.zeros((max(1, PROBE_BYTES // max(1, parts.cuts[0].bytes_per_item)), n_features), np.float32)
        link = measure_link(client, (name, "c0"), probe)
        preds = cuts.predict(parts.cuts, device_s, cloud_s, link, batch)
        chosen, why = _choose(p, preds)
        run.event(f"link {link.bandwidth_bps / 1e6:.1f} Mbit/s, RTT {link.rtt_s * 1e3:.2f} ms; {why}",
                  type=EventType.STEP)  # fmt: skip
        run.check_cancel()
        measured = _measure_all(client, name, parts.tails, x, rounds) if p.get("measure_all") else None
        result = _apply(client, name, chosen, parts.tails[chosen], x_all, y, batch) if y is not None else None
    finally:
        client.close()
    summary: JSON = {
        "deployment": edge.deployment["id"], "device": edge.device["id"], "endpoint": edge.endpoint,
        "batch": batch,
        "link": {"bandwidth_mbit": round(link.bandwidth_bps / 1e6, 3), "rtt_ms": round(link.rtt_s * 1e3, 3)},
        "chosen": f"c{chosen}", "tensor": parts.cuts[chosen].tensor, "why": why, "candidates": _table(preds, measured),
    }  # fmt: skip
    if measured is not None:
        best = int(np.argmin(measured))
        summary["best_measured"] = f"c{best}"
        summary["chosen_vs_best"] = round(measured[chosen] / measured[best], 4)
    if result is not None:
        summary["run"] = result
    return summary


def _apply(client: EdgeClient, name: str, k: int, tail: tiers.Cloud | None, x: np.ndarray, y: np.ndarray,
           batch: int) -> JSON:  # fmt: skip
    """Run the chosen cut over a labelled set: accuracy and per-request latency."""
    preds, seconds = [], []
    for sl in tiers.batches(len(x), batch):
        out, s = _run_cut(client, name, k, tail, x[sl])
        preds.append(out.argmax(axis=1))
        seconds.append(s)
    acc = float((np.concatenate(preds) == y).mean())
    return {"items": len(y), "accuracy": round(acc, 5), "latency_ms": tiers.latency_stats(seconds)}


__all__ = ["Parts", "run_job", "submit"]
