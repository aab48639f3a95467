"""Collaborative inference benchmark (issue 14's joint and split figures), through the full stack:
a private Redis, the simulator in its own process (one root device), a Celery worker process,
the API in this process, and the shaped link proxy (``evc_sim.linkproxy``, a process of its own,
shaping the device's uplink: server → controller) between the controller and the edge servers.

- Joint: the edge model (softmax regression, stopped early) is deployed; the cloud model (a small
  CNN) runs in the worker. The threshold is tuned on a calibration set (rows of the training
  split the models were not fitted on) for the best accuracy at ≤ ``--target-offload``; the job
  runs the digits test set. Target: the cloud model's accuracy within 0.5 points, offload ≤ 30 %.
  The accuracy/offload curve (test set) is written as a PNG (a tiny pure-Python writer) and a table.
- Split: the CNN is deployed; on each link setting (100 and 5 Mbit/s, 1 ms one way) an
  ``infer-split`` job with ``measure_all`` picks a cut and measures every cut end to end.
  Target: the picked cut within 10 % of the best measured.

    .venv/bin/python bench/collab_infer.py [--png build/collab/joint_curve.png] [--batch 64] [--rounds 15]
        [--rounds-fast 60] [--target-offload 0.25] [--score max-prob] [--device-threads 1]

The device's edge server runs with one ONNX Runtime thread per model (``--device-threads``): a
split serves a dozen heads, and on this 2-core machine their spinning thread pools starve the link.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import API, Figure, emit, private_stack, spawn, stop, stop_edge_servers, wait_for_sim  # noqa: E402
from _plot import Canvas  # noqa: E402

from evc import keys  # noqa: E402
from evc.embedded import free_port  # noqa: E402
from evc.model import Device  # noqa: E402
from evc.settings import settings_env  # noqa: E402
from evc.store import Store, new_id  # noqa: E402
from tests.fixtures.collab_models import accuracy, cached_cloud_model, digits, edge_model  # noqa: E402


# ---------------------------------------------------------------- the curve as a PNG
def png(path: Path, points: list[tuple[float, float]], marks: list[tuple[float, float]], target: tuple[float, float],
        w: int = 480, h: int = 320) -> None:  # fmt: skip
    """The curve (x: offload 0..1, ticks every 10 %; y: accuracy) as a black line, *marks* as red
    squares, the target (least accuracy, most offload) as blue lines, grey axes."""
    ys = [p[1] for p in points + marks] + [target[0]]
    lo, hi = min(ys) - 0.01, min(1.0, max(ys) + 0.01)
    cv, m = Canvas(w, h), 30

    def at(x: float, y: float) -> tuple[int, int]:
        return m + round(x * (w - 2 * m)), h - m - round((y - lo) / (hi - lo) * (h - 2 * m))

    grey, blue = (150, 150, 150), (0, 90, 220)
    cv.line((m, h - m), (w - m - 1, h - m), grey, 0)
    cv.line((m, m), (m, h - m - 1), grey, 0)
    for tick in range(11):  # offload every 10 %
        cv.dot(*at(tick / 10, lo), grey, 2)
    for i in range(0, w - 2 * m, 4):  # dashed: the accuracy to reach, the offload allowed
        cv.dot(*at(i / (w - 2 * m), target[0]), blue, 0)
    for i in range(0, h - 2 * m, 4):
        cv.dot(at(target[1], lo)[0], h - m - i, blue, 0)
    for a, b in zip(points, points[1:], strict=False):
        cv.line(at(*a), at(*b), (0, 0, 0))
    for x, y in marks:
        cv.dot(*at(x, y), (220, 0, 0), 4)
    cv.save(path)


# ---------------------------------------------------------------- the link, in a process of its own
@contextlib.contextmanager
def shaped_link(port: int, mbit: float, tmp: Path) -> Iterator[int]:
    """``python -m evc_sim.linkproxy`` to 127.0.0.1:*port* at *mbit* Mbit/s + 1 ms, server → client
    (its own process: this one's API polling must not hold up the link); its port."""
    listen = free_port()
    proc = spawn([sys.executable, "-m", "evc_sim.linkproxy", "--target", f"127.0.0.1:{port}", "--listen",
                  f"127.0.0.1:{listen}", "--rate-mbit", str(mbit), "--delay-ms", "1", "--directions", "down"],
                 dict(os.environ), tmp / "linkproxy.log")  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", listen)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the link proxy did not start: {(tmp / 'linkproxy.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield listen
    finally:
        stop(proc)


# ---------------------------------------------------------------- the stack
def _start(tmp: Path, settings: Any) -> tuple[list[subprocess.Popen[bytes]], Any]:
    env = {**os.environ, **settings_env(settings)}
    state = tmp / "sim" / "devices.json"
    procs = [spawn(
        [sys.executable, "-m", "evc_sim", "--devices", "1", "--root", str(tmp / "sim"), "--state-file", str(state),
         "--authorized-keys", str(settings.key_path.with_suffix(".pub")), "--privileges", "root", "--prefix", "co"],
        env, tmp / "sim.log",
    ), spawn(
        [sys.executable, "-m", "celery", "-A", "evc.workers.app", "worker", "-Q", "default,ssh", "-P", "threads",
         "-c", "2", "-n", "bench-collab@%h", "-l", "WARNING", "--without-mingle", "--without-gossip"],
        env, tmp / "worker.log",
    )]  # fmt: skip
    return procs, wait_for_sim(procs[0], state, tmp / "sim.log")[0]


def _device(store: Store, d: Any) -> str:
    rec = cast(Device, {
        "id": new_id("dev"), "name": d.name, "host": d.host, "port": d.port, "username": d.username,
        "host_key": d.host_key_public, "state": "online", "privilege": "root", "level": 0, "labels": {},
        "cluster_id": None, "health": None, "created_at": time.time(),
    })  # fmt: skip
    py = Path(d.home) / "py"
    py.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)
    return store.create_device(rec, token_hash="h-" + rec["id"])["id"]


def _deploy(api: API, name: str, data: bytes, dev: str, threads: int) -> tuple[str, int]:
    form = {"metadata": json.dumps({"name": name, "version": "1"}), "file": (io.BytesIO(data), "model.onnx")}
    api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")
    port = free_port()
    body = {"model": name, "version": "1", "devices": [dev], "python": "~/py", "ports": {dev: port},
            "threads": threads}  # fmt: skip
    job = api.wait(api.call("POST", "/api/v1/deployments", json=body)["id"], succeed=True)
    return str(job["params"]["deployment"]), port


def _dataset(api: API, x: Any, y: Any) -> str:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, X=x, y=y)
    form = {"file": (io.BytesIO(buf.getvalue()), "set.npz")}
    return str(api.call("POST", "/api/v1/eval-sets", data=form, content_type="multipart/form-data")["sha256"])


# ---------------------------------------------------------------- the two figures
def _joint_once(api: API, args: argparse.Namespace, edge_dep: str, port: int, data: str, cal: str, mbit: float
                ) -> dict[str, Any]:  # fmt: skip
    with shaped_link(port, mbit, args.tmp) as link:
        body = {
            "deployment": edge_dep,
            "cloud": {"model": "cnn", "version": "1"},
            "data": data,
            "calibration": cal,
            "target_offload": args.target_offload,
            "score": args.score,
            "endpoint": f"127.0.0.1:{link}",
        }
        s: dict[str, Any] = api.wait(api.call("POST", "/api/v1/inference/joint", json=body)["id"], succeed=True)[
            "summary"
        ]
    print(
        f"\njoint, link {mbit:g} Mbit/s + 1 ms: {s['items']} test items, batch {s['batch']}, {s['score']} < "
        f"{s['threshold']:.4f} (tuned on {s['tuning']['items']} calibration items for offload <= {args.target_offload})"
    )
    print(f"{'route':<10} {'accuracy':>9} {'offload':>8} {'bytes sent':>11} {'latency p50 ms':>15} {'mean ms':>8}")
    for route in ("edge_only", "joint", "cloud_only"):
        r = s[route]
        print(
            f"{route:<10} {r['accuracy']:>9.4f} {r['offload']:>8.3f} {r['bytes_sent']:>11,} "
            f"{r['latency_ms']['p50']:>15.3f} {r['latency_ms']['mean']:>8.3f}"
        )
    return s


def _joint(api: API, args: argparse.Namespace, edge_dep: str, port: int, data: str, cal: str) -> list[Figure]:
    runs = {mbit: _joint_once(api, args, edge_dep, port, data, cal, mbit) for mbit in (100.0, 5.0)}
    s = runs[100.0]
    print(
        "\naccuracy/offload curve (test set): "
        + ", ".join(f"{p['offload']:.2f}:{p['accuracy']:.4f}" for p in s["curve"])
    )
    png(
        args.png,
        [(p["offload"], p["accuracy"]) for p in s["curve"]],
        [(s["joint"]["offload"], s["joint"]["accuracy"])],
        (s["cloud_only"]["accuracy"] - 0.005, 0.30),
    )
    print(f"wrote {args.png}")
    j, c, e = s["joint"], s["cloud_only"], s["edge_only"]
    gap = (c["accuracy"] - j["accuracy"]) * 100
    figures = [
        Figure(
            "joint: edge model below cloud model (points)",
            ">= 3",
            (c["accuracy"] - e["accuracy"]) * 100,
            "points",
            c["accuracy"] - e["accuracy"] >= 0.03,
        ),
        Figure("joint: cloud accuracy - cascade accuracy (points)", "<= 0.5", gap, "points", gap <= 0.5),
        Figure("joint: offloaded items (%)", "<= 30", j["offload"] * 100, "%", j["offload"] <= 0.30),
        Figure("joint: bytes sent vs cloud-only (%)", "-", 100 * j["bytes_sent"] / c["bytes_sent"], "%", True),
    ]
    for mbit, r in runs.items():
        ratio = r["joint"]["latency_ms"]["p50"] / r["cloud_only"]["latency_ms"]["p50"]
        figures.append(Figure(f"joint {mbit:g} Mbit/s: latency p50, cascade / cloud-only", "-", ratio, "x", True))
    return figures  # fmt: skip


def _split(api: API, args: argparse.Namespace, dep: str, port: int, data: str) -> list[Figure]:
    figures = []
    for mbit, rounds in ((100.0, args.rounds_fast), (5.0, args.rounds)):
        with shaped_link(port, mbit, args.tmp) as link:
            body = {"deployment": dep, "endpoint": f"127.0.0.1:{link}", "batch": args.batch,
                    "rounds": rounds, "measure_all": True, "data": data}  # fmt: skip
            s = api.wait(api.call("POST", "/api/v1/inference/split", json=body)["id"], succeed=True)["summary"]
        print(
            f"\nsplit, link {mbit:g} Mbit/s + 1 ms (measured {s['link']['bandwidth_mbit']:.1f} Mbit/s, fixed cost "
            f"{s['link']['rtt_ms']:.2f} ms), batch {s['batch']}: EVC picks {s['chosen']} — {s['why']}"
        )
        print(
            f"{'cut':<4} {'tensor':<8} {'B/item':>7} {'device':>8} {'link':>8} {'cloud':>8} {'predicted':>10} "
            f"{'measured':>9}  (ms per request)"
        )
        for c in s["candidates"]:
            mark = " <- EVC" if c["cut"] == s["chosen"] else (" <- best" if c["cut"] == s["best_measured"] else "")
            print(
                f"{c['cut']:<4} {c['tensor']:<8} {c['bytes_per_item']:>7} {c['device_ms']:>8.3f} {c['link_ms']:>8.3f} "
                f"{c['cloud_ms']:>8.3f} {c['predicted_ms']:>10.3f} {c['measured_ms']:>9.3f}{mark}"
            )
        figures.append(Figure(f"split {mbit:g} Mbit/s: picked cut / best measured", "<= 1.10", s["chosen_vs_best"],
                              "x", s["chosen_vs_best"] <= 1.10))  # fmt: skip
    return figures


def run(args: argparse.Namespace, tmp: Path) -> tuple[bool, list[Figure]]:
    redis, settings = private_stack(tmp)
    procs: list[subprocess.Popen[bytes]] = []
    sim = None
    try:
        store = Store.from_settings(settings)
        keys.ensure_keypair(settings)
        procs, sim = _start(tmp, settings)
        api = API(settings, store)
        dev = _device(store, sim)
        t0 = time.monotonic()
        d = digits()
        edge, cloud = edge_model(d), cached_cloud_model(d)
        cloud_acc = accuracy(cloud, d.x_test, d.y_test)
        print(
            f"models fitted in {time.monotonic() - t0:.1f} s: edge {accuracy(edge, d.x_test, d.y_test):.4f}, "
            f"cloud {cloud_acc:.4f} (digits test set, {len(d.y_test)} items)"
        )
        edge_dep, edge_port = _deploy(api, "edge", edge, dev, args.device_threads)
        cnn_dep, cnn_port = _deploy(api, "cnn", cloud, dev, args.device_threads)
        data, cal = _dataset(api, d.x_test, d.y_test), _dataset(api, d.x_cal, d.y_cal)
        figures = _joint(api, args, edge_dep, edge_port, data, cal)
        figures += _split(api, args, cnn_dep, cnn_port, data)
        return all(f.ok for f in figures), figures
    finally:
        stop_edge_servers([sim] if sim is not None else [])
        for p in reversed(procs):
            stop(p)
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", type=Path, default=Path("build/collab/joint_curve.png"))
    parser.add_argument("--target-offload", type=float, default=0.25)
    parser.add_argument("--score", default="max-prob")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device-threads", type=int, default=1, help="the edge server's ONNX Runtime threads")
    parser.add_argument("--rounds", type=int, default=15, help="requests per cut measured, 5 Mbit/s")
    parser.add_argument("--rounds-fast", type=int, default=60, help="requests per cut measured, 100 Mbit/s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="evc-bench-collab-") as tmp:
        args.tmp = Path(tmp)
        ok, figures = run(args, Path(tmp))
    emit(figures)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
