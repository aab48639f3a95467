"""EVC's edge inference server (evc/device/infer): the protocol's tensors, the routes in process,
and the server as a real process (copied alone, as a device runs it) called with a standard Open
Inference Protocol client, ``tritonclient.http``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from evc.device.infer.metrics import InferMetrics
from evc.device.infer.repository import Repository
from evc.device.infer.server import App
from evc.device.infer.tensors import (
    HEADER_LENGTH,
    TensorError,
    decode_input,
    decode_inputs,
    encode_output,
    encode_response,
    requested_outputs,
    split_body,
)
from evc.fl.data import Dataset
from tests.fixtures.helpers import free_port, wait_until
from tests.fixtures.onnx_models import digits_model, models_folder

ROOT = Path(__file__).resolve().parents[1]
INFER_SRC = ROOT / "evc" / "device" / "infer"
STANDALONE_PACKAGE = "evc_edge_infer"  # the name it has when copied alone onto a device
#: the interpreter the server runs under: set it to a device's Python (3.8, numpy, onnxruntime) to try that
DEVICE_PYTHON = os.environ.get("EVC_TEST_DEVICE_PYTHON") or sys.executable


# ------------------------------------------------------------------------------- tensors
@pytest.mark.parametrize(
    "datatype,array",
    [
        ("FP32", np.array([[0.5, -1.25, 3.0e-8]], np.float32)),
        ("FP64", np.array([1e300, -2.5], np.float64)),
        ("FP16", np.array([[1.5], [-2.0]], np.float16)),
        ("INT64", np.array([[-(2**62), 7]], np.int64)),
        ("INT32", np.array([[1, -2], [3, 2**31 - 1]], np.int32)),
        ("INT8", np.array([-128, 127], np.int8)),
        ("UINT8", np.array([[0, 255, 17]], np.uint8)),
        ("BOOL", np.array([True, False, True], np.bool_)),
    ],
)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tensors_round_trip(datatype: str, array: np.ndarray, binary: bool) -> None:
    tensor, raw = encode_output("t", array, binary)
    assert tensor["datatype"] == datatype and tensor["shape"] == list(array.shape)
    assert ("data" in tensor) != binary and bool(raw) == binary
    if binary:
        assert tensor["parameters"] == {"binary_data_size": array.nbytes}
    name, back = decode_input(json.loads(json.dumps(tensor)), memoryview(raw) if binary else None)
    assert name == "t" and back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_json_data_may_be_nested_and_bytes_tensors_work() -> None:
    _, nested = decode_input({"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]})
    np.testing.assert_array_equal(nested, np.array([[1, 2], [3, 4]], np.int32))
    _, words = decode_input({"name": "w", "shape": [2], "datatype": "BYTES", "data": ["ab", "é"]})
    assert list(words) == ["ab", "é"]
    tensor, raw = encode_output("w", np.array([b"ab", b"xyz"], dtype=object), binary=True)
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 3) + b"xyz"
    assert list(decode_input(tensor, memoryview(raw))[1]) == [b"ab", b"xyz"]
    assert encode_output("w", np.array([b"ab"], dtype=object), binary=False)[0]["data"] == ["ab"]


@pytest.mark.parametrize(
    "tensor,message",
    [
        ({"name": "x", "shape": [1, 2], "datatype": "FP33", "data": [1, 2]}, "unknown datatype 'FP33'"),
        (
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]},
            "2 elements for shape [1, 3] (3 expected)",
        ),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}, "data is not FP32"),
        ({"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 256]}, "data is not UINT8"),
        ({"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2.5]}, "data is not INT64"),
        ({"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]}, "data is not BOOL"),
        ({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}, "not a regular array"),
        ({"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}, "negative dimension"),
        ({"name": "x", "shape": "1", "datatype": "FP32", "data": [1]}, "shape must be a list of integers"),
        ({"name": "x", "shape": [1], "datatype": "FP32"}, "no data"),
        ({"shape": [1], "datatype": "FP32", "data": [1]}, "an input has no name"),
    ],
)
def test_bad_tensors_say_why(tensor: dict[str, Any], message: str) -> None:
    with pytest.raises(TensorError) as err:
        decode_input(tensor)
    assert message in str(err.value)


def test_binary_sections_follow_the_json_header_in_order() -> None:
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7, 8], np.int64)
    head = {
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
            {"name": "j", "shape": [1], "datatype": "INT32", "data": [5]},
            {"name": "b", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": b.nbytes}},
        ],
        "outputs": [{"name": "o", "parameters": {"binary_data": True}}, {"name": "p"}],
        "parameters": {"binary_data_output": False},
    }
    js = json.dumps(head).encode()
    doc, binary = split_body(js + a.tobytes() + b.tobytes(), str(len(js)))
    arrays = decode_inputs(doc, binary)
    np.testing.assert_array_equal(arrays["a"], a)
    np.testing.assert_array_equal(arrays["b"], b)
    assert arrays["j"].tolist() == [5]
    assert requested_outputs(doc) == (["o", "p"], {"o": True}, False)
    with pytest.raises(TensorError, match="4 bytes of binary data after the last binary input"):
        decode_inputs(*split_body(js + a.tobytes() + b.tobytes() + b"junk", str(len(js))))
    with pytest.raises(TensorError, match="binary data ends before input b"):
        decode_inputs(*split_body(js + a.tobytes(), str(len(js))))
    with pytest.raises(TensorError, match="outside the body"):
        split_body(js, str(len(js) + 1))
    with pytest.raises(TensorError, match="not JSON"):
        split_body(b"{nope", None)

    body, header_length = encode_response({"model_name": "m"}, {"o": a, "p": b}, {"o": True}, False)
    assert header_length is not None
    out = json.loads(body[:header_length])
    assert out["outputs"][0] == {
        "name": "o",
        "datatype": "FP32",
        "shape": [2, 3],
        "parameters": {"binary_data_size": 24},
    }
    assert out["outputs"][1]["data"] == [7, 8] and body[header_length:] == a.tobytes()
    assert encode_response({}, {"p": b}, {}, False)[1] is None


def test_builtin_metrics_are_valid_prometheus_text() -> None:
    m = InferMetrics("9.9", use_prometheus_client=False)
    assert m.backend == "builtin"
    m.served("digits", "1", 200, 0.0004, 0.0001, 4)
    m.served("digits", "1", 200, 0.003, 0.001, 1)
    m.failed("_unknown", "", 404, "not_found")
    text, ctype = m.render()
    assert ctype.startswith("text/plain; version=0.0.4")
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }
    assert got[("evc_infer_requests_total", (("model", "digits"), ("status", "200"), ("version", "1")))] == 2
    assert got[("evc_infer_errors_total", (("model", "_unknown"), ("reason", "not_found")))] == 1
    assert (
        got[("evc_infer_request_duration_seconds_bucket", (("le", "0.0005"), ("model", "digits"), ("version", "1")))]
        == 1
    )
    assert got[("evc_infer_request_duration_seconds_count", (("model", "digits"), ("version", "1")))] == 2
    assert got[("evc_infer_batch_size_bucket", (("le", "4.0"), ("model", "digits"), ("version", "1")))] == 2
    assert got[("evc_infer_build_info", (("version", "9.9"),))] == 1


# ------------------------------------------------------------------- the routes, in process
@pytest.fixture(scope="module")
def digits() -> tuple[bytes, Dataset]:
    return digits_model()


def test_routes_in_process_digests_versions_and_errors(tmp_path: Path, digits: tuple[bytes, Dataset]) -> None:
    data, d = digits
    folder = models_folder(tmp_path, {("digits", "1"): data, ("digits", "10"): data, ("digits", "2"): data})
    (folder / "bad" / "1").mkdir(parents=True)
    (folder / "bad" / "1" / "model.onnx").write_bytes(data)
    (folder / "bad" / "1" / "model.json").write_text(json.dumps({"sha256": "0" * 64}))
    repo = Repository(folder)
    app = App(repo, InferMetrics("t"))
    app.metrics.models(repo.scan())

    def call(method: str, path: str, doc: Any = None) -> tuple[int, Any]:
        body = json.dumps(doc).encode() if doc is not None else b""
        r = app.handle(method, [p for p in path.strip("/").split("/") if p], {}, body)
        return r.status, json.loads(r.body) if r.content_type == "application/json" else r.body

    assert call("GET", "/v2/health/ready") == (400, {"ready": False})  # bad:1 did not load
    index = call("POST", "/v2/repository/index")[1]
    assert [(e["name"], e["version"], e["state"]) for e in index] == [
        ("bad", "1", "UNAVAILABLE"),
        ("digits", "1", "READY"),
        ("digits", "2", "READY"),
        ("digits", "10", "READY"),
    ]
    assert "digest mismatch" in index[0]["reason"]
    assert call("GET", "/v2/models/bad/ready")[0] == 400
    status, err = call("POST", "/v2/models/bad/infer", {"inputs": []})
    assert status == 503 and "digest mismatch" in err["error"]
    assert call("GET", "/v2/models/digits")[1]["versions"] == ["1", "2", "10"]

    x = d.X_test[:3].astype(np.float32)
    req = {"id": "r1", "inputs": [{"name": "X", "shape": [3, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    status, out = call("POST", "/v2/models/digits/infer", req)
    assert status == 200 and out["model_version"] == "10" and out["id"] == "r1"  # the highest version
    assert out["outputs"][0]["shape"] == [3, 10]
    assert call("POST", "/v2/models/digits/versions/2/infer", req)[1]["model_version"] == "2"

    wrong_type = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]}
    assert call("POST", "/v2/models/digits/infer", wrong_type) == (
        400,
        {"error": "input X: datatype INT64, the model expects FP32"},
    )
    wrong_shape = {"inputs": [{"name": "X", "shape": [1, 8, 8], "datatype": "FP32", "data": [0] * 64}]}
    assert "the model expects [-1, 64]" in call("POST", "/v2/models/digits/infer", wrong_shape)[1]["error"]
    bad_out = dict(req, outputs=[{"name": "logits"}])
    assert call("POST", "/v2/models/digits/infer", bad_out)[1]["error"].startswith("the model has no output logits")
    assert call("POST", "/v2/models/digits/versions/3/infer", req) == (404, {"error": "model digits has no version 3"})
    assert call("GET", "/v2/nothing")[0] == 404

    # the digest is checked again when the folder is rescanned: a fixed model.json makes it serve
    (folder / "bad" / "1" / "model.json").write_text(json.dumps({"sha256": "sha256:" + index[1]["sha256"]}))
    app.metrics.models(repo.scan())
    assert call("GET", "/v2/health/ready") == (200, {"ready": True})
    assert call("POST", "/v2/models/bad/infer", req)[0] == 200


def _binary_request(x: np.ndarray, extra: bytes = b"") -> tuple[bytes, str]:
    head = json.dumps(
        {
            "inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "probs", "parameters": {"binary_data": True}}],
        }
    ).encode()  # fmt: skip
    return head + x.tobytes() + extra, str(len(head))


def test_repeated_binary_headers_take_the_planned_path_and_answer_the_same(
    tmp_path: Path, digits: tuple[bytes, Dataset]
) -> None:
    import onnxruntime as ort

    data, d = digits
    folder = models_folder(tmp_path, {("digits", "1"): data})
    repo = Repository(folder)
    app = App(repo, InferMetrics("t", use_prometheus_client=False))
    app.metrics.models(repo.scan())
    local = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = d.X_test[:2].astype(np.float32)

    def infer(body: bytes, header_length: str) -> Any:
        return app.handle("POST", ["v2", "models", "digits", "infer"], {HEADER_LENGTH: header_length}, body)

    first = infer(*_binary_request(x))  # read and checked, then planned
    assert first.status == 200 and len(app.plans._plans) == 1
    again = infer(*_binary_request(x))  # planned: the same bytes
    assert (again.status, again.body, again.headers) == (first.status, first.body, first.headers)
    assert again.served[0:2] == ("digits", "1") and again.served[3] == 2
    for rows in (x[::-1], d.X_test[5:7].astype(np.float32)):
        r = infer(*_binary_request(np.ascontiguousarray(rows)))
        n = int(r.headers[HEADER_LENGTH])
        got = np.frombuffer(r.body[n:], np.float32).reshape(2, 10)
        np.testing.assert_allclose(got, local.run(None, {"X": rows})[0], rtol=1e-6, atol=1e-7)
    bad = infer(*_binary_request(x, b"junk"))  # the same header, a longer body: checked the general way
    assert bad.status == 400 and b"4 bytes of binary data after the last binary input" in bad.body

    models_folder(folder, {("digits", "2"): data})  # a new version: the plan of version 1 is not used
    app.metrics.models(repo.scan())
    r = infer(*_binary_request(x))
    assert r.status == 200 and json.loads(r.body[: int(r.headers[HEADER_LENGTH])])["model_version"] == "2"


def _exchange(port: int, raw: bytes, *, read_until_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        if not read_until_close:
            return s.recv(65536)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_the_http_layer_keeps_alive_pipelines_and_refuses_clearly(
    tmp_path: Path, digits: tuple[bytes, Dataset]
) -> None:
    from evc.device.infer.server import InferServer

    data, d = digits
    server = InferServer(
        Repository(models_folder(tmp_path, {("digits", "1"): data})), InferMetrics("t"), "127.0.0.1", 0
    )
    port = server.start()
    try:
        live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        got = _exchange(port, live + live + b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert got.count(b"HTTP/1.1 200 OK\r\n") == 3 and got.count(b'{"live":true}') == 3
        assert got.endswith(b'Connection: close\r\n\r\n{"live":true}')
        assert b"Server: evc-edge-infer/" in got
        got = _exchange(port, b"GET /v2/health/live HTTP/1.0\r\n\r\n")  # HTTP/1.0: closes
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in got
        for raw, status, message in (
            (b"PUT /v2 HTTP/1.1\r\n\r\n", 501, "method PUT is not supported: use GET or POST"),
            (b"POST /v2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411, "send a Content-Length"),
            (b"POST /v2 HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400, "Content-Length is not a number"),
            (b"GET /v2\r\n\r\n", 400, "malformed request line"),
            (b"GET /v2 HTTP/1.1\r\nno colon\r\n\r\n", 400, "malformed header line"),
        ):
            got = _exchange(port, raw)
            assert got.startswith(f"HTTP/1.1 {status} ".encode()), got
            assert message in json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]
        x = d.X_test[:300].astype(np.float32)  # a body of many segments, after 100-continue
        body, header_length = _binary_request(x)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /v2/models/digits/infer HTTP/1.1\r\nExpect: 100-continue\r\n"
                + f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {header_length}\r\n\r\n".encode()
            )
            assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            for i in range(0, len(body), 10000):
                s.sendall(body[i : i + 10000])
            reply = b""
            while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < 12000:
                reply += s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Type: application/octet-stream" in reply
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        idle.sendall(live)
        assert idle.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        assert server.stop(5)
    with idle:  # an idle keep-alive connection is closed when the server stops
        assert idle.recv(100) == b""


def test_the_command_line_refuses_a_missing_models_folder(tmp_path: Path) -> None:
    from evc.device.infer.cli import main

    assert main(["--models-dir", str(tmp_path / "none"), "--port", "0"]) == 2


# ---------------------------------------------------------------- the server as a process
@dataclass
class EdgeServer:
    proc: subprocess.Popen[bytes]
    port: int
    models: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def get(self, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.url}{path}", data=data)  # noqa: S310 - loopback
        try:
            with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


@pytest.fixture
def edge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., EdgeServer]]:
    """Start ``python -m evc_edge_infer`` (evc/device/infer copied alone) on a free port."""
    started: list[EdgeServer] = []

    def start(models: Path, *extra: str) -> EdgeServer:
        work = tmp_path_factory.mktemp("infer")
        shutil.copytree(INFER_SRC, work / STANDALONE_PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
        port = free_port()
        log_path = work / "server.log"
        args = [
            DEVICE_PYTHON,
            "-m",
            STANDALONE_PACKAGE,
            "--models-dir",
            str(models),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "1",
            *extra,
        ]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(args, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        srv = EdgeServer(proc, port, models, log_path)
        started.append(srv)

        def up() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return srv.get("/v2/health/live")[0] == 200
            except OSError:
                return False

        wait_until(up, 30, "the edge inference server to listen")
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.mark.integration
def test_a_standard_client_gets_what_onnx_runtime_gives(
    edge_server: Callable[..., EdgeServer], tmp_path: Path, digits: tuple[bytes, Dataset]
) -> None:
    import onnxruntime as ort
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    data, d = digits
    srv = edge_server(models_folder(tmp_path / "models", {("digits", "1"): data}))
    client = httpclient.InferenceServerClient(url=srv.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert client.get_server_metadata()["name"] == "evc-edge-infer"
    meta = client.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"

    local = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = d.X_test.astype(np.float32)
    for batch, binary in ((1, True), (1, False), (32, True), (len(x), False)):
        inp = httpclient.InferInput("X", [batch, 64], "FP32")
        inp.set_data_from_numpy(x[:batch], binary_data=binary)
        res = client.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput("probs", binary_data=binary)])
        probs = res.as_numpy("probs")
        np.testing.assert_allclose(probs, local.run(None, {"X": x[:batch]})[0], rtol=1e-6, atol=1e-7)
        if batch == len(x):
            assert float((probs.argmax(1) == d.y_test).mean()) > 0.9
    res = client.infer("digits", [inp], model_version="1")  # no outputs named: all of them
    assert res.get_response()["model_version"] == "1" and res.as_numpy("probs").shape == (len(x), 10)
    assert [e["state"] for e in client.get_model_repository_index()] == ["READY"]

    bad = httpclient.InferInput("X", [1, 63], "FP32")
    bad.set_data_from_numpy(x[:1, :63])
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits", [bad])
    assert err.value.status() == "400" and "the model expects [-1, 64]" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("resnet", [inp])
    assert err.value.status() == "404" and err.value.message() == "unknown model resnet"
    assert srv.get("/v2/models/digits/infer", b"{not json")[0] == 400
    status, body = srv.get("/v2/models/resnet/ready")
    assert status == 404 and json.loads(body) == {"error": "unknown model resnet"}

    metrics = srv.get("/metrics")[1].decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(metrics)
        for s in fam.samples
    }
    ok = (("model", "digits"), ("status", "200"), ("version", "1"))
    assert got[("evc_infer_requests_total", ok)] == 5
    assert got[("evc_infer_requests_total", (("model", "digits"), ("status", "400"), ("version", "1")))] == 2
    assert got[("evc_infer_errors_total", (("model", "_unknown"), ("reason", "not_found")))] == 1
    assert got[("evc_infer_request_duration_seconds_count", (("model", "digits"), ("version", "1")))] == 5
    assert got[("evc_infer_batch_size_bucket", (("le", "1.0"), ("model", "digits"), ("version", "1")))] == 2
    assert got[("evc_infer_batch_size_bucket", (("le", "+Inf"), ("model", "digits"), ("version", "1")))] == 5
    sha = json.loads((srv.models / "digits" / "1" / "model.json").read_text())["sha256"]
    assert got[("evc_infer_model_ready", (("model", "digits"), ("sha256", sha), ("version", "1")))] == 1
    client.close()
    assert srv.stop() == 0
    assert "stopped" in srv.log_path.read_text()


@pytest.mark.integration
def test_sighup_rescans_and_sigterm_stops_cleanly(
    edge_server: Callable[..., EdgeServer], tmp_path: Path, digits: tuple[bytes, Dataset]
) -> None:
    data, _ = digits
    models = models_folder(tmp_path / "models", {("digits", "1"): data})
    srv = edge_server(models, "--builtin-metrics", "--max-body-mb", "0.001")  # 1,048 bytes
    models_folder(models, {("digits", "2"): data})
    srv.proc.send_signal(signal.SIGHUP)

    def versions() -> Any:
        return json.loads(srv.get("/v2/models/digits")[1])["versions"] == ["1", "2"]

    wait_until(versions, 10, "version 2 to load after SIGHUP")
    doc = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    status, body = srv.get("/v2/models/digits/infer", json.dumps(doc).encode())
    assert status == 200 and json.loads(body)["model_version"] == "2"
    status, body = srv.get("/v2/models/digits/infer", b" " * 2000)
    assert status == 413 and json.loads(body) == {"error": "the body is 2000 bytes, more than the limit of 1048"}
    metrics = srv.get("/metrics")[1].decode()
    assert 'evc_infer_requests_total{model="digits",version="2",status="200"} 1.0' in metrics
    assert "process_cpu_seconds_total" not in metrics  # the built-in metrics, not prometheus_client's
    assert srv.stop() == 0
    text = srv.log_path.read_text()
    assert "SIGHUP: rescanning" in text and "loaded digits:2" in text and "stopped" in text
