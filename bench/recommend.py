"""Model recommendation from measurements (issue 15): simulated devices made heterogeneous with
real CPU quotas (cgroup v1 CFS, the simulator's ``--cpus``), five variants of a small digits
CNN (width 16 fp32 = the version, its int8, widths 8, 4 and 2), EVC's jobs through its API.

1. every device is calibrated (the micro-benchmark job) and every (device, variant) pair is
   profiled (the exhaustive measurement, one device at a time): the oracle's figures;
2. the profiles of a few pairs only are kept (all variants on one device, the heaviest variant
   on three more: <= 30 % of the pairs), the others are deleted from the store;
3. the predictor, fitted on the kept profiles and the calibrations, predicts the p50 of every
   held-out pair: the share within ±20 % of its measured p50;
4. for every device and a set of constraints (objective accuracy under latency bounds,
   throughput and latency objectives under accuracy floors) ``GET /models/{name}/recommend``
   (measured where kept, predicted elsewhere) is compared with the choice on the exhaustive
   measurements (the oracle).

Needs root and the cgroup v1 cpu controller (else it stops and says why).

    .venv/bin/python bench/recommend.py [--cpus 0.15,0.25,0.4,0.6,0.8,1] [--batch 512]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import API, Figure, emit, private_stack, registered, spawn, stop, wait_for_sim  # noqa: E402

from evc import keys  # noqa: E402
from evc.recommend import advise, calibration, choose  # noqa: E402
from evc.recommend import predictor as pm  # noqa: E402
from evc.recommend.features import at_batch  # noqa: E402
from evc.settings import settings_env  # noqa: E402
from evc.store import Store  # noqa: E402
from evc_sim import cpuquota  # noqa: E402
from tests.fixtures.onnx_models import accuracy, digits_cnn  # noqa: E402

MODEL = "digits-cnn"
VARIANTS = {"int8": None, "w8": 8, "w4": 4, "w2": 2}  # and the version itself: width 16


def _variants() -> tuple[dict[str, bytes], dict[str, float]]:
    base = digits_cnn(16)
    files = {"base": base, "int8": calibration.quantize(base)}
    files.update({k: digits_cnn(w) for k, w in VARIANTS.items() if w})
    return files, {k: accuracy(v) for k, v in files.items()}


def _push(api: API, files: dict[str, bytes], acc: dict[str, float]) -> None:
    def meta(extra: dict[str, Any], k: str) -> str:
        return json.dumps({**extra, "accuracy": {"dataset": "digits-test", "value": acc[k]}})

    form = {"metadata": meta({"name": MODEL, "version": "1"}, "base"), "file": (io.BytesIO(files["base"]), "m.onnx")}
    api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")
    for k in VARIANTS:
        form = {"metadata": meta({"variant": k}, k), "file": (io.BytesIO(files[k]), "m.onnx")}
        api.call("POST", f"/api/v1/models/{MODEL}/versions/1/variants", data=form, content_type="multipart/form-data")


def _start(tmp: Path, settings: Any, cpus: str, n: int) -> tuple[list[subprocess.Popen[bytes]], list[Any]]:
    env = {**os.environ, **settings_env(settings)}
    state = tmp / "sim" / "devices.json"
    procs = [
        spawn([sys.executable, "-m", "evc_sim", "--devices", str(n), "--root", str(tmp / "sim"), "--state-file",
               str(state), "--authorized-keys", str(settings.key_path.with_suffix(".pub")), "--privileges", "root",
               "--prefix", "rc", "--cpus", cpus], env, tmp / "sim.log"),
        spawn([sys.executable, "-m", "celery", "-A", "evc.workers.app", "worker", "-Q", "default,ssh", "-P", "threads",
               "-c", "4", "-n", "bench-recommend@%h", "-l", "WARNING", "--without-mingle", "--without-gossip"], env,
              tmp / "worker.log"),
    ]  # fmt: skip
    return procs, wait_for_sim(procs[0], state, tmp / "sim.log")


def _devices(store: Store, sims: list[Any]) -> list[str]:
    ids = registered(store, sims, privilege="root")
    for d in sims:
        (Path(d.home) / "py").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        (Path(d.home) / "py").chmod(0o755)
    return ids


def _measure(api: API, ids: list[str], batch: int, timed: int) -> float:
    t0 = time.monotonic()
    job = api.call("POST", "/api/v1/devices/calibrate", json={"devices": ids, "python": "~/py", "one_at_a_time": True})
    api.wait(job["id"], 1800, succeed=True)
    cal_s = time.monotonic() - t0
    body = {"devices": ids, "batches": [batch], "warmup": 3, "timed": timed, "max_seconds": 8, "python": "~/py",
            "one_at_a_time": True}  # fmt: skip
    api.wait(api.call("POST", f"/api/v1/models/{MODEL}/profile", json=body)["id"], 3600, succeed=True)
    return cal_s


def _kept(store: Store, ids: list[str], quotas: dict[str, float]) -> set[tuple[str, str]]:
    """The pairs whose profiles are kept: every variant on the median-quota device, the
    heaviest variant (base) on three devices spread over the quotas."""
    by_quota = sorted(ids, key=lambda d: quotas[d])
    anchor = by_quota[len(by_quota) // 2]
    others = [d for d in (by_quota[0], by_quota[1], by_quota[-1]) if d != anchor][:3]
    return {(anchor, v) for v in ["base", *VARIANTS]} | {(d, "base") for d in others}


def _cases(acc: dict[str, float]) -> list[dict[str, Any]]:
    floors = sorted(set(acc.values()))
    cases: list[dict[str, Any]] = [{"objective": "accuracy", "max_latency_ms": b} for b in (2, 5, 10, 20, 40, 80)]
    cases += [{"objective": "throughput", "min_accuracy": f} for f in floors]
    cases += [{"objective": "latency", "min_accuracy": f} for f in floors]
    return cases


def _oracle(cands: list[choose.Candidate], truth: dict[str, dict[str, Any]], case: dict[str, Any]) -> str | None:
    figs = {c.variant: choose.Figures(truth[c.label]["p50_ms"], truth[c.label]["p95_ms"],
                                      truth[c.label]["throughput_ips"], "measured", 0.0) for c in cands}  # fmt: skip
    k = choose.Constraints(case["objective"], case.get("max_latency_ms"), case.get("min_accuracy"))
    return cast(str | None, choose.choose(cands, figs, k)["label"])


def run(args: argparse.Namespace, tmp: Path) -> tuple[bool, list[Figure]]:
    why = cpuquota.unavailable_reason()
    if why:
        raise SystemExit(why)
    redis, settings = private_stack(tmp)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        store = Store.from_settings(settings)
        keys.ensure_keypair(settings)
        quota_list = [float(x) for x in args.cpus.split(",")]
        procs, sims = _start(tmp, settings, args.cpus, len(quota_list))
        api = API(settings, store)
        ids = _devices(store, sims)
        names = {i: s.name for i, s in zip(ids, sims, strict=True)}
        quotas = {i: float(s.cpus) for i, s in zip(ids, sims, strict=True)}
        files, acc = _variants()
        _push(api, files, acc)
        print("variants: " + ", ".join(f"{k} top-1 {v:.3f}" for k, v in acc.items()))
        cal_s = _measure(api, ids, args.batch, args.timed)
        profiles = {(r["device"], r["variant"] or "base"): r for r in store.profiles()}
        if args.save:  # the raw measurements, for a look at the predictor without the devices
            raw = {"quotas": quotas, "names": names, "acc": acc, "profiles": list(profiles.values()),
                   "calibrations": store.calibrations(ids),
                   "features": {r["sha256"]: store.graph_features(r["sha256"]) for r in profiles.values()}}  # fmt: skip
            Path(args.save).write_text(json.dumps(raw, indent=1))
        truth = {pair: r["batches"][str(args.batch)] for pair, r in profiles.items()}
        kept = _kept(store, ids, quotas)
        for (dev, v), r in profiles.items():
            if (dev, v) not in kept:
                store.delete_profile(r["sha256"], dev, r["runtime"])
        return _figures(args, store, settings, api, ids, names, quotas, acc, truth, kept, cal_s)
    finally:
        for p in reversed(procs):
            stop(p)
        redis.stop()


def _predictions(store: Store, settings: Any, ids: list[str], batch: int) -> tuple[pm.Predictor, dict[str, Any]]:
    devs = store.get_devices(ids)
    cals, profiles = advise.current(store, devs)
    pcals = {d: advise._cal(c) for d, c in cals.items()}
    pred = pm.fit(advise.observations(store, profiles), pcals, advise.timed_points(cals))
    return pred, pcals


def _figures(args: argparse.Namespace, store: Store, settings: Any, api: API, ids: list[str], names: dict[str, str],
             quotas: dict[str, float], acc: dict[str, float], truth: dict[tuple[str, str], Any],
             kept: set[tuple[str, str]], cal_s: float) -> tuple[bool, list[Figure]]:  # fmt: skip
    pred, pcals = _predictions(store, settings, ids, args.batch)
    recs = {(r.get("variant") or "base"): r for r in advise.candidates(store, MODEL, "1")}
    errors, cpu_errors, rows = [], [], []
    for dev in sorted(ids, key=lambda d: quotas[d]):
        for v, r in recs.items():
            x = at_batch(store.graph_features(r["sha256"]) or {}, args.batch)
            est = pred.predict(dev, pcals[dev], x, r["sha256"])
            m = truth[(dev, v)]["p50_ms"]
            err = (est.p50_ms - m) / m
            if (dev, v) not in kept:
                errors.append(err)
                cpu_errors.append((est.cpu_ms - truth[(dev, v)]["cpu_p50_ms"]) / truth[(dev, v)]["cpu_p50_ms"])
            rows.append(f"{names[dev]:<8} {quotas[dev]:>5.2f} {v:<5} {m:>9.2f} {est.p50_ms:>9.2f} {100 * err:>+7.1f}%"
                        f"  {'kept (measured)' if (dev, v) in kept else 'held out'}")  # fmt: skip
    ramp = (f"fitted onset {pred.onset_ms} ms, span {pred.span_ms} ms" if not all(c.throttled for c in pcals.values())
            else "CFS quota model on every device")  # fmt: skip
    print(f"\ndevice   cpus  var   p50 meas  p50 pred    error  (batch {args.batch}; {ramp}; "
          f"machine load1 {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")  # fmt: skip
    print("\n".join(rows))
    within = sum(abs(e) <= 0.2 for e in errors) / len(errors)
    cpu_within = sum(abs(e) <= 0.2 for e in cpu_errors) / len(cpu_errors)
    cands = [choose.Candidate(r.get("variant"), r["sha256"], acc[k]) for k, r in recs.items()]
    agree, total, lines = 0, 0, []
    for case in _cases(acc):
        q = {"devices": ids, "batch": args.batch, "follow_load": "false", **case}
        view = api.call("GET", f"/api/v1/models/{MODEL}/recommend", query_string=q)
        got = {d["device"]: d["label"] for d in view["devices"]} | {u["device"]: None for u in view["unable"]}
        for dev in ids:
            want = _oracle(cands, {v: truth[(dev, v)] for v in recs}, case)
            total += 1
            agree += got.get(dev) == want
            if got.get(dev) != want:
                lines.append(f"  differs: {names[dev]} ({quotas[dev]} cpus) {case}: recommended {got.get(dev)}, "
                             f"oracle {want}")  # fmt: skip
    print(f"\nrecommendation vs exhaustive oracle: {agree}/{total} (device, constraint) cases agree")
    print("\n".join(lines[:20]))
    share = len(kept) / len(truth)
    rate = agree / total
    figures = [
        Figure("held-out pairs with p50 predicted within ±20 %", ">= 90 %", 100 * within, "%", within >= 0.9),
        Figure("recommendation equals the exhaustive oracle", ">= 90 %", 100 * rate, "%", rate >= 0.9),
        Figure("share of (device, variant) pairs measured", "<= 30 %", 100 * share, "%", share <= 0.3),
        Figure("held-out pairs with CPU time per inference within ±20 %", "-", 100 * cpu_within, "%", True),
        Figure(
            f"held-out pairs ({len(errors)}), median |error|",
            "-",
            100 * sorted(abs(e) for e in errors)[len(errors) // 2],
            "%",
            True,
        ),  # fmt: skip
        Figure(f"calibration of {len(ids)} devices (wall)", "-", cal_s, "s", True),
    ]
    return all(f.ok for f in figures), figures


def replay(path: str, batch: int) -> None:
    """The predictor's figures again from a run's saved measurements (``--save``), with this
    code: the same kept pairs, no devices needed; the recommendations as the API makes them
    (measured where kept, predicted elsewhere; ``follow_load`` false) against the oracle."""
    raw = json.loads(Path(path).read_text())
    quotas, cals, acc = raw["quotas"], raw["calibrations"], raw["acc"]
    ids = sorted(quotas, key=lambda d: quotas[d])
    anchor = ids[len(ids) // 2]
    kept = {(anchor, v) for v in ["base", *VARIANTS]} | {(d, "base") for d in (ids[0], ids[1], ids[-1]) if d != anchor}
    profiles = {(p["device"], p["variant"] or "base"): p for p in raw["profiles"]}
    truth = {pair: p["batches"][str(batch)] for pair, p in profiles.items()}
    xs = {pair: at_batch(raw["features"][p["sha256"]], batch) for pair, p in profiles.items()}
    obs = [pm.Observation(d, v, batch, xs[(d, v)], f["p50_ms"], f["p95_ms"], f["cpu_p50_ms"], None, f.get("timed"))
           for (d, v), f in truth.items() if (d, v) in kept]  # fmt: skip
    pcals = {d: advise._cal(c) for d, c in cals.items()}
    pred = pm.fit(obs, pcals, advise.timed_points(cals))
    est = {pair: pred.predict(pair[0], pcals[pair[0]], xs[pair], pair[1]) for pair in truth}
    errors = [(est[pair].p50_ms - f["p50_ms"]) / f["p50_ms"] for pair, f in truth.items() if pair not in kept]
    pred.delta = {}  # the features alone: what the model says of a graph none of whose profiles it has
    plain = [(pred.predict(d, pcals[d], xs[(d, v)]).p50_ms - f["p50_ms"]) / f["p50_ms"]
             for (d, v), f in truth.items() if (d, v) not in kept]  # fmt: skip
    for (d, v), f in sorted(truth.items(), key=lambda kv: (quotas[kv[0][0]], kv[0][1])):
        e = est[(d, v)]
        print(f"{raw['names'][d]:<8} {quotas[d]:>5.2f} {v:<5} p50 {f['p50_ms']:>8.2f} {e.p50_ms:>8.2f}  p95 "
              f"{f['p95_ms']:>8.2f} {e.p95_ms:>8.2f}  cpu {f['cpu_p50_ms']:>7.2f} {e.cpu_ms:>7.2f}"
              f"{'  kept' if (d, v) in kept else ''}")  # fmt: skip
    agree, total = _replay_oracle(ids, acc, truth, est, kept)
    emit([
        Figure("held-out pairs with p50 predicted within ±20 % (replay)", ">= 90 %", 100 * _within(errors), "%",
               _within(errors) >= 0.9),
        Figure("recommendation equals the exhaustive oracle (replay)", ">= 90 %", 100 * agree / total, "%",
               agree / total >= 0.9),
        Figure("held-out pairs within ±20 %, the features alone (no variant factor)", "-", 100 * _within(plain), "%",
               True),
    ])  # fmt: skip


def _within(errors: list[float]) -> float:
    return sum(abs(e) <= 0.2 for e in errors) / len(errors)


def _replay_oracle(ids: list[str], acc: dict[str, float], truth: dict[tuple[str, str], Any],
                   est: dict[tuple[str, str], pm.Estimate], kept: set[tuple[str, str]]) -> tuple[int, int]:  # fmt: skip
    """(agreeing, all) (device, constraint) cases: the choice on the figures the API would use."""
    cands = [choose.Candidate(None if v == "base" else v, v, acc[v]) for v in ["base", *VARIANTS]]
    agree, total = 0, 0
    for case in _cases(acc):
        k = choose.Constraints(case["objective"], case.get("max_latency_ms"), case.get("min_accuracy"))
        for dev in ids:
            figs = {}
            for c in cands:
                if (dev, c.label) in kept:
                    f = truth[(dev, c.label)]
                    figs[c.variant] = choose.Figures(f["p50_ms"], f["p95_ms"], f["throughput_ips"], "measured", 0.0)
                else:
                    e = est[(dev, c.label)]
                    figs[c.variant] = choose.Figures(e.p50_ms, e.p95_ms, 512_000 / e.mean_ms, "predicted", 0.0)
            got = choose.choose(cands, figs, k)["label"]
            want = _oracle(cands, {v: truth[(dev, v)] for v in acc}, case)
            total += 1
            agree += got == want
            if got != want:
                print(f"  differs: {dev} {case}: recommended {got}, oracle {want}")
    return agree, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", default="0.15,0.25,0.4,0.6,0.8,1", help="one simulated device per quota")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--timed", type=int, default=60)
    parser.add_argument("--save", default=None, help="write the raw measurements (JSON) here")
    parser.add_argument("--replay", default=None, help="only the predictor's figure, from a --save file")
    args = parser.parse_args()
    if args.replay:
        replay(args.replay, args.batch)
        return
    with tempfile.TemporaryDirectory(prefix="evc-bench-recommend-") as tmp:
        ok, figures = run(args, Path(tmp))
    emit(figures)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
