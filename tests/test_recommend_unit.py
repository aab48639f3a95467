"""The pure core of model recommendation: graph features, calibration maths, the latency
predictor and its held-out error, the choice per device and its reasons, the metrics."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evc.recommend import calibration, choose, features
from evc.recommend import predictor as pm
from evc.recommend.metrics import families
from evc.recommend.service import calibration_record, facts_fingerprint, profile_record
from tests.fixtures.onnx_models import digits_cnn, digits_model


def test_features_of_a_cnn_and_its_int8_variant() -> None:
    fp32 = features.of_bytes(digits_cnn(4))
    # conv1: 64 positions x 4 filters x (2*9 + bias); conv2: 64 x 8 x (2*4*9 + 1); head Gemm 512 -> 10
    assert fp32["conv"] == 64 * 4 * 19 + 64 * 8 * 73
    assert fp32["gemm"] == 2 * 512 * 10 + 10
    assert fp32["nodes"] == 8 and fp32["call"] == 1 and fp32["qconv"] == 0
    assert fp32["im2col"] == 64 * 1 * 9 + 64 * 4 * 9
    int8 = features.of_bytes(calibration.quantize(digits_cnn(4)))
    assert int8["conv"] == 0 and int8["qconv"] == 64 * 4 * 18 + 64 * 8 * 72
    assert int8["qgemm"] == 2 * 512 * 10 and int8["nodes"] > fp32["nodes"]
    soft = features.of_bytes(digits_model()[0])
    assert soft["gemm"] == 2 * 64 * 10 and soft["conv"] == 0
    at8 = features.at_batch(fp32, 8)
    assert at8["conv"] == 8 * fp32["conv"] and at8["nodes"] == fp32["nodes"] and at8["call"] == 1


def test_calibration_graphs_each_stress_their_feature() -> None:
    g = calibration.graphs()
    assert list(g) == list(calibration.GRAPHS) and g == calibration.graphs()  # deterministic
    f = {k: features.of_bytes(v) for k, v in g.items()}
    assert f["conv"]["conv"] > 1e7 and f["gemm"]["gemm"] > 1e7
    assert f["qconv"]["qconv"] > 1e7 and f["qgemm"]["qgemm"] > 1e7
    assert f["nodes"]["nodes"] == 48 and f["elements"]["elements"] > 1e6
    assert f["thin"]["im2col"] / f["thin"]["conv"] > 5 * f["conv"]["im2col"] / f["conv"]["conv"]


def test_coefficients_recover_known_costs() -> None:
    f = {k: features.of_bytes(v) for k, v in calibration.graphs().items()}
    true = {"call": 0.004, "nodes": 0.0002, "elements": 6e-8, "conv": 5e-9, "gemm": 4e-9, "qconv": 3e-8,
            "qgemm": 1e-9, "im2col": 2e-7}  # fmt: skip
    timings = {k: sum(true[n] * x[n] for n in features.NAMES) for k, x in f.items()}
    got = calibration.coefficients(timings, f)
    for k in ("conv", "gemm", "qconv", "qgemm", "elements", "im2col"):
        assert got[k] == pytest.approx(true[k], rel=0.05), k
    s = calibration.summary(got)
    assert s["conv_gflops"] == pytest.approx(200, rel=0.05)


def test_nnls_keeps_coefficients_non_negative() -> None:
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    x = calibration.nnls(a, np.array([3.0, 2.0, 1.0]))
    assert (x >= 0).all() and x[1] == 0


def test_wall_latency_and_slowdown() -> None:
    assert pm.wall_latency(10, 1.0, 5) == 10
    assert pm.wall_latency(10, 4.0, 5) == pytest.approx(40)  # longer than the span: the full slowdown
    assert pm.wall_latency(1, 4.0, 5) == pytest.approx(1 * (1 + 3 * 0.2))
    assert pm.Calibration({}, 0.25, 0.1).slowdown == 4.0  # not measured: from the quota
    assert pm.Calibration({}, 0.25, 0.1, 2.5).slowdown == 2.5
    assert pm.Calibration({}, None).slowdown == 1.0
    quarter = pm.Calibration({}, 0.25, 0.1)  # a budget of 25 ms per 100 ms
    assert pm.quota_stall(0.5, quarter) == 0.0  # 2 % of inferences stalled: not in the p95
    assert pm.quota_stall(5.0, quarter) == pytest.approx(75.0)  # 20 %: the p95 has a whole stall
    assert pm.quota_stall(5.0, pm.Calibration({}, None)) == 0.0
    assert pm.quota_stalls(10.0, quarter) == 0.0  # the median inference fits in a budget
    assert pm.quota_stalls(15.0, quarter) == pytest.approx(75.0)  # 60 % of them see one stall
    assert pm.quota_stalls(40.0, quarter) == pytest.approx(150.0)


def _cal(quota: float | None, speed: float = 1.0) -> pm.Calibration:
    return pm.Calibration({"call": 0.01 / speed, "nodes": 0.001 / speed, "elements": 1e-7 / speed,
                           "conv": 1e-8 / speed, "gemm": 1e-8 / speed, "qconv": 4e-8 / speed,
                           "qgemm": 2e-9 / speed, "im2col": 1e-7 / speed}, quota, 0.1)  # fmt: skip


def _variants() -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(3)
    out = {}
    for i in range(6):
        out[f"v{i}"] = {
            "call": 1.0, "nodes": float(rng.integers(5, 30)), "elements": float(rng.integers(10_000, 1_000_000)),
            "conv": float(rng.integers(100_000, 100_000_000)), "gemm": float(rng.integers(10_000, 1_000_000)),
            "qconv": 0.0, "qgemm": 0.0, "im2col": float(rng.integers(1_000, 100_000)),
        }  # fmt: skip
    return out


def _truth(cal: pm.Calibration, x: dict[str, float], bias: float = 1.3) -> pm.Observation:
    """A 'device' whose real costs are *bias* times the calibrated conv cost (what α learns)."""
    w = sum(cal.coef[k] * x[k] * (bias if k == "conv" else 1.0) for k in features.NAMES)
    p50 = pm.p50_model(w, cal, 3.0)  # under a quota: the CPU time and the CFS stalls of its median
    return pm.Observation("", "", 1, x, p50, p50 * 1.2, w)


def test_the_predictor_learns_the_feature_correction_and_predicts_held_out_devices() -> None:
    cals = {"d-full": _cal(None), "d-half": _cal(0.5), "d-quarter": _cal(0.25, speed=0.8)}
    xs = _variants()
    train = []
    for name, x in list(xs.items())[:4]:
        o = _truth(cals["d-full"], x)
        train.append(pm.Observation("d-full", name, 1, x, o.p50_ms, o.p95_ms, o.cpu_ms))
    assert pm.fit(train, cals).span_ms == pm.Predictor().span_ms  # no slowed profile: the prior
    o = _truth(cals["d-half"], xs["v5"])
    train.append(pm.Observation("d-half", "v5", 1, xs["v5"], o.p50_ms, o.p95_ms, o.cpu_ms))
    pred = pm.fit(train, cals)
    assert pred.alpha[features.NAMES.index("conv")] == pytest.approx(1.3, rel=0.1)
    errors = []
    for dev in ("d-half", "d-quarter"):
        for x in xs.values():
            truth = _truth(cals[dev], x)
            errors.append(abs(pred.predict(dev, cals[dev], x).p50_ms - truth.p50_ms) / truth.p50_ms)
    assert max(errors) < 0.2, errors


def test_held_out_errors_and_report() -> None:
    cals = {"a": _cal(None), "b": _cal(0.5)}
    obs = []
    for dev in cals:
        for name, x in _variants().items():
            t = _truth(cals[dev], x)
            obs.append(pm.Observation(dev, name, 1, x, t.p50_ms, t.p95_ms, t.cpu_ms))
    pred, report = pm.fit_with_uncertainty(obs, cals)
    assert report["pairs"] == len(obs) and report["within_20pct"] == 1.0
    assert pm.MIN_UNCERTAINTY <= pred.uncertainty < 0.2
    assert pm.error_report([])["pairs"] == 0
    r = pm.error_report([0.05, -0.15, 0.5])
    assert r["within_10pct"] == pytest.approx(1 / 3, abs=1e-3) and r["within_20pct"] == pytest.approx(2 / 3, abs=1e-3)


def _cfs_run_times(w_ms: float, quota: float, period_ms: float, runs: int, start_ms: float) -> list[float]:
    """Wall-clock times of *runs* back-to-back inferences of CPU time *w_ms* in a cgroup of CFS
    quota *quota*: a step-by-step simulation of the budget refilled every period (the physics
    :func:`pm.quota_stalls` counts in closed form); the first starts *start_ms* into a period."""
    budget, t, left, out = quota * period_ms, start_ms, quota * period_ms, []
    left -= min(budget, start_ms)  # the budget spent before the first run, running since the period began
    for _ in range(runs):
        need, t0 = w_ms, t
        while need > 1e-9:
            if left <= 1e-9:  # throttled until the next period
                t = (math.floor(t / period_ms + 1e-9) + 1) * period_ms
                left = budget
            step = min(need, left)
            need, left, t = need - step, left - step, t + step
        out.append(t - t0)
    return out


def _quantile(xs: list[float], q: float) -> float:  # the profiling runner's (interpolated)
    ys = sorted(xs)
    k = (len(ys) - 1) * q
    lo = int(k)
    return ys[lo] + (ys[min(lo + 1, len(ys) - 1)] - ys[lo]) * (k - lo)


@pytest.mark.parametrize("quota", [0.15, 0.25, 0.4, 0.6, 0.8])
def test_the_cfs_model_matches_a_simulated_throttled_device(quota: float) -> None:
    """p50 and p95 of 60 back-to-back runs under a quota, as counted, against the simulation,
    for CPU times from a small share of the budget to several budgets (the quota's stalls
    dominate: a 22 ms inference at 0.15 CPU takes ~190 ms, at 0.6 CPU 22 ms)."""
    cal = pm.Calibration({}, quota, 0.1)
    misses = []
    for w in (0.7, 1.1, 1.9, 2.9, 7.0, 13.0, 22.6, 27.0, 45.0, 70.0):
        for start in (0.0, 3.7, 11.3):
            times = _cfs_run_times(w, quota, 100.0, 60, start)
            for q, model in ((0.5, w + pm.quota_stalls(w, cal, 60)), (0.95, w + pm.quota_stall(w, cal, 60))):
                sim = _quantile(times, q)
                if abs(model - sim) / sim > 0.2:
                    misses.append((w, start, q, round(sim, 2), round(model, 2)))
    assert len(misses) <= 3, misses  # a run count at a tie (K = n/2, or the p95's K near 3) may go either way


def test_quota_stalls_of_the_bench_devices() -> None:
    """What the bench measured (quiet machine): int8 digits CNN, 22.6 CPU ms per batch of 512."""
    stalls = {q: pm.quota_stalls(22.6, pm.Calibration({}, q, 0.1), 60) for q in (0.15, 0.25, 0.4, 0.6, 0.8, 1.0)}
    assert stalls == pytest.approx({0.15: 170.0, 0.25: 75.0, 0.4: 60.0, 0.6: 0.0, 0.8: 0.0, 1.0: 0.0})
    # 0.69 ms at 0.15 CPU: 4.6 % of 60 runs (3) stall: the p95 (index 56.05) takes 5 % of a stall
    assert pm.quota_stall(0.69, pm.Calibration({}, 0.15, 0.1), 60) == pytest.approx(0.05 * 85.0)
    assert pm.quota_stall(0.4, pm.Calibration({}, 0.15, 0.1), 60) == 0.0  # 2 of 60: none
    assert pm.quota_stall(1.12, pm.Calibration({}, 0.15, 0.1), 60) == pytest.approx(85.0)  # 4 of 60: a whole one
    assert pm.quota_stalls(22.6, pm.Calibration({}, 0.5, None), 60) == 0.0  # no period: no model


def test_a_variant_profiled_on_one_device_is_predicted_on_the_others() -> None:
    """What the features miss of a graph (here: 1.4 times its modelled cost) is the graph's: one
    profile of it on one device corrects it on every device (δ), the other variants keep theirs."""
    cals = {"a": _cal(None), "b": _cal(0.5), "c": _cal(0.25, speed=0.8)}
    xs = _variants()

    def cpu(dev: str, name: str) -> float:
        return float(cals[dev].vector() @ np.array(features.vector(xs[name]))) * (1.4 if name == "v1" else 1.0)

    obs = [pm.Observation("a", n, 1, xs[n], cpu("a", n), cpu("a", n) * 1.2, cpu("a", n)) for n in xs]
    obs += [pm.Observation(d, "v0", 1, xs["v0"], cpu(d, "v0"), cpu(d, "v0") * 1.2, cpu(d, "v0")) for d in ("b", "c")]
    pred = pm.fit(obs, cals)
    assert pred.delta["v1"] > 1.25 and all(abs(pred.delta[n] - 1) < 0.1 for n in xs if n != "v1")
    for dev in ("b", "c"):
        assert pred.cpu_ms(dev, cals[dev], xs["v1"], "v1") == pytest.approx(cpu(dev, "v1"), rel=0.08)
        assert pred.cpu_ms(dev, cals[dev], xs["v2"], "v2") == pytest.approx(cpu(dev, "v2"), rel=0.08)


def test_an_unprofiled_fleet_predicts_from_calibration_alone() -> None:
    pred = pm.fit([], {})
    est = pred.predict("x", _cal(None), {"call": 1, "conv": 1e6})
    assert est.cpu_ms == pytest.approx(0.01 + 0.01) and est.uncertainty == pm.DEFAULT_UNCERTAINTY


C = choose.Candidate


def _fig(p50: float, p95: float, tput: float, source: str = "measured", rss: int | None = None) -> choose.Figures:
    return choose.Figures(p50, p95, tput, source, 0.05, rss)


def test_choose_by_objective_with_reasons() -> None:
    cands = [C(None, "a", 0.99), C("int8", "b", 0.951), C("w8", "c", 0.97)]
    figs = {None: _fig(8, 9, 125), "int8": _fig(3.5, 4.1, 280), "w8": _fig(4, 5, 250, "predicted")}
    res = choose.choose(cands, figs, choose.Constraints("accuracy", max_latency_ms=6, min_accuracy=0.96))
    assert res["label"] == "w8" and res["figures"]["source"] == "predicted"
    assert "int8: accuracy 0.951 < 0.96" in res["rejected"]
    assert "base: 9 ms p95 (measured) > 6 ms" in res["rejected"]
    res = choose.choose(cands, figs, choose.Constraints("latency"))
    assert res["label"] == "int8" and any(r.startswith("w8: 4 ms p50 > 3.5 ms of int8") for r in res["rejected"])
    res = choose.choose(cands, figs, choose.Constraints("throughput", min_accuracy=0.96))
    assert res["label"] == "w8"
    res = choose.choose(cands, figs, choose.Constraints("accuracy"))
    assert res["label"] == "base" and "w8: accuracy 0.970 < 0.990 of base (objective accuracy)" in res["rejected"]


def test_a_device_that_can_run_none_is_named_with_the_reason() -> None:
    cands = [C(None, "a", 0.99), C("int8", "b", None)]
    res = choose.choose(cands, {None: _fig(50, 60, 20, rss=3 << 30), "int8": None}, choose.Constraints(), 1 << 30)
    assert res["variant"] is None and res["label"] is None
    assert "base: needs 3072 MiB, the device has 1024 MiB" in res["reason"]
    assert "int8: no figures" in res["reason"]
    res = choose.choose(cands, {None: _fig(5, 6, 200), "int8": _fig(1, 2, 900)}, choose.Constraints(min_accuracy=0.5))
    assert res["label"] == "base" and "int8: accuracy unknown < 0.5" in res["rejected"]


def test_records_and_fingerprint() -> None:
    dev: dict[str, Any] = {"id": "dev_1", "facts": {"arch": "x86_64", "cpus": 4, "disk_free_bytes": 1}}
    fp = facts_fingerprint(dev)
    assert fp == facts_fingerprint({**dev, "facts": {**dev["facts"], "disk_free_bytes": 2}})
    assert fp != facts_fingerprint({**dev, "facts": {**dev["facts"], "cpus": 2}})
    out = {"results": [{"batch": 1, "p50_ms": 1.0, "p95_ms": 2.0, "mean_ms": 1.2, "cpu_p50_ms": 0.9,
                        "throughput_ips": 800.0, "timed": 50, "seconds": 0.1}],
           "peak_rss_bytes": 5 << 20, "load": {"load1_before": 0.5}, "cpu_quota": 0.5}  # fmt: skip
    rec = profile_record(out, {"name": "m", "version": "1", "variant": "int8"}, dev, "job_1")
    assert rec["batches"]["1"]["p50_ms"] == 1.0 and rec["facts"] == fp and rec["variant"] == "int8"
    g = {k: features.of_bytes(v) for k, v in calibration.graphs().items()}
    outs = {k: {"results": [{"cpu_p50_ms": 0.01 + g[k]["conv"] * 1e-8, "p50_ms": 0.03 + g[k]["conv"] * 3e-8}],
                "cpu_quota": 0.25, "cfs_period_s": 0.1}
            for k in g}  # fmt: skip
    cal = calibration_record(outs, g, dev, "job_2")
    assert cal["cpu_quota"] == 0.25 and cal["coef"]["conv"] > 0 and cal["facts"] == fp
    assert cal["slowdown"] == pytest.approx(3.0, rel=0.01)


def test_metrics_families() -> None:
    watches = {"digits": {"chosen": {
        "dev_1": {"name": "edge-1", "label": "int8", "p50_ms": 3.0, "source": "measured", "predicted_p50_ms": 3.3},
        "dev_2": {"name": "edge-2", "label": None},
    }}}  # fmt: skip
    chosen, latency = families(watches)
    assert [(s.labels, s.value) for s in chosen.samples] == [
        ({"model": "digits", "device": "edge-1", "variant": "int8"}, 1.0)
    ]
    got = {s.labels["source"]: s.value for s in latency.samples}
    assert got == {"measured": 3.0, "predicted": 3.3}


def test_the_runner_runs_with_python_38_syntax_and_reports(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(digits_cnn(2))
    runner = Path(__file__).resolve().parent.parent / "evc" / "device" / "profile_runner.py"
    res = subprocess.run([sys.executable, str(runner), "--model", str(model), "--batches", "1,4", "--warmup", "1",
                          "--timed", "5"], capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0 and out["ok"], out
    assert [r["batch"] for r in out["results"]] == [1, 4] and all(r["timed"] == 5 for r in out["results"])
    assert out["peak_rss_bytes"] > 1 << 20 and math.isfinite(out["results"][0]["p50_ms"])
    bad = subprocess.run([sys.executable, str(runner), "--model", str(tmp_path / "none.onnx")], capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False


def test_the_cli_table_rows() -> None:
    from evc.cli.recommend import recommendation_rows

    d = {
        "devices": [{"device": "dev_1", "name": "edge-1", "label": "int8", "accuracy": 0.951, "rejected": ["base: x"],
                     "figures": {"p50_ms": 3.2, "p95_ms": 4.1, "throughput_ips": 312.5, "source": "predicted",
                                 "uncertainty": 0.12}}],
        "unable": [{"device": "dev_2", "name": "edge-2", "reason": "no variant meets the constraints: ..."}],
    }  # fmt: skip
    rows = recommendation_rows(d)
    assert rows[0]["variant"] == "int8" and rows[0]["source"] == "predicted ±12%" and rows[0]["others"] == "base: x"
    assert rows[1] == {"device": "edge-2", "variant": "-", "others": "no variant meets the constraints: ..."}
