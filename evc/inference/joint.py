"""Joint (cascade) inference, the ``infer-joint`` job: the edge runs a light model (a running
deployment); items it is not confident about (a pluggable score below a threshold: given, or
tuned on a labelled calibration set for a target accuracy or offload fraction) go over the link
to a strong model in the cloud tier (ONNX Runtime in the worker, or a designated device's
deployment). The job reports the cascade's accuracy, offload fraction, bytes sent from the device
and end-to-end latency, against the edge alone and the cloud alone, all measured on the same
data, and the accuracy/offload curve.

Hard examples travel device → cloud for real: the deployment's server also serves the echo model
(:data:`~evc.inference.tiers.ECHO`), and the cloud asks it for them through the same endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from evc import pool as pooling
from evc.context import Context
from evc.errors import ValidationError
from evc.inference import cascade, onedge, tiers
from evc.inference.link import EdgeClient
from evc.jobs import JobRun
from evc.model import JSON, EventType, Job, JobKindName
from evc.models import registry
from evc.settings import Settings
from evc.store import Store

DEFAULT_BATCH = 32
#: offload fractions at which the job reports the curve
CURVE_POINTS = 21


def submit(ctx: Context, data: Mapping[str, Any]) -> Job:
    """Check a joint job's parameters and enqueue it."""
    params = {k: v for k, v in data.items() if v is not None}
    tiers.running_target(ctx.store, str(params["deployment"]), params.get("device"))
    params["cloud"] = {k: v for k, v in params["cloud"].items() if v is not None}
    tiers.check_cloud(ctx.store, params["cloud"])
    targets = ("threshold", "target_accuracy", "target_offload")
    if sum(k in params for k in targets) == 0:
        raise ValidationError("give a threshold, or a target_accuracy or target_offload with a calibration set",
                              field="threshold")  # fmt: skip
    if "threshold" not in params and "calibration" not in params:
        raise ValidationError("tuning the threshold needs a labelled calibration set", field="calibration")
    for key in ("data", "calibration"):
        if key in params and not registry.storage(ctx).exists(str(params[key]), registry.EVAL_SETS):
            raise ValidationError(f"no data set sha256:{params[key]} is stored; upload it", field=key)
    job, _ = ctx.submit(JobKindName.INFER_JOINT, params=params)
    return job


class Pass:
    """One pass over a data set through one route; what it measured."""

    def __init__(self, n: int) -> None:
        self.probs: np.ndarray | None = None
        self.offloaded = np.zeros(n, bool)
        self.sent = 0
        self.seconds: list[float] = []

    def report(self, y: np.ndarray) -> JSON:
        assert self.probs is not None
        return {"accuracy": round(float((self.probs.argmax(axis=1) == y).mean()), 5),
                "offload": round(float(self.offloaded.mean()), 5), "bytes_sent": int(self.sent),
                "latency_ms": tiers.latency_stats(self.seconds), "requests": len(self.seconds)}  # fmt: skip


def _put(p: Pass, sl: slice, probs: np.ndarray) -> None:
    if p.probs is None:
        p.probs = np.zeros((p.offloaded.shape[0], probs.shape[1]), np.float32)
    p.probs[sl] = probs


def _edge_and_cloud(client: EdgeClient, edge: tiers.Edge, cloud: tiers.CloudTier, x: np.ndarray, batch: int
                    ) -> tuple[Pass, Pass]:  # fmt: skip
    """Edge alone and cloud alone (every item over the link) on *x*."""
    e, c = Pass(len(x)), Pass(len(x))
    c.offloaded[:] = True
    for sl in tiers.batches(len(x), batch):
        r = client.infer(*edge.name, x[sl])
        _put(e, sl, r.output)
        e.sent += r.received
        e.seconds.append(r.seconds)
        moved = client.infer(*tiers.ECHO, x[sl])
        probs, s = cloud.run(moved.output)
        _put(c, sl, probs)
        c.sent += moved.received
        c.seconds.append(moved.seconds + s)
    return e, c


def _cascade(client: EdgeClient, edge: tiers.Edge, cloud: tiers.CloudTier, x: np.ndarray, batch: int, score: str,
             threshold: float, run: JobRun | None = None) -> Pass:  # fmt: skip
    """The cascade on *x*: the edge on every batch, its hard items to the cloud."""
    j = Pass(len(x))
    parts = tiers.batches(len(x), batch)
    for i, sl in enumerate(parts):
        r = client.infer(*edge.name, x[sl])
        probs, seconds, sent = r.output.copy(), r.seconds, r.received
        hard = cascade.offloaded(cascade.confidence(probs, score), threshold)
        if hard.any():
            moved = client.infer(*tiers.ECHO, x[sl][hard])
            probs[hard], s = cloud.run(moved.output)
            seconds, sent = seconds + moved.seconds + s, sent + moved.received
        _put(j, sl, probs)
        j.offloaded[sl] = hard
        j.sent += sent
        j.seconds.append(seconds)
        if run is not None and i % 4 == 3:
            run.check_cancel()
            run.progress(done=sl.stop, total=len(x))
    return j


def _threshold(client: EdgeClient, edge: tiers.Edge, cloud: tiers.CloudTier, settings: Settings, p: Mapping[str, Any],
               batch: int, run: JobRun) -> tuple[float, JSON | None]:  # fmt: skip
    if "threshold" in p:
        return float(p["threshold"]), None
    xc, yc = tiers.load_set(settings, str(p["calibration"]))
    e, c = _edge_and_cloud(client, edge, cloud, xc, batch)
    assert e.probs is not None and c.probs is not None
    cv = cascade.curve(cascade.confidence(e.probs, p["score"]), e.probs.argmax(1) == yc, c.probs.argmax(1) == yc)
    t = cascade.tune(cv, p.get("target_accuracy"), p.get("target_offload"))
    note = "" if t.reached else " (target not reached)"
    run.event(f"threshold {t.threshold:.4f} tuned on {len(yc)} calibration items: accuracy {t.accuracy:.4f}, "
              f"offload {t.offload:.3f}{note}", type=EventType.STEP)  # fmt: skip
    return t.threshold, {**t.to_json(), "items": len(yc), "edge_accuracy": float((e.probs.argmax(1) == yc).mean()),
                         "cloud_accuracy": float((c.probs.argmax(1) == yc).mean())}  # fmt: skip


def curve_points(cv: cascade.Curve, points: int = CURVE_POINTS) -> list[JSON]:
    """The curve at evenly spaced offload fractions (the best accuracy at or below each)."""
    out = []
    for f in np.linspace(0, 1, points):
        i = int(np.flatnonzero(cv.offload <= f + 1e-12)[-1])
        out.append({"offload": round(float(cv.offload[i]), 4), "accuracy": round(float(cv.accuracy[i]), 5)})
    return out


def run_job(store: Store, settings: Settings, run: JobRun) -> JSON:
    """The ``infer-joint`` job."""
    p = {"score": "max-prob", "batch": DEFAULT_BATCH, **run.params}
    batch = int(p["batch"])
    edge = tiers.edge_of(store, settings, p)
    cloud = tiers.cloud_of(store, settings, p["cloud"])
    x, y = tiers.load_set(settings, str(p["data"]))
    pooling.call(onedge.install_models(settings, edge.device, edge.deployment["id"],
                                       {tiers.ECHO: tiers.echo_model(edge.model)}))  # fmt: skip
    client = EdgeClient(edge.endpoint)
    try:
        client.wait_ready(*tiers.ECHO)
        threshold, tuning = _threshold(client, edge, cloud, settings, p, batch, run)
        run.event(
            f"cascade over {len(y)} items at {edge.endpoint}, {p['score']} < {threshold:.4f}", type=EventType.STEP
        )
        joint = _cascade(client, edge, cloud, x, batch, p["score"], threshold, run)
        e, c = _edge_and_cloud(client, edge, cloud, x, batch)
    finally:
        client.close()
        cloud.close()
    assert e.probs is not None and c.probs is not None
    cv = cascade.curve(cascade.confidence(e.probs, p["score"]), e.probs.argmax(1) == y, c.probs.argmax(1) == y)
    run.progress(done=len(y), total=len(y))
    return {
        "deployment": edge.deployment["id"], "device": edge.device["id"], "endpoint": edge.endpoint,
        "cloud": p["cloud"], "score": p["score"], "tuning": tuning, "items": len(y),
        "threshold": threshold if np.isfinite(threshold) else None,
        "batch": batch, "joint": joint.report(y), "edge_only": e.report(y), "cloud_only": c.report(y),
        "curve": curve_points(cv),
    }  # fmt: skip


__all__ = ["curve_points", "run_job", "submit"]
