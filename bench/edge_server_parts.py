"""Benchmark: the edge server's request path in pieces, in process, as CPU time per call
(``time.thread_time`` in a hot loop: what a shared machine's load inflates least).

    .venv/bin/python bench/edge_server_parts.py [--calls 20000]

Pieces: the protocol (``App.handle``) for a tritonclient-style binary request (the same JSON
header each time: the planned path after the first) and for a JSON one, the request head's
parse (the standard library's ``http.client.parse_headers``, what ``http.server`` uses, against
``httpd.parse_head``), the metrics of one request, and ONNX Runtime's own run.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures: the digits model

from tests.fixtures.onnx_models import digits_model, models_folder

HEAD = (
    b"POST /v2/models/digits/infer HTTP/1.1\r\nUser-Agent: python/gevent-http-client-2.6.1\r\n"
    b"Inference-Header-Content-Length: 159\r\nHost: 127.0.0.1:8000\r\nContent-Length: 415"
)


def per_call_us(call: Callable[[], object], n: int) -> float:
    for _ in range(n // 20):
        call()
    t0 = time.thread_time()
    for _ in range(n):
        call()
    return (time.thread_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    n = ap.parse_args().calls

    import onnxruntime as ort

    from evc.device.infer.httpd import parse_head
    from evc.device.infer.metrics import InferMetrics
    from evc.device.infer.repository import Repository
    from evc.device.infer.server import App

    data, d = digits_model()
    x = np.ascontiguousarray(d.X_test[:1].astype(np.float32))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    repo = Repository(models_folder(Path(tempfile.mkdtemp()), {("digits", "1"): data}), opts, ["CPUExecutionProvider"])
    app = App(repo, InferMetrics("bench"))
    app.metrics.models(repo.scan())
    tensor = {"name": "X", "shape": [1, 64], "datatype": "FP32"}
    head = json.dumps(
        {
            "inputs": [dict(tensor, parameters={"binary_data_size": x.nbytes})],
            "outputs": [{"name": "probs", "parameters": {"binary_data": True}}],
        }
    ).encode()
    binary, headers = head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    jbody = json.dumps({"inputs": [dict(tensor, data=x.ravel().tolist())]}).encode()
    route = ["v2", "models", "digits", "infer"]
    session = repo.get("digits").session
    rows = [
        ("App.handle, binary tensors (tritonclient)", lambda: app.handle("POST", route, headers, binary)),
        ("App.handle, JSON tensors", lambda: app.handle("POST", route, {}, jbody)),
        ("request head: http.client.parse_headers", lambda: http.client.parse_headers(io.BytesIO(HEAD + b"\r\n\r\n"))),
        ("request head: httpd.parse_head", lambda: parse_head(HEAD)),
        ("metrics of one request", lambda: app.metrics.served("digits", "1", 200, 1e-4, 1e-5, 1)),
        ("ONNX Runtime session.run", lambda: session.run(["probs"], {"X": x})),
    ]
    with open("/proc/loadavg") as f:
        print(f"CPU us per call, {n} calls each, load average {f.read().split()[0]}")
    for name, call in rows:
        print(f"{name:<44} {per_call_us(call, n):8.2f} us")


if __name__ == "__main__":
    main()
