"""Tensors of the Open Inference Protocol (KServe v2 REST) to and from numpy arrays.

A tensor in a request or response is JSON: ``{"name", "shape", "datatype", "data"}``, ``data``
in row-major order, flat or nested. With the binary tensor data extension (what ``tritonclient``
sends by default) a tensor's ``parameters.binary_data_size`` says its bytes follow the JSON
header in the body instead; the header's length is in the ``Inference-Header-Content-Length``
HTTP header. Binary tensors are the array's bytes, little-endian, row-major; ``BYTES`` elements
each carry a 4-byte little-endian length first.

Everything here raises :class:`TensorError` (a 400 for the client) on bad input.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Sequence

import numpy as np

#: the protocol's datatypes and their numpy dtypes (``BYTES``: an object array of bytes or str)
DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}

#: ONNX Runtime's element type names (``NodeArg.type``) to the protocol's datatypes
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

HEADER_LENGTH = "Inference-Header-Content-Length"


class TensorError(ValueError):
    """A request's tensor cannot be read: the message says why (the client gets a 400)."""


#: native-order numpy dtypes to the protocol's names (``BYTES`` aside)
_NAMES: dict[Any, str] = {np.dtype(t): name for name, t in DATATYPES.items() if name != "BYTES"}


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of *array*'s dtype."""
    name = _NAMES.get(array.dtype)
    if name is not None:
        return name
    if array.dtype == np.object_ or array.dtype.kind in ("U", "S"):
        return "BYTES"
    raise TensorError(f"no protocol datatype for numpy dtype {array.dtype}")


def _shape(tensor: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TensorError(f"input {name}: shape must be a list of integers")
    if any(d < 0 for d in shape):
        raise TensorError(f"input {name}: shape {shape} has a negative dimension")
    return tuple(shape)


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def decode_input(tensor: Any, binary: memoryview | None = None) -> tuple[str, np.ndarray]:
    """One request input as (name, array). *binary* is this tensor's slice of the binary section
    when its ``parameters.binary_data_size`` said it has one."""
    if not isinstance(tensor, dict):
        raise TensorError("each input must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise TensorError("an input has no name")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise TensorError("input {}: unknown datatype {!r} (one of {})".format(name, datatype, ", ".join(DATATYPES)))
    shape = _shape(tensor, name)
    count = _count(shape)
    if binary is not None:
        array = _from_bytes(name, datatype, bytes(binary) if datatype == "BYTES" else binary, count)
    else:
        if "data" not in tensor:
            raise TensorError(f"input {name}: no data (and no binary_data_size)")
        array = _from_json(name, datatype, tensor["data"])
    if array.size != count:
        raise TensorError(f"input {name}: {array.size} elements for shape {list(shape)} ({count} expected)")
    return name, array.reshape(shape)


def _from_json(name: str, datatype: str, data: Any) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat: list[Any] = []
        _flatten(data, flat)
        if not all(isinstance(x, str) for x in flat):
            raise TensorError(f"input {name}: BYTES data must be strings")
        return np.array(flat, dtype=np.object_)
    try:
        parsed = np.asarray(data)  # numpy infers the JSON values' kind: all of them, vectorised
    except (ValueError, TypeError, OverflowError) as exc:
        raise TensorError(f"input {name}: data is not a regular array of numbers: {exc}") from None
    if parsed.size == 0:
        return np.zeros(0, dtype=DATATYPES[datatype])
    kind = parsed.dtype.kind
    if datatype == "BOOL":
        ok = kind == "b"
    elif datatype.startswith(("INT", "UINT")):
        ok = kind in "iu"
        if ok:
            info = np.iinfo(DATATYPES[datatype])
            ok = bool(parsed.min() >= info.min and parsed.max() <= info.max)
    else:
        ok = kind in "iuf"
    if not ok:
        raise TensorError(f"input {name}: data is not {datatype} (JSON values of numpy kind {kind!r})")
    return parsed.astype(DATATYPES[datatype], copy=False).reshape(-1)


def _flatten(data: Any, out: list[Any]) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten(item, out)
    else:
        out.append(data)


def _from_bytes(name: str, datatype: str, raw: Any, count: int) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_elements(name, raw)
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise TensorError(
            f"input {name}: {len(raw)} bytes of binary data for {count} {datatype} elements"
            f" ({count * dtype.itemsize} expected)"
        )
    return np.frombuffer(raw, dtype=dtype)


def _bytes_elements(name: str, raw: bytes) -> np.ndarray:
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise TensorError(f"input {name}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise TensorError(f"input {name}: truncated BYTES element")
        items.append(raw[pos : pos + n])
        pos += n
    return np.array(items, dtype=np.object_)


def encode_output(name: str, array: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes]:
    """One response output: its JSON and, when *binary*, its bytes (else ``b""``)."""
    datatype = datatype_of(array)
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        raw = _to_bytes(array, datatype)
        out["parameters"] = {"binary_data_size": len(raw)}
        return out, raw
    if datatype == "BYTES":
        out["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    else:
        out["data"] = array.reshape(-1).tolist()
    return out, b""


def _to_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for x in array.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode("utf-8")
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """A request body as (its JSON, its binary section). *header_length* is the value of
    ``Inference-Header-Content-Length`` (None: the whole body is JSON)."""
    if header_length is None:
        json_part, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise TensorError(f"{HEADER_LENGTH} is not a number: {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise TensorError(f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        json_part, rest = body[:n], body[n:]
    try:
        doc = json.loads(json_part)
    except ValueError as exc:
        raise TensorError(f"the request is not JSON: {exc}") from None
    return doc, memoryview(rest)


def decode_inputs(doc: Any, binary: memoryview) -> dict[str, np.ndarray]:
    """The inputs of an inference request (its JSON *doc* and binary section) by name."""
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise TensorError("the request has no inputs (a list of tensors)")
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for tensor in doc["inputs"]:
        size = _binary_size(tensor)
        chunk = None
        if size is not None:
            if pos + size > len(binary):
                raise TensorError("binary data ends before input {}'s {} bytes".format(tensor.get("name"), size))
            chunk = binary[pos : pos + size]
            pos += size
        name, array = decode_input(tensor, chunk)
        if name in arrays:
            raise TensorError(f"input {name} is given twice")
        arrays[name] = array
    if pos != len(binary):
        raise TensorError(f"{len(binary) - pos} bytes of binary data after the last binary input")
    return arrays


def _binary_size(tensor: Any) -> int | None:
    params = tensor.get("parameters") if isinstance(tensor, dict) else None
    if not isinstance(params, dict) or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TensorError("input {}: binary_data_size must be a non-negative integer".format(tensor.get("name")))
    return size


def requested_outputs(doc: dict[str, Any]) -> tuple[list[str] | None, dict[str, bool], bool]:
    """What the request asks back: (output names or None for all, binary per named output,
    the request-wide ``binary_data_output`` default)."""
    params = doc.get("parameters")
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outputs = doc.get("outputs")
    if outputs is None:
        return None, {}, default_binary
    if not isinstance(outputs, list):
        raise TensorError("outputs must be a list of objects with a name")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise TensorError("outputs must be a list of objects with a name")
        names.append(out["name"])
        p = out.get("parameters")
        if isinstance(p, dict) and "binary_data" in p:
            binary[out["name"]] = bool(p["binary_data"])
    return names, binary, default_binary


def encode_response(
    head: dict[str, Any], outputs: dict[str, np.ndarray], binary: dict[str, bool], default_binary: bool
) -> tuple[bytes, int | None]:
    """The response body for *outputs* (in order) and the JSON header's length when a binary
    section follows (None: the body is JSON only)."""
    tensors = []
    raws = []
    for name, array in outputs.items():
        tensor, raw = encode_output(name, array, binary.get(name, default_binary))
        tensors.append(tensor)
        if raw or "parameters" in tensor:
            raws.append(raw)
    body = json.dumps(dict(head, outputs=tensors), separators=(",", ":")).encode()
    if not raws:
        return body, None
    return body + b"".join(raws), len(body)
