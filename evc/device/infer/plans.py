"""Plans of repeated inference requests: the fixed path of a client that sends the same JSON
header with new binary tensors each time (``tritonclient``'s default).

With every input binary, a request's JSON header says everything but the tensor bytes: the
model version, each input's name, datatype, shape and place in the binary section, the outputs
asked for. The first such request is read, checked and answered the general way; its header then
keys a :class:`Plan`, and the next requests with the same header bytes skip JSON parsing and
checking: their inputs are numpy views of the body (no copy) and, when every output is binary,
the response's JSON header comes from a cache keyed by the outputs' dtypes and shapes.
A plan holds its :class:`ModelVersion`: it is only used while that version still serves.
"""

from __future__ import annotations

import sys
from typing import Any, Tuple

import numpy as np

from .tensors import DATATYPES, encode_response

#: a plan's input: name, dtype, element count, offset in the binary section, shape
PlannedInput = Tuple[str, Any, int, int, Tuple[int, ...]]
MAX_PLANS = 256
MAX_HEADER = 8192  # longer JSON headers are not planned (the cache holds each header's bytes)
MAX_REPLIES = 16  # response headers per plan (one per output shapes: batch sizes vary little)
_LITTLE = sys.byteorder == "little"  # native arrays' bytes are then the protocol's


class Plan:
    """What a repeated request header asks: the inputs' places, the outputs, the response head."""

    __slots__ = ("mv", "inputs", "size", "names", "binary", "default_binary", "head", "batch", "_replies")

    def __init__(
        self,
        mv: Any,
        inputs: list[PlannedInput],
        names: list[str],
        binary: dict[str, bool],
        default_binary: bool,
        head: dict[str, Any],
    ) -> None:
        self.mv = mv
        self.inputs = inputs
        self.size = sum(count * np.dtype(dtype).itemsize for _, dtype, count, _, _ in inputs)
        self.names = names
        self.binary = binary
        self.default_binary = default_binary
        self.head = head
        shape = inputs[0][4]
        self.batch = int(shape[0]) if shape else None
        all_binary = all(binary.get(n, default_binary) for n in names)
        self._replies: dict[tuple[Any, ...], bytes] | None = {} if all_binary and _LITTLE else None

    def arrays(self, body: Any, offset: int) -> dict[str, np.ndarray]:
        """The inputs as views of *body*, whose binary section starts at *offset*."""
        return {
            name: np.frombuffer(body, dtype, count, offset + start).reshape(shape)
            for name, dtype, count, start, shape in self.inputs
        }

    def encode(self, results: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
        """The response body and its JSON header's length, as :func:`encode_response` makes it."""
        replies = self._replies
        if replies is None:
            return encode_response(self.head, results, self.binary, self.default_binary)
        key = tuple((a.dtype.str, a.shape) for a in results.values())
        head = replies.get(key)
        if head is None:
            body, length = encode_response(self.head, results, self.binary, self.default_binary)
            if length is None or any(a.dtype.kind in "OSU" or not a.dtype.isnative for a in results.values()):
                return body, length
            if len(replies) >= MAX_REPLIES:
                replies.clear()
            replies[key] = body[:length]
            return body, length
        return head + b"".join(a.tobytes() for a in results.values()), len(head)


def plan_inputs(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[PlannedInput] | None:
    """The planned inputs of a request that was read and checked (*doc* its JSON header, *arrays*
    its inputs), or None when it cannot be planned (an input is JSON, or BYTES, or empty)."""
    planned: list[PlannedInput] = []
    pos = 0
    for tensor in doc["inputs"]:
        params = tensor.get("parameters")
        datatype = tensor["datatype"]
        if not isinstance(params, dict) or "binary_data_size" not in params or datatype == "BYTES":
            return None
        array = arrays[tensor["name"]]
        if array.size == 0:
            return None
        dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
        planned.append((tensor["name"], dtype, int(array.size), pos, tuple(array.shape)))
        pos += int(params["binary_data_size"])
    return planned


class Plans:
    """Plans by (model, version asked, JSON header bytes); cleared when it holds too many."""

    def __init__(self, limit: int = MAX_PLANS) -> None:
        self.limit = limit
        self._plans: dict[tuple[str, str | None, bytes], Plan] = {}

    def get(self, key: tuple[str, str | None, bytes]) -> Plan | None:
        return self._plans.get(key)

    def add(self, key: tuple[str, str | None, bytes], plan: Plan) -> None:
        if len(self._plans) >= self.limit:
            self._plans.clear()  # clients with ever-new headers (request ids): keep it bounded
        self._plans[key] = plan
