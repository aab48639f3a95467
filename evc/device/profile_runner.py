"""EVC's one-shot profiling runner: times ONNX models on the device and prints one JSON line.

Shipped by the ``model-profile`` and ``device-calibrate`` jobs as ``~/.evc/profile/runner.py``
and run once per model (one process per model, so the peak RSS is that model's)::

    python runner.py --model M.onnx --batches 1,8 --warmup 5 --timed 50 [--max-seconds 20]

For each batch size: ``warmup`` inferences, then up to ``timed`` inferences back to back (fewer
when ``max-seconds`` runs out), each timed in wall-clock and in CPU time; ONNX Runtime runs
with one intra-op thread. Reports p50/p95/mean latency, the CPU time per inference, the
throughput, the peak RSS, the load average before and after, the CPU quota of the process's
cgroup (v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, or v2 ``cpu.max``) and how long the
cgroup was throttled during the run. Needs numpy and onnxruntime; Python 3.8+; no EVC imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

MAX_WARMUP = 200
MAX_TIMED = 2000


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu():
    """(quota in CPUs or None, period in s or None, the cgroup's cpu.stat path or None)."""
    text = _read("/proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1].split(","), parts[2]
        if "cpu" in controllers:
            base = "/sys/fs/cgroup/cpu" + path
            quota, period = _read(base + "/cpu.cfs_quota_us"), _read(base + "/cpu.cfs_period_us")
            if quota and period and int(quota) > 0:
                return int(quota) / int(period), int(period) / 1e6, base + "/cpu.stat"
            return None, (int(period) / 1e6 if period else None), base + "/cpu.stat"
        if parts[1] == "" and parts[0] == "0":  # cgroup v2
            base = "/sys/fs/cgroup" + path
            limit = (_read(base + "/cpu.max") or "max").split()
            if limit and limit[0] != "max" and len(limit) == 2:
                return int(limit[0]) / int(limit[1]), int(limit[1]) / 1e6, base + "/cpu.stat"
    return None, None, None


def throttled_s(stat_path):
    text = _read(stat_path) if stat_path else None
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "throttled_time":  # v1: ns
            return int(value) / 1e9
        if key == "throttled_usec":  # v2
            return int(value) / 1e6
    return None


def _percentile(values, q):
    xs = sorted(values)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _inputs(sess, batch):
    import numpy as np

    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}  # fmt: skip
    rng = np.random.default_rng(0)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        if shape and not (isinstance(i.shape[0], int) and i.shape[0] > 0):
            shape[0] = batch
        feed[i.name] = (rng.random(shape) * 4).astype(types.get(i.type, np.float32))
    return feed


def time_batch(sess, batch, warmup, timed, max_seconds):
    feed = _inputs(sess, batch)
    for _ in range(warmup):
        sess.run(None, feed)
    walls = []  # type: list[float]
    cpus = []  # type: list[float]
    start = time.perf_counter()
    while len(walls) < timed and (time.perf_counter() - start < max_seconds or len(walls) < 3):
        w0, c0 = time.perf_counter(), time.process_time()
        sess.run(None, feed)
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    total = time.perf_counter() - start
    ms = 1000.0
    return {
        "batch": batch, "timed": len(walls),
        "p50_ms": _percentile(walls, 0.5) * ms, "p95_ms": _percentile(walls, 0.95) * ms,
        "mean_ms": sum(walls) / len(walls) * ms, "cpu_p50_ms": _percentile(cpus, 0.5) * ms,
        "cpu_mean_ms": sum(cpus) / len(cpus) * ms, "throughput_ips": batch * len(walls) / total,
        "seconds": total,
    }  # fmt: skip


def run(args):
    import onnxruntime as ort

    quota, period, stat = cgroup_cpu()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    load_before, thr_before = os.getloadavg()[0], throttled_s(stat)
    c0, w0 = time.process_time(), time.perf_counter()
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    results = [time_batch(sess, b, args.warmup, args.timed, args.max_seconds) for b in args.batches]
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    thr_after = throttled_s(stat)
    return {
        "ok": True, "onnxruntime": ort.__version__, "python": sys.version.split()[0], "results": results,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load": {
            "load1_before": load_before, "load1_after": os.getloadavg()[0], "cpu_share": cpu / wall if wall else None,
            "throttled_s": (thr_after - thr_before) if thr_before is not None and thr_after is not None else None,
        },
        "cpu_quota": quota, "cfs_period_s": period, "cpu_count": os.cpu_count(),
    }  # fmt: skip


def parse(argv):
    p = argparse.ArgumentParser(description="time an ONNX model (EVC's profiling runner)")
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="1")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timed", type=int, default=50)
    p.add_argument("--max-seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.warmup = max(0, min(args.warmup, MAX_WARMUP))
    args.timed = max(1, min(args.timed, MAX_TIMED))
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        out = run(args)
    except Exception as exc:  # one JSON line says why, whatever failed
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out))
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
