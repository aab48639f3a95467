"""A small Open Inference Protocol (KServe v2 REST) client for EVC's edge servers: one
keep-alive HTTP connection per device, tensors sent and received as binary data (the
``binary_tensor_data`` extension), so a chunk of thousands of items costs one request and no
JSON number formatting."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from evc.errors import InferFailed, ValidationError

HEADER_LENGTH = "Inference-Header-Content-Length"

#: numpy dtype -> Open Inference Protocol datatype
DATATYPES = {
    "float32": "FP32", "float64": "FP64", "float16": "FP16", "int8": "INT8", "int16": "INT16", "int32": "INT32",
    "int64": "INT64", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "bool": "BOOL",
}  # fmt: skip
NUMPY = {v: k for k, v in DATATYPES.items()}


@dataclass(frozen=True)
class ModelIO:
    """What a served model takes and gives: its first input and output (name, datatype, shape)."""

    model: str
    version: str
    input: str
    datatype: str
    shape: tuple[int, ...]  # the input's shape without the batch dimension
    output: str


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValidationError(f"endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def encode_request(name: str, batch: np.ndarray, output: str) -> tuple[bytes, dict[str, str]]:
    """An infer request body for *batch* (binary input, binary output *output*) and its headers."""
    raw = np.ascontiguousarray(batch).tobytes()
    head = {
        "inputs": [{
            "name": name, "shape": list(batch.shape), "datatype": DATATYPES[str(batch.dtype)],
            "parameters": {"binary_data_size": len(raw)},
        }],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }  # fmt: skip
    body = json.dumps(head, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(body))}
    return body + raw, headers


def decode_response(body: bytes, header_length: str | None, output: str) -> np.ndarray:
    """The tensor *output* of an infer response (binary or JSON)."""
    n = int(header_length) if header_length else len(body)
    head = json.loads(body[:n])
    pos = n
    for t in head.get("outputs") or []:
        size = (t.get("parameters") or {}).get("binary_data_size")
        dtype = np.dtype(NUMPY.get(str(t.get("datatype")), "float32"))
        if t.get("name") == output:
            shape = [int(x) for x in t.get("shape") or []]
            if size is None:
                return np.asarray(t.get("data"), dtype=dtype).reshape(shape)
            return np.frombuffer(body[pos : pos + int(size)], dtype=dtype).reshape(shape)
        pos += int(size or 0)
    raise ValueError(f"the response has no output {output!r}")


class Connection:
    """One keep-alive HTTP connection to an edge server (not thread-safe: one per worker)."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.host, self.port = split_endpoint(endpoint)
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:  # fmt: skip
        """(status, body, headers); :class:`InferFailed` when the server cannot be reached."""
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                resp = self._conn.getresponse()
                data = resp.read()
                return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt:
                    raise InferFailed(f"{self.endpoint}: {type(exc).__name__}", endpoint=self.endpoint) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise InferFailed(f"{self.endpoint}: {exc or type(exc).__name__}", endpoint=self.endpoint) from exc
        raise AssertionError("unreachable")

    def model_io(self, model: str, version: str) -> ModelIO:
        """The served model's first input and output, from its metadata."""
        status, body, _ = self.request("GET", f"/v2/models/{model}/versions/{version}")
        if status != 200:
            raise InferFailed(f"{self.endpoint}: model {model}:{version} metadata: HTTP {status}", status=status)
        meta: dict[str, Any] = json.loads(body)
        inp, out = meta["inputs"][0], meta["outputs"][0]
        shape = tuple(int(x) for x in inp["shape"][1:])
        return ModelIO(model, version, inp["name"], inp["datatype"], shape, out["name"])

    def infer(self, io: ModelIO, batch: np.ndarray) -> np.ndarray:
        """Run *batch* through the model; its output tensor."""
        body, headers = encode_request(io.input, batch, io.output)
        status, data, hdrs = self.request("POST", f"/v2/models/{io.model}/versions/{io.version}/infer", body, headers)
        if status != 200:
            raise InferFailed(f"{self.endpoint}: HTTP {status}: {data[:200]!r}", status=status)
        return decode_response(data, hdrs.get(HEADER_LENGTH.lower()), io.output)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


__all__ = ["Connection", "InferFailed", "ModelIO", "decode_response", "encode_request", "split_endpoint"]
