"""The controller's side of the link to a device's edge inference server: Open Inference
Protocol requests with binary tensors over one kept-alive HTTP connection, timed; and the link's
round-trip time and bandwidth, measured through it.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evc.errors import DeviceError, ValidationError
from evc.inference.cuts import Link

HEADER = "Inference-Header-Content-Length"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` as (host, port); a bad one is a :class:`ValidationError`."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(f"endpoint must be host:port, got {endpoint!r}", field="endpoint")
    return host, int(port)


@dataclass
class Reply:
    """An inference's output, the bytes that crossed the link each way and the time it took."""

    output: np.ndarray
    sent: int
    received: int
    seconds: float


@dataclass
class EdgeClient:
    """One kept-alive connection to an edge server (``endpoint``: host:port, maybe a link's)."""

    endpoint: str
    timeout: float = 30.0
    _conn: http.client.HTTPConnection | None = None
    _inputs: dict[tuple[str, str], str] = field(default_factory=dict)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            host, port = parse_endpoint(self.endpoint)
            self._conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        for attempt in (1, 2):  # a kept-alive connection the server closed: once more on a new one
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2:
                    raise DeviceError(f"the edge server at {self.endpoint} did not answer: {exc}") from exc
        raise AssertionError("unreachable")

    def wait_ready(self, model: str, version: str, timeout: float = 30.0) -> None:
        """Wait until the server has loaded *model* (after a reload: SIGHUP rescans its folder)."""
        deadline = time.monotonic() + timeout
        while True:
            status, _, body = self.request("GET", f"/v2/models/{model}/versions/{version}/ready")
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise DeviceError(f"model {model}:{version} did not become ready at {self.endpoint} ({status})")
            time.sleep(0.05)  # waiting for a reload, not in the inference path

    def input_name(self, model: str, version: str) -> str:
        key = (model, version)
        if key not in self._inputs:
            status, _, body = self.request("GET", f"/v2/models/{model}/versions/{version}")
            if status != 200:
                raise DeviceError(
                    f"model {model}:{version} is not served at {self.endpoint} ({status}: {body[:200]!r})"
                )
            self._inputs[key] = str(json.loads(body)["inputs"][0]["name"])
        return self._inputs[key]

    def infer(self, model: str, version: str, x: np.ndarray) -> Reply:
        """Run *model* on *x* (binary tensors both ways): its first output."""
        x = np.ascontiguousarray(x)
        dt = {v: k for k, v in DATATYPES.items()}.get(x.dtype.type)
        if dt is None:
            raise ValidationError(f"tensors of {x.dtype} are not supported here")
        raw = x.tobytes()
        head = json.dumps({
            "inputs": [{"name": self.input_name(model, version), "shape": list(x.shape), "datatype": dt,
                        "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True},
        }).encode()  # fmt: skip
        body = head + raw
        t0 = time.perf_counter()
        status, headers, data = self.request(
            "POST", f"/v2/models/{model}/versions/{version}/infer", body,
            {"Content-Type": "application/octet-stream", HEADER: str(len(head))},
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        if status != 200:
            raise DeviceError(f"inference of {model}:{version} at {self.endpoint} failed ({status}: {data[:300]!r})")
        return Reply(decode_first_output(data, headers.get(HEADER.lower())), len(body), len(data), seconds)

    def ping(self) -> float:
        t0 = time.perf_counter()
        status, _, _ = self.request("GET", "/v2/health/live")
        if status != 200:
            raise DeviceError(f"the edge server at {self.endpoint} is not live ({status})")
        return time.perf_counter() - t0


def decode_first_output(data: bytes, header_length: str | None) -> np.ndarray:
    n = int(header_length) if header_length else len(data)
    doc: dict[str, Any] = json.loads(data[:n])
    out = doc["outputs"][0]
    dtype = DATATYPES[out["datatype"]]
    if "binary_data_size" in out.get("parameters", {}):
        arr = np.frombuffer(data[n : n + int(out["parameters"]["binary_data_size"])], dtype=dtype)
    else:
        arr = np.asarray(out["data"], dtype=dtype)
    return arr.reshape(out["shape"])


def measure_link(client: EdgeClient, echo: tuple[str, str], probe: np.ndarray, rounds: int = 7) -> Link:
    """The link's RTT (a request's fixed cost: the echo model, its input back as output, on one
    item; median of rounds) and bandwidth (the echo on *probe*, whose reply is large:
    ``(bytes × 8) / (time − RTT)``, the median of rounds)."""
    client.ping()
    small = probe[:1]
    client.infer(*echo, small)
    base = statistics.median(client.infer(*echo, small).seconds for _ in range(rounds))
    rates = []
    for _ in range(max(3, rounds // 2)):
        r = client.infer(*echo, probe)
        rates.append(8.0 * (r.received - small.nbytes) / max(r.seconds - base, 1e-6))
    return Link(bandwidth_bps=statistics.median(rates), rtt_s=base)


__all__ = ["EdgeClient", "Reply", "decode_first_output", "measure_link", "parse_endpoint"]
