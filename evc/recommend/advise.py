"""Recommendations: per device, the variant that meets the constraints and best meets the
objective, from the profiles (measured) or the predictor (predicted, with its uncertainty), and
the fleet follower that re-evaluates them after health sweeps.

Figures follow the device's load: measured or calibrated at a load per CPU ``then``, a device
now at ``now`` (its latest health record) has its latencies scaled by ``max(1, now) / max(1,
then)`` (``follow_load`` false: as measured).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from evc.errors import ValidationError
from evc.health import cpus_of
from evc.model import JSON
from evc.recommend import choose, events
from evc.recommend import predictor as pm
from evc.recommend.features import at_batch
from evc.recommend.service import RUNTIME, accuracy_of, candidates, facts_fingerprint, features_of
from evc.settings import Settings
from evc.store import Store, now

MEASURED_UNCERTAINTY = 0.05


def _cal(rec: Mapping[str, Any]) -> pm.Calibration:
    return pm.Calibration(rec.get("coef") or {}, rec.get("cpu_quota"), rec.get("cfs_period_s"), rec.get("slowdown"))


def current(store: Store, devices: Sequence[Mapping[str, Any]]) -> tuple[dict[str, JSON], list[JSON]]:
    """The calibrations and profiles of *devices* measured under their current facts."""
    fps = {d["id"]: facts_fingerprint(d) for d in devices}
    cals = {k: v for k, v in store.calibrations(list(fps)).items() if v.get("facts") == fps[k]}
    profiles = [p for p in store.profiles() if p.get("device") in fps and p.get("facts") == fps[p["device"]]]
    return cals, profiles


def observations(store: Store, profiles: Iterable[Mapping[str, Any]]) -> list[pm.Observation]:
    out = []
    for p in profiles:
        x = store.graph_features(p["sha256"])
        if x is None:
            continue
        for b, f in (p.get("batches") or {}).items():
            out.append(pm.Observation(p["device"], p["sha256"], int(b), at_batch(x, int(b)), f["p50_ms"], f["p95_ms"],
                                      f["cpu_p50_ms"], f.get("mean_ms"), f.get("timed")))  # fmt: skip
    return out


def timed_points(cals: Mapping[str, Mapping[str, Any]]) -> list[pm.WallPoint]:
    """The calibration graphs' (device, CPU ms, wall-clock ms): the wall-clock model's data."""
    out = []
    for dev, c in cals.items():
        walls = c.get("wall_ms") or {}
        out += [(dev, float(cpu), float(walls[g])) for g, cpu in (c.get("timings_ms") or {}).items() if g in walls]
    return out


def _per_cpu(load: Mapping[str, Any] | None, cpus: int | None) -> float:
    l1 = (load or {}).get("load1_before") if load else None
    return float(l1) / cpus if isinstance(l1, int | float) and cpus else 0.0


def load_factor(dev: Mapping[str, Any], then: Mapping[str, Any] | None) -> float:
    cpus = cpus_of(dev)
    health = dev.get("health") or {}
    now_l1 = health.get("load1")
    now_per = float(now_l1) / cpus if isinstance(now_l1, int | float) and cpus else 0.0
    return max(1.0, now_per) / max(1.0, _per_cpu(then, cpus))


def _figures(dev: Mapping[str, Any], rec: Mapping[str, Any], prof: Mapping[str, Any] | None,
             cal: Mapping[str, Any] | None,
             pred: pm.Predictor, x: Mapping[str, float], batch: int, follow_load: bool,
             rss: int | None) -> tuple[choose.Figures | None, float | None]:  # fmt: skip
    """The pair's figures (measured when profiled at *batch*, else predicted) and the predicted p50."""
    predicted = pred.predict(dev["id"], _cal(cal), at_batch(dict(x), batch), rec["sha256"]) if cal else None
    measured = ((prof or {}).get("batches") or {}).get(str(batch))
    if measured:
        k = load_factor(dev, prof.get("load")) if follow_load and prof else 1.0
        fig = choose.Figures(measured["p50_ms"] * k, measured["p95_ms"] * k, measured["throughput_ips"] / k, "measured",
                             MEASURED_UNCERTAINTY, (prof or {}).get("peak_rss_bytes"))  # fmt: skip
    elif predicted is not None:
        k = load_factor(dev, (cal or {}).get("load")) if follow_load else 1.0
        fig = choose.Figures(predicted.p50_ms * k, predicted.p95_ms * k, 1000.0 * batch / (predicted.mean_ms * k),
                             "predicted", predicted.uncertainty, rss)  # fmt: skip
    else:
        fig = None
    return fig, (predicted.p50_ms if predicted else None)


def constraints_of(args: Mapping[str, Any]) -> choose.Constraints:
    objective = str(args.get("objective") or "accuracy")
    if objective not in choose.OBJECTIVES:
        raise ValidationError(f"objective must be one of {list(choose.OBJECTIVES)}", field="objective")
    return choose.Constraints(objective, args.get("max_latency_ms"), args.get("min_accuracy"))


def target_ids(store: Store, devices: Sequence[str] | None, cluster: str | None) -> list[str]:
    """The devices a recommendation is for: a cluster's members, the devices listed (both: the
    listed members), or, with neither, every registered device."""
    from evc.fl.service import resolve_devices

    if not devices and not cluster:
        return list(store.device_ids())
    ids = resolve_devices(store, None if cluster else devices, cluster)
    return [i for i in ids if i in set(devices)] if cluster and devices else ids


def recommend(
    store: Store, settings: Settings, name: str, args: Mapping[str, Any], watch: bool = True, report: bool = True
) -> JSON:
    """``GET /models/{name}/recommend``: per device of ``cluster`` and/or ``devices`` (both: the
    listed devices of that cluster; neither: every registered device); *report*: with the
    predictor's held-out error (leave-one-out; the follower does without)."""
    k = constraints_of(args)
    batch = int(args.get("batch") or 1)
    recs = candidates(store, name, args.get("version"), args.get("variants"))
    devices = store.get_devices(target_ids(store, args.get("devices"), args.get("cluster")))
    cals, profiles = current(store, devices)
    pcals = {d: _cal(c) for d, c in cals.items()}
    obs, timed = observations(store, profiles), timed_points(cals)
    pred, errors = pm.fit_with_uncertainty(obs, pcals, timed) if report else (pm.fit(obs, pcals, timed), {})
    feats = {r["sha256"]: features_of(store, settings, r) for r in recs}
    prof = {(p["sha256"], p["device"]): p for p in profiles if p.get("runtime") == RUNTIME}
    rss = {p["sha256"]: p.get("peak_rss_bytes") for p in profiles}
    cands = [choose.Candidate(r.get("variant"), r["sha256"], accuracy_of(r)) for r in recs]
    out_devices: list[JSON] = []
    unable: list[JSON] = []
    for dev in sorted(devices, key=lambda d: str(d.get("name") or d["id"])):
        figs: dict[str | None, choose.Figures | None] = {}
        predicted: dict[str, float | None] = {}
        for r in recs:
            figs[r.get("variant")], predicted[r.get("variant") or "base"] = _figures(
                dev, r, prof.get((r["sha256"], dev["id"])), cals.get(dev["id"]), pred, feats[r["sha256"]], batch,
                bool(args.get("follow_load", True)), rss.get(r["sha256"]))  # fmt: skip
        memory = (dev.get("facts") or {}).get("memory_bytes")
        res = choose.choose(cands, figs, k, memory if isinstance(memory, int) else None)
        item = {"device": dev["id"], "name": dev.get("name"), "state": dev.get("state"), **res,
                "predicted_p50_ms": predicted.get(res["label"]) if res["label"] else None}  # fmt: skip
        (out_devices if res["label"] else unable).append(item)
    view: JSON = {
        "model": name, "version": recs[0]["version"], "batch": batch, "objective": k.objective,
        "max_latency_ms": k.max_latency_ms, "min_accuracy": k.min_accuracy, "devices": out_devices,
        "unable": [{"device": u["device"], "name": u["name"], "reason": u["reason"]} for u in unable],
        "predictor": {**errors, "profiles": pred.profiles, "uncertainty": round(pred.uncertainty, 3),
                      "span_ms": pred.span_ms, "alpha": [round(float(a), 4) for a in pred.alpha]},
        "at": now(),
    }  # fmt: skip
    if watch:
        _watch(store, name, args, view)
    return view


def _watch(store: Store, name: str, args: Mapping[str, Any], view: Mapping[str, Any]) -> None:
    keep = {k: args.get(k) for k in ("version", "cluster", "devices", "objective", "max_latency_ms", "min_accuracy",
                                     "batch", "follow_load") if args.get(k) is not None}  # fmt: skip
    chosen = {}
    for d in view["devices"]:
        fig = d.get("figures") or {}
        chosen[d["device"]] = {"name": d["name"], "label": d["label"], "p50_ms": fig.get("p50_ms"),
                               "source": fig.get("source"), "predicted_p50_ms": d.get("predicted_p50_ms")}  # fmt: skip
    for u in view["unable"]:
        chosen[u["device"]] = {"name": u["name"], "label": None}
    store.watch_recommendation(name, {"args": keep, "chosen": chosen, "at": now()})


def follow(store: Store, settings: Settings, device_ids: Iterable[str] | None = None) -> list[JSON]:
    """After a health sweep: expire the profiles of devices whose facts changed, re-evaluate
    every watched recommendation, and raise ``recommendation.changed`` (fleet event log and
    webhook) for each device whose variant would change. No rollout: the operator decides."""
    swept = set(device_ids) if device_ids is not None else None
    for dev in store.device_fields(list(swept) if swept is not None else None, ("facts",)):
        store.expire_device(dev["id"], facts_fingerprint(dev))
    changed: list[JSON] = []
    for model, w in store.recommendation_watches().items():
        before = w.get("chosen") or {}
        try:
            view = recommend(store, settings, model, w.get("args") or {}, watch=True, report=False)
        except Exception:  # noqa: BLE001 - a model or cluster removed meanwhile: nothing to follow
            continue
        after = {d["device"]: d for d in view["devices"]} | {u["device"]: {**u, "label": None} for u in view["unable"]}
        for dev_id, d in after.items():
            old = (before.get(dev_id) or {}).get("label")
            if dev_id in before and old != d.get("label") and (swept is None or dev_id in swept):
                why = "; ".join(d.get("rejected") or []) if d.get("label") else d.get("reason")
                changed.append({"event": events.RECOMMENDATION_CHANGED, "type": events.RECOMMENDATION_CHANGED,
                                "model": model, "device": dev_id, "name": d.get("name"), "from": old,
                                "to": d.get("label"), "why": (why or "")[:500], "at": now()})  # fmt: skip
    for ev in changed:
        store.log_event(ev)
    events.publish(settings, changed)
    return changed


def resolve_recommended(
    store: Store, settings: Settings, name: str, version: str, data: Mapping[str, Any]
) -> str | None:
    """The variant ``variant: "recommended"`` of a deployment names: the one recommended (with
    the constraints last asked for this model, else objective accuracy) for every target
    device; ValidationError when a device can run none, or when the devices differ."""
    watched = (store.recommendation_watches().get(name) or {}).get("args") or {}
    args = {**{k: v for k, v in watched.items() if k not in ("cluster", "devices", "version")}, "version": version,
            "cluster": data.get("cluster"), "devices": data.get("devices")}  # fmt: skip
    view = recommend(store, settings, name, args, watch=False)
    if view["unable"]:
        why = "; ".join(f"{u['name']}: {u['reason']}" for u in view["unable"])
        raise ValidationError(f"no recommended variant for {why}", field="variant")
    labels = {d["label"] for d in view["devices"]}
    if len(labels) != 1:
        per = ", ".join(f"{d['name']}: {d['label']}" for d in view["devices"])
        raise ValidationError(f"the devices' recommended variants differ ({per}); deploy each group with its variant",
                              field="variant")  # fmt: skip
    return view["devices"][0]["variant"]
