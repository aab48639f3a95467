"""Per-operator cost features of an ONNX graph, for the latency predictor (pure).

One sample's work, by operator class: FLOPs of fp32 convolutions (``conv``), of fp32 matrix
products (``gemm``: Gemm, MatMul), of their integer forms (``qconv``: ConvInteger, QLinearConv;
``qgemm``: MatMulInteger, QLinearMatMul), the tensor elements every node writes (``elements``:
the elementwise and data-movement work), the unrolled inputs of convolutions (``im2col``: output
positions × input channels per group × kernel size, what makes a convolution with few channels
cost more than its FLOPs say) and the node count (``nodes``: per-node overhead). The
FLOPs come from EVC's graph analysis (:func:`evc.models.metadata.node_flops`); a symbolic batch
dimension is taken as 1, and :func:`at_batch` scales to a batch size.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

from evc.models import metadata

#: the features, in the order the predictor's vectors use; ``call`` is 1 per inference
NAMES = ("call", "nodes", "elements", "conv", "gemm", "qconv", "qgemm", "im2col")
#: the features that grow with the batch size
PER_SAMPLE = ("elements", "conv", "gemm", "qconv", "qgemm", "im2col")

#: integer operators and (the float operator whose FLOPs they do, the inputs that play X and W)
_INTEGER_OPS = {
    "ConvInteger": ("Conv", 0, 1, "qconv"),
    "QLinearConv": ("Conv", 0, 3, "qconv"),
    "MatMulInteger": ("MatMul", 0, 1, "qgemm"),
    "QLinearMatMul": ("MatMul", 0, 3, "qgemm"),
}
_FLOAT_OPS = {"Conv": "conv", "Gemm": "gemm", "MatMul": "gemm"}


def of_bytes(data: bytes) -> dict[str, float]:
    """The features of the serialised ONNX model *data* (one sample)."""
    import onnx

    return of_model(onnx.load_model_from_string(data))


def of_model(model: Any) -> dict[str, float]:
    import onnx

    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # an unusual graph: the declared shapes only
        graph = model.graph
    shapes = metadata._shapes(graph)
    out = dict.fromkeys(NAMES, 0.0)
    out["call"] = 1.0
    for node in graph.node:
        out["nodes"] += 1
        for name in node.output:
            if name in shapes:
                out["elements"] += math.prod(shapes[name])
        flops, cls = _node(node, shapes)
        if cls and flops:
            out[cls] += flops
            if cls in ("conv", "qconv"):
                out["im2col"] += _im2col(node, shapes)
    return out


def _im2col(node: Any, shapes: dict[str, list[int]]) -> float:
    """Output positions × input channels per group × kernel size of a convolution (one sample)."""
    w_index = 3 if node.op_type == "QLinearConv" else 1
    w = shapes.get(node.input[w_index]) if len(node.input) > w_index else None
    out = shapes.get(node.output[0])
    if not w or not out or len(out) < 3:
        return 0.0
    return float(math.prod(out[2:]) * math.prod(w[1:]))


def _node(node: Any, shapes: dict[str, list[int]]) -> tuple[int | None, str | None]:
    if node.op_type in _FLOAT_OPS:
        return metadata.node_flops(node, shapes), _FLOAT_OPS[node.op_type]
    if node.op_type in _INTEGER_OPS:
        like, x, w, cls = _INTEGER_OPS[node.op_type]
        ins = list(node.input)
        if len(ins) <= max(x, w):
            return None, None
        shim = SimpleNamespace(op_type=like, input=[ins[x], ins[w]], output=node.output, attribute=node.attribute)
        return metadata.node_flops(shim, shapes), cls
    return None, None


def at_batch(features: dict[str, float], batch: int) -> dict[str, float]:
    """*features* of one sample, for an inference of *batch* samples."""
    return {k: float(v) * (batch if k in PER_SAMPLE else 1) for k, v in features.items()}


def vector(features: dict[str, float]) -> list[float]:
    return [float(features.get(k, 0.0)) for k in NAMES]
