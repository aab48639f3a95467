"""Split computing, the pure part: the single-tensor cut points of an ONNX graph, the head and
tail models of a cut (``onnx.utils.Extractor``, as ``onnx.utils.extract_model``), and the cut
to pick from measured per-segment latency and the link's measured bandwidth and RTT.

A cut after node *i* of the topologically sorted graph is a candidate when exactly one tensor
(not a weight) crosses it: the head computes it on the device, it travels over the link, the
tail finishes in the cloud. The cut at the input (the device sends the input: cloud only) and
the one at the output (the device runs everything: edge only) are candidates too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, shape_inference

from evc.errors import ValidationError

#: the JSON header of a binary-tensor request and its reply, a fixed cost per request (bytes)
HEADER_BYTES = 400


@dataclass(frozen=True)
class Cut:
    """A candidate: the tensor sent over the link, its bytes per item, and the nodes on each side."""

    index: int
    tensor: str
    bytes_per_item: int
    head_nodes: int
    tail_nodes: int

    @property
    def label(self) -> str:
        return f"c{self.index}"


def _item_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes per item (all but the first dimension) of every tensor whose shape is known."""
    inferred = shape_inference.infer_shapes(model)
    g = inferred.graph
    out: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims or any(d <= 0 for d in dims[1:]):
            continue
        size = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
        out[vi.name] = size * int(math.prod(dims[1:]))
    return out


def candidates(model: onnx.ModelProto) -> list[Cut]:
    """Every single-tensor cut of *model*, from the input (cloud only) to the output (edge only)."""
    g = model.graph
    weights = {i.name for i in g.initializer}
    inputs = [i.name for i in g.input if i.name not in weights]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ValidationError("split computing needs a model with one input and one output", field="model")
    sizes = _item_bytes(model)
    nodes = list(g.node)
    consumers_after: list[set[str]] = []  # tensors used by nodes after position i, or as the output
    needed = {g.output[0].name}
    for node in reversed(nodes):
        consumers_after.append(set(needed))
        needed |= {x for x in node.input if x}
    consumers_after.reverse()
    available = {inputs[0]}
    cuts = [Cut(0, inputs[0], sizes.get(inputs[0], -1), 0, len(nodes))]
    for i, node in enumerate(nodes):
        available |= {x for x in node.output if x}
        crossing = (available & consumers_after[i]) - weights
        if i == len(nodes) - 1 or len(crossing) != 1:
            continue
        (t,) = crossing
        if t in sizes and t != cuts[-1].tensor:
            cuts.append(Cut(len(cuts), t, sizes[t], i + 1, len(nodes) - i - 1))
    out = g.output[0].name
    cuts.append(Cut(len(cuts), out, sizes.get(out, -1), len(nodes), 0))
    return cuts


def identity_model(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A model that returns its input (*tensor*'s type): the head of the input cut."""
    src = next(i for i in model.graph.input if i.name == tensor)
    out = onnx.ValueInfoProto()
    out.CopyFrom(src)
    out.name = tensor + "_out"
    graph = helper.make_graph([helper.make_node("Identity", [tensor], [out.name])], "identity", [src], [out])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="evc-split")
    m.ir_version = model.ir_version
    return m


def split(model: onnx.ModelProto, cut: Cut) -> tuple[onnx.ModelProto, onnx.ModelProto | None]:
    """The head (device) and tail (cloud; None at the output cut) of *model* at *cut*."""
    g = model.graph
    first, last = g.input[0].name, g.output[0].name
    if cut.tensor == first:
        return identity_model(model, first), model
    inferred = shape_inference.infer_shapes(model)
    ex = onnx.utils.Extractor(inferred)
    head = ex.extract_model([first], [cut.tensor])
    tail = None if cut.tensor == last else ex.extract_model([cut.tensor], [last])
    for m in (head, tail):
        if m is not None:
            m.ir_version = model.ir_version
    return head, tail


@dataclass(frozen=True)
class Link:
    """The link's measured bandwidth (bit/s) and round-trip time (s)."""

    bandwidth_bps: float
    rtt_s: float


@dataclass(frozen=True)
class Prediction:
    """A cut's predicted end-to-end latency for one request of ``batch`` items, in its parts."""

    cut: Cut
    device_s: float
    link_s: float
    cloud_s: float

    @property
    def total_s(self) -> float:
        return self.device_s + self.link_s + self.cloud_s


def transfer_s(link: Link, nbytes: int) -> float:
    """One request's time on the link: a round trip plus the bytes at the link's bandwidth."""
    return link.rtt_s + 8.0 * (nbytes + HEADER_BYTES) / link.bandwidth_bps


def predict(
    cuts: Sequence[Cut], device_s: Sequence[float], cloud_s: Sequence[float], link: Link, batch: int
) -> list[Prediction]:
    """Each cut's latency: its head on the device + its tensor over the link + its tail in the cloud."""
    if not (len(cuts) == len(device_s) == len(cloud_s)):
        raise ValidationError("one device and one cloud time per cut")
    return [
        Prediction(c, float(d), transfer_s(link, c.bytes_per_item * batch), float(t))
        for c, d, t in zip(cuts, device_s, cloud_s, strict=True)
    ]


def choose(preds: Sequence[Prediction]) -> tuple[Prediction, str]:
    """The cut with the least predicted latency, and a sentence saying why."""
    best = min(preds, key=lambda p: p.total_s)
    ranked = sorted(preds, key=lambda p: p.total_s)
    why = f"{best.cut.label} ({best.cut.tensor}) predicts {best.total_s * 1e3:.2f} ms: device {best.device_s * 1e3:.2f}"
    why += f" + link {best.link_s * 1e3:.2f} + cloud {best.cloud_s * 1e3:.2f} ms"
    if len(ranked) > 1:
        nxt = ranked[1]
        why += f"; next {nxt.cut.label} ({nxt.cut.tensor}) {nxt.total_s * 1e3:.2f} ms"
    return best, why


__all__ = ["Cut", "Link", "Prediction", "candidates", "choose", "identity_model", "predict", "split", "transfer_s"]
