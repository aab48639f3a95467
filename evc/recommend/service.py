"""Profiling and calibration jobs: submit them, and their bodies.

``model-profile`` runs each variant of a model version on each target device with the one-shot
runner (:mod:`evc.recommend.remote`) and stores per (variant digest, device, runtime) the p50 /
p95 / mean latency, CPU time, throughput per batch size, the peak RSS and the load during the
run (:mod:`evc.store.profiles`), stamped with the device's facts fingerprint: a profile expires
when the facts change. ``device-calibrate`` runs the calibration graphs
(:mod:`evc.recommend.calibration`) and stores the device's cost per feature unit and CPU quota.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from evc.context import Context
from evc.errors import DeviceError, ValidationError
from evc.fl.service import device_python, resolve_devices
from evc.jobs import JobRun, Partial
from evc.model import JSON, EventType, Job, JobKindName
from evc.models import registry
from evc.recommend import calibration, events, features, remote
from evc.settings import Settings
from evc.store import Store, now

RUNTIME = "onnxruntime-cpu"
#: the facts a profile depends on (not disk space or uptime)
FACT_KEYS = ("arch", "os", "kernel", "cpus", "memory_bytes", "python3", "gpus", "jetson")
MAX_BATCHES, MAX_BATCH = 8, 4096
LIMITS = {"warmup": (0, 200), "timed": (1, 2000), "max_seconds": (1.0, 120.0)}
DEFAULTS = {"warmup": 5, "timed": 50, "max_seconds": 20.0}


def facts_fingerprint(dev: Mapping[str, Any]) -> str:
    facts = dev.get("facts") or {}
    blob = json.dumps({k: facts.get(k) for k in FACT_KEYS}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def candidates(store: Store, name: str, version: str | None, variants: Sequence[str] | None = None) -> list[JSON]:
    """The version (latest when None) and its variants, ONNX only, as records with ``variant``
    None for the version itself; *variants* picks some (``base``: the version)."""
    if version is None:
        version = str(registry.show(store, name)["latest"])
    parent = registry.get_version(store, name, version)
    recs = [{**parent, "variant": None}] + list(store.model_variants(name, version))
    recs = [r for r in recs if r.get("format", "onnx") == "onnx"]
    if variants:
        unknown = sorted(set(variants) - {r.get("variant") or "base" for r in recs})
        if unknown:
            raise ValidationError(f"model {name}:{version} has no variant(s) {unknown}", field="variants")
        recs = [r for r in recs if (r.get("variant") or "base") in variants]
    return recs


def accuracy_of(rec: Mapping[str, Any]) -> float | None:
    acc = rec.get("accuracy") or {}
    value = acc.get("value") if isinstance(acc, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _bounded(data: Mapping[str, Any], key: str) -> Any:
    lo, hi = LIMITS[key]
    value = data.get(key)
    value = DEFAULTS[key] if value is None else value
    if not lo <= value <= hi:
        raise ValidationError(f"{key} must be in {lo}..{hi}", field=key)
    return value


def _batches(data: Mapping[str, Any]) -> list[int]:
    batches = list(dict.fromkeys(int(b) for b in (data.get("batches") or [1])))
    if len(batches) > MAX_BATCHES or not all(1 <= b <= MAX_BATCH for b in batches):
        raise ValidationError(f"batches: at most {MAX_BATCHES} sizes in 1..{MAX_BATCH}", field="batches")
    return batches


def submit_profile(ctx: Context, name: str, data: Mapping[str, Any]) -> Job:
    """Validate and enqueue a ``model-profile`` job."""
    recs = candidates(ctx.store, name, data.get("version"), data.get("variants"))
    cluster = data.get("cluster")
    devices = resolve_devices(ctx.store, data.get("devices"), cluster)
    params: JSON = {
        "model": name, "version": recs[0]["version"], "variants": [r.get("variant") for r in recs],
        "batches": _batches(data), "python": device_python(ctx.store, data.get("python"), cluster),
        "one_at_a_time": bool(data.get("one_at_a_time")), **{k: _bounded(data, k) for k in LIMITS},
    }  # fmt: skip
    job, _ = ctx.submit(JobKindName.MODEL_PROFILE, params=params, targets=devices)
    ctx.store.audit(ctx.actor, "model.profile", f"{name}:{params['version']}", devices=len(devices), job=job["id"])
    return job


def submit_calibrate(ctx: Context, data: Mapping[str, Any]) -> Job:
    """Validate and enqueue a ``device-calibrate`` job."""
    cluster = data.get("cluster")
    devices = resolve_devices(ctx.store, data.get("devices"), cluster)
    params = {
        "python": device_python(ctx.store, data.get("python"), cluster),
        "one_at_a_time": bool(data.get("one_at_a_time")),
    }
    job, _ = ctx.submit(JobKindName.DEVICE_CALIBRATE, params=params, targets=devices)
    return job


# ---------------------------------------------------------------------- the jobs
def model_bytes(settings: Settings, rec: Mapping[str, Any]) -> bytes:
    return registry.storage(settings, dict(rec)).read_verified(
        rec["sha256"], registry.record_ref(dict(rec)), rec.get("storage")
    )


def features_of(
    store: Store, settings: Settings, rec: Mapping[str, Any], data: bytes | None = None
) -> dict[str, float]:
    """A model file's cost features (computed once per digest, then kept)."""
    got = store.graph_features(rec["sha256"])
    if got is None:
        got = features.of_bytes(data if data is not None else model_bytes(settings, rec))
        store.put_graph_features(rec["sha256"], got)
    return got


def _timeout(settings: Settings, p: Mapping[str, Any], models: int) -> float:
    per_model = (float(p["max_seconds"]) * 3 + 10) * len(p["batches"])
    return settings.ssh_connect_timeout_s + models * (per_model + settings.ssh_command_timeout_s)


def _run_all(settings: Settings, devices: Sequence[Any], spec: remote.Run, timeout: float,
             one_at_a_time: bool) -> list[tuple[str, JSON]]:  # fmt: skip
    work = lambda dev: remote.profile_device(settings, dev, spec)  # noqa: E731
    return remote.each(settings, devices, timeout, work, 1 if one_at_a_time else 0)


def _finish(run: JobRun, settings: Settings, kind: str, results: list[tuple[str, JSON]], names: Mapping[str, str],
            summary: JSON) -> JSON | Partial:  # fmt: skip
    """Per-device results and events, then the job's outcome (partial failure is data)."""
    evs: list[JSON] = []
    for dev_id, res in results:
        reason = None if res["ok"] else (res.get("error") or {}).get("message")
        run.result(dev_id, {"ok": res["ok"], **({"error": res["error"]} if not res["ok"] else {})})
        run.event(f"{names.get(dev_id, dev_id)}: {'measured' if res['ok'] else 'failed'}"
                  + (f" ({reason})" if reason else ""), type=EventType.STEP, target=dev_id)  # fmt: skip
        evs.append({"event": events.PROFILE_DEVICE, "job": run.id, "device": dev_id, "name": names.get(dev_id),
                    "state": "measured" if res["ok"] else "failed", "reason": reason, "at": now()})  # fmt: skip
    ok = sum(1 for _, r in results if r["ok"])
    summary = {**summary, "measured": ok, "failed": len(results) - ok}
    evs.append({"event": kind, "job": run.id, "summary": summary, "at": now()})
    events.publish(settings, evs)
    bad = "; ".join(f"{names.get(d, d)}: {(r.get('error') or {}).get('message')}" for d, r in results if not r["ok"])
    if not ok:
        raise DeviceError(f"no device could be measured: {bad}")
    if ok < len(results):
        return Partial(summary, f"not measured on {len(results) - ok} of {len(results)} devices: {bad}")
    return summary


def profile_job(store: Store, settings: Settings, run: JobRun) -> JSON | Partial:
    """The ``model-profile`` job."""
    p = run.params
    recs = candidates(store, p["model"], p["version"], [v or "base" for v in p["variants"]])
    data = {r["sha256"]: model_bytes(settings, r) for r in recs}
    for r in recs:
        features_of(store, settings, r, data[r["sha256"]])
    spec = remote.Run(data, p["batches"], p["warmup"], p["timed"], p["max_seconds"], p["python"])
    devices = store.get_devices(run.job["targets"])
    names = {d["id"]: str(d.get("name") or d["id"]) for d in devices}
    run.event(
        f"profiling {len(recs)} variant(s) of {p['model']}:{p['version']} on {len(devices)} device(s)",
        type=EventType.STEP,
    )
    results = _run_all(settings, devices, spec, _timeout(settings, p, len(recs)), bool(p.get("one_at_a_time")))
    by_id = {d["id"]: d for d in devices}
    for dev_id, res in results:
        if res["ok"]:
            for r in recs:
                store.put_profile(
                    r["sha256"], dev_id, RUNTIME, profile_record(res["out"][r["sha256"]], r, by_id[dev_id], run.id)
                )
    summary: JSON = {
        "model": p["model"],
        "version": p["version"],
        "variants": [r.get("variant") or "base" for r in recs],
    }
    return _finish(run, settings, events.PROFILE_FINISHED, results, names, summary)


def profile_record(out: Mapping[str, Any], rec: Mapping[str, Any], dev: Mapping[str, Any], job_id: str) -> JSON:
    """What is stored of one runner output (pure)."""
    return {
        "model": rec["name"], "version": rec["version"], "variant": rec.get("variant"),
        "batches": {str(b["batch"]): {k: b[k] for k in ("p50_ms", "p95_ms", "mean_ms", "cpu_p50_ms", "throughput_ips",
                    "timed")} for b in out.get("results") or []},
        "peak_rss_bytes": out.get("peak_rss_bytes"), "load": out.get("load"), "cpu_quota": out.get("cpu_quota"),
        "onnxruntime": out.get("onnxruntime"), "facts": facts_fingerprint(dev), "job": job_id, "at": now(),
    }  # fmt: skip


def calibrate_job(store: Store, settings: Settings, run: JobRun) -> JSON | Partial:
    """The ``device-calibrate`` job."""
    g = calibration.graphs()
    shas = {hashlib.sha256(b).hexdigest(): name for name, b in g.items()}
    graph_feats = {name: features.of_bytes(b) for name, b in g.items()}
    spec = remote.Run({s: g[n] for s, n in shas.items()}, [calibration.BATCH], calibration.WARMUP, calibration.TIMED,
                      10.0, str(run.params["python"]))  # fmt: skip
    devices = store.get_devices(run.job["targets"])
    names = {d["id"]: str(d.get("name") or d["id"]) for d in devices}
    p = {"max_seconds": 10.0, "batches": [1]}
    results = _run_all(settings, devices, spec, _timeout(settings, p, len(g)), bool(run.params.get("one_at_a_time")))
    by_id = {d["id"]: d for d in devices}
    for dev_id, res in results:
        if res["ok"]:
            store.put_calibration(
                dev_id,
                calibration_record({shas[s]: o for s, o in res["out"].items()}, graph_feats, by_id[dev_id], run.id),
            )
    return _finish(run, settings, events.CALIBRATION_FINISHED, results, names, {"graphs": len(g)})


def calibration_record(outs: Mapping[str, Mapping[str, Any]], graph_feats: Mapping[str, dict[str, float]],
                       dev: Mapping[str, Any], job_id: str) -> JSON:  # fmt: skip
    """What is stored of a device's calibration runs (pure)."""
    timings = {name: float(o["results"][0]["cpu_p50_ms"]) for name, o in outs.items()}
    coef = calibration.coefficients(timings, dict(graph_feats))
    first = next(iter(outs.values()))
    return {
        "coef": coef, "summary": calibration.summary(coef), "timings_ms": timings,
        "wall_ms": {name: float(o["results"][0]["p50_ms"]) for name, o in outs.items()},
        "slowdown": calibration.slowdown(outs), "cpu_quota": first.get("cpu_quota"),
        "cfs_period_s": first.get("cfs_period_s"), "cpu_count": first.get("cpu_count"), "load": first.get("load"),
        "facts": facts_fingerprint(dev), "job": job_id, "at": now(),
    }  # fmt: skip
