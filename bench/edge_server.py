"""Benchmark: the edge inference server (evc/device/infer) on the digits model over loopback, with
a standard Open Inference Protocol client (tritonclient.http), against ONNX Runtime in process.

    .venv/bin/python bench/edge_server.py [--requests 2000] [--batch 1] [--concurrency 4] [--threads 1] [--hidden H]

Target (issue 13): latency ratio server / in-process <= 1.5 at batch 1 over loopback. Reported:
p50/p99 latency and throughput of both, sequential requests on one keep-alive connection (the
client's default binary tensors, and JSON tensors), a bare ``http.client`` JSON client (the
server's own cost without tritonclient's), the concurrent throughput of N clients, and the
server's mean time per request and in ONNX Runtime (from its /metrics), and the same clients
against a do-nothing HTTP server (bench/_null_http.py, replaying the edge server's answers): the
floor of a loopback round trip by a Python client, so the rest is the server's own. Both sides use the same
ONNX Runtime thread count (``--threads``). ``--hidden H`` serves a heavier model of the same
shapes instead (an MLP with random weights), to see the ratio when the model's own time counts.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests.fixtures: the digits model

from _common import Figure, emit, pct, tree_cpu

from tests.fixtures.helpers import free_port
from tests.fixtures.onnx_models import digits_model, models_folder


def mlp_model(hidden: int, seed: int = 0) -> bytes:
    """A heavier stand-in on the digits shapes: X (N, 64) -> hidden -> hidden -> 10 (ReLU, then
    softmax), random weights: for the latency ratio when the model's own time is not negligible."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [64, hidden, hidden, 10]
    inits, nodes, x = [], [], "X"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"z{i}"]))
        x = f"z{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
            x = f"h{i}"
    nodes.append(helper.make_node("Softmax", [x], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def timed(call: Callable[[], object], n: int, warmup: int) -> tuple[list[float], float]:
    """Per-call latencies (ms) of *n* calls after *warmup*, and the calls per second."""
    for _ in range(warmup):
        call()
    lat = []
    t_start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        lat.append((time.perf_counter() - t0) * 1000)
    return lat, n / (time.perf_counter() - t_start)


def start_server(models: Path, threads: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "evc.device.infer", "--models-dir", str(models), "--host", "127.0.0.1",
         "--port", str(port), "--threads", str(threads), "--log-level", "WARNING"],
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the edge inference server exited")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the edge inference server did not become ready")


def server_means(port: int) -> tuple[float, float]:
    """The server's mean request time and mean ONNX Runtime time (ms), from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    sums: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith(("_sum", "_count")) and s.name.startswith("evc_infer_"):
                sums[s.name] = sums.get(s.name, 0.0) + s.value

    def mean(metric: str) -> float:
        n = sums.get(f"{metric}_count", 0.0)
        return sums.get(f"{metric}_sum", 0.0) / n * 1000 if n else float("nan")

    return mean("evc_infer_request_duration_seconds"), mean("evc_infer_compute_duration_seconds")


def concurrent_throughput(port: int, x: np.ndarray, clients: int, per_client: int) -> float:
    """Requests/s of *clients* threads, each with its own keep-alive connection (bare JSON)."""
    body = bare_json_body(x)
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            barrier.wait()
            for _ in range(per_client):
                conn.request("POST", "/v2/models/digits/infer", body)
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"concurrent clients failed: {errors[0]}")
    return clients * per_client / elapsed


#: client -> (latencies in ms, requests/s, the server process's CPU time per request in us)
Timings = dict[str, tuple[list[float], float, float]]


def bare_json_body(x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()


def client_timings(port: int, pid: int, x: np.ndarray, n: int, warmup: int) -> Timings:
    """Latencies (ms), rates and server CPU (process *pid*) of the three clients on one keep-alive
    connection each: tritonclient with binary tensors ("bin"), with JSON tensors ("json"), bare
    http.client ("bare"). CPU time is what the machine's load cannot inflate much: it counts the
    server's work, not its waits for a core."""
    import tritonclient.http as httpclient

    def measured(call: Callable[[], object]) -> tuple[list[float], float, float]:
        cpu0 = tree_cpu(pid)
        lat, rate = timed(call, n, warmup)
        return lat, rate, (tree_cpu(pid) - cpu0) / (n + warmup) * 1e6

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")

    def triton(binary: bool) -> Callable[[], object]:
        inp = httpclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = [httpclient.InferRequestedOutput("probs", binary_data=binary)]
        return lambda: client.infer("digits", [inp], outputs=out).as_numpy("probs")

    got = {"bin": measured(triton(True)), "json": measured(triton(False))}
    client.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = bare_json_body(x)

    def bare() -> object:
        conn.request("POST", "/v2/models/digits/infer", body)
        return conn.getresponse().read()

    got["bare"] = measured(bare)
    conn.close()
    return got


def canned_replies(port: int, x: np.ndarray, folder: Path) -> list[str]:
    """The edge server's answers to a JSON and a binary request, saved for the do-nothing server;
    its arguments after the port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v2/models/digits/infer", bare_json_body(x))
    (folder / "reply.json").write_bytes(conn.getresponse().read())
    head = json.dumps(
        {
            "inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "probs", "parameters": {"binary_data": True}}],
        }
    ).encode()  # fmt: skip
    conn.request(
        "POST", "/v2/models/digits/infer", head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    )
    r = conn.getresponse()
    (folder / "reply.bin").write_bytes(r.read())
    conn.close()
    return [str(folder / "reply.json"), str(folder / "reply.bin"), str(r.getheader("Inference-Header-Content-Length"))]


def reference_timings(args: list[str], x: np.ndarray, n: int, warmup: int) -> Timings:
    """The same clients against the do-nothing server (bench/_null_http.py) replaying *args*."""
    port = free_port()
    script = Path(__file__).resolve().parent / "_null_http.py"
    proc = subprocess.Popen([sys.executable, str(script), str(port), *args])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the do-nothing HTTP server did not start") from None
                time.sleep(0.05)
        return client_timings(port, proc.pid, x, n, warmup)
    finally:
        proc.terminate()
        proc.wait(10)


def figures(
    a: argparse.Namespace, local: tuple[list[float], float], edge: Timings, ref: Timings, means: tuple[float, float],
    conc_rate: float,
) -> list[Figure]:  # fmt: skip
    (local_lat, local_rate), (bin_lat, bin_rate, bin_cpu), (bare_lat, bare_rate, _) = local, edge["bin"], edge["bare"]
    b = a.batch if not a.hidden else f"{a.batch}, MLP {a.hidden}"
    p50_local = pct(local_lat, 50)
    p50_bin = pct(bin_lat, 50)
    ratio = p50_bin / p50_local
    overhead_us = (p50_bin - p50_local) * 1000
    own_us = (p50_bin - pct(ref["bin"][0], 50)) * 1000  # less the client's and loopback's floor
    server_ms, ort_ms = means
    print(
        f"batch {b}, {a.requests} requests each, ORT threads {a.threads}; in-process mean "
        f"{statistics.fmean(local_lat) * 1000:.1f} us; the 1.5 ratio needs a model taking >= "
        f"{2 * overhead_us / 1000:.2f} ms per inference at this overhead (tritonclient, end to end), "
        f">= {2 * max(own_us, 0.0) / 1000:.3f} ms at the server's own part of it (less the do-nothing "
        f"server's round trip), >= {2 * (server_ms - ort_ms):.3f} ms at its own time by /metrics"
    )
    return [
        Figure(f"edge server / in-process p50 latency, batch {b}", "<= 1.5", ratio, "x", ratio <= 1.5, ratio),
        Figure(f"edge server p50 latency, batch {b} (tritonclient)", "-", p50_bin, "ms", True),
        Figure(f"edge server p99 latency, batch {b} (tritonclient)", "-", pct(bin_lat, 99), "ms", True),
        Figure(f"ONNX Runtime in-process p50, batch {b}", "-", p50_local * 1000, "us", True),
        Figure(f"ONNX Runtime in-process p99, batch {b}", "-", pct(local_lat, 99) * 1000, "us", True),
        Figure("edge server overhead per request, p50", "-", overhead_us, "us", True),
        Figure("edge server p50, tritonclient JSON tensors", "-", pct(edge["json"][0], 50), "ms", True),
        Figure("edge server p50, bare http.client JSON", "-", pct(bare_lat, 50), "ms", True),
        Figure("edge server p99, bare http.client JSON", "-", pct(bare_lat, 99), "ms", True),
        Figure("do-nothing HTTP server p50, tritonclient (reference)", "-", pct(ref["bin"][0], 50), "ms", True),
        Figure("do-nothing HTTP server p50, tritonclient JSON (ref.)", "-", pct(ref["json"][0], 50), "ms", True),
        Figure("do-nothing HTTP server p50, bare http.client (ref.)", "-", pct(ref["bare"][0], 50), "ms", True),
        Figure("edge server's own part, tritonclient p50 - reference", "-", own_us, "us", True),
        Figure(
            "edge server's own part, bare p50 - reference",
            "-",
            (pct(bare_lat, 50) - pct(ref["bare"][0], 50)) * 1000,
            "us",
            True,
        ),
        Figure("edge server CPU per request, tritonclient", "-", bin_cpu, "us", True),
        Figure("edge server CPU per request, tritonclient JSON", "-", edge["json"][2], "us", True),
        Figure("edge server CPU per request, bare http.client", "-", edge["bare"][2], "us", True),
        Figure("do-nothing server CPU per request, tritonclient", "-", ref["bin"][2], "us", True),
        Figure("do-nothing server CPU per request, bare client", "-", ref["bare"][2], "us", True),
        Figure("edge server mean time per request (its /metrics)", "-", server_ms, "ms", True),
        Figure("  of which in ONNX Runtime (its /metrics)", "-", ort_ms * 1000, "us", True),
        Figure("edge server throughput, 1 tritonclient", "-", bin_rate, "req/s", True),
        Figure("edge server throughput, 1 bare client", "-", bare_rate, "req/s", True),
        Figure(f"edge server throughput, {a.concurrency} bare clients", "-", conc_rate, "req/s", True),
        Figure("ONNX Runtime in-process throughput", "-", local_rate, "inf/s", True),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, both sides")
    ap.add_argument(
        "--hidden",
        type=int,
        default=0,
        help="serve a heavier MLP (64 -> H -> H -> 10, random weights) instead of the digits model (0)",
    )
    a = ap.parse_args()

    import onnxruntime as ort
    import tritonclient.http as httpclient

    data, d = digits_model()
    if a.hidden:
        data = mlp_model(a.hidden)
    x = np.ascontiguousarray(d.X_test[: a.batch].astype(np.float32))
    work = Path(tempfile.mkdtemp(prefix="evc-bench-infer-"))
    models = models_folder(work, {("digits", "1"): data})

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    local = timed(lambda: sess.run(None, {"X": x}), a.requests, a.warmup)
    expected = sess.run(None, {"X": x})[0]

    proc, port = start_server(models, a.threads)
    try:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        inp = httpclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        got = client.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput("probs")]).as_numpy("probs")
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        client.close()
        edge = client_timings(port, proc.pid, x, a.requests, a.warmup)
        means = server_means(port)
        conc_rate = concurrent_throughput(port, x, a.concurrency, max(1, a.requests // a.concurrency))
        replies = canned_replies(port, x, work)
    finally:
        proc.terminate()
        proc.wait(30)
    ref = reference_timings(replies, x, a.requests, a.warmup)
    emit(figures(a, local, edge, ref, means, conc_rate))


if __name__ == "__main__":
    main()
