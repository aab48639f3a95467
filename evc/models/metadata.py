"""What EVC reads from an ONNX graph itself (pure; unit-tested): inputs and outputs with their
shapes and element types, the opsets, the parameter count, the operation counts and a FLOP
estimate for the operators that dominate vision models (Conv, Gemm, MatMul).

FLOPs count a multiply-add as two operations, for one sample: a symbolic dimension (a batch
``N``) is taken as 1; a node whose shapes ONNX shape inference cannot tell is left out of the
estimate and counted in ``flops_unknown_nodes``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from evc.errors import ValidationError
from evc.model import JSON

#: the operators the FLOP estimate covers
FLOP_OPS = ("Conv", "Gemm", "MatMul")


def extract(data: bytes) -> JSON:
    """The metadata of the ONNX model serialised in *data* (:class:`ValidationError` when it
    is not one)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ValidationError(f"the file is not an ONNX model: {exc}", field="file") from exc
    if not model.graph.node and not model.graph.input:
        raise ValidationError("the file is not an ONNX model (no graph)", field="file")
    return describe(model)


def describe(model: Any) -> JSON:
    """The metadata of an ``onnx.ModelProto``."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an unusual graph: the declared shapes only
        inferred = model
    graph = inferred.graph
    init_names = {t.name for t in graph.initializer}
    shapes = _shapes(graph)
    counts = Counter(n.op_type for n in graph.node)
    flops, by_op, unknown = _flops(graph, shapes)
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    return {
        "inputs": [_tensor(v) for v in graph.input if v.name not in init_names],
        "outputs": [_tensor(v) for v in graph.output],
        "opset": opsets.get("ai.onnx"),
        "opsets": opsets,
        "ir_version": int(model.ir_version),
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x) or None,
        "parameters": sum(math.prod(t.dims) for t in graph.initializer),
        "nodes": sum(counts.values()),
        "operations": dict(sorted(counts.items())),
        "flops": flops,
        "flops_by_op": by_op,
        "flops_unknown_nodes": unknown,
    }


def _elem_type(code: int) -> str:
    import onnx

    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(code))
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(code).lower() if code else "undefined"


def _dims(ttype: Any) -> list[int | str | None] | None:
    if not ttype.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in ttype.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _tensor(v: Any) -> JSON:
    t = v.type
    if t.HasField("tensor_type"):
        return {"name": v.name, "type": _elem_type(t.tensor_type.elem_type), "shape": _dims(t.tensor_type)}
    return {"name": v.name, "type": t.WhichOneof("value") or "unknown", "shape": None}


def _shapes(graph: Any) -> dict[str, list[int]]:
    """Known shapes by value name, symbolic or unknown dimensions taken as 1."""
    out: dict[str, list[int]] = {}
    for t in graph.initializer:
        out[t.name] = [int(d) for d in t.dims]
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if v.type.HasField("tensor_type"):
            dims = _dims(v.type.tensor_type)
            if dims is not None:
                out.setdefault(v.name, [d if isinstance(d, int) and d > 0 else 1 for d in dims])
    return out


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def node_flops(node: Any, shapes: dict[str, list[int]]) -> int | None:
    """FLOPs of one Conv, Gemm or MatMul node (None when a shape it needs is unknown)."""
    ins = [shapes.get(i) if i else None for i in node.input]
    if node.op_type == "Gemm":
        a, b = ins[0], ins[1]
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return 2 * m * k * n + (m * n if len(node.input) > 2 and node.input[2] else 0)
    if node.op_type == "MatMul":
        a, b = ins[0], ins[1]
        if a is None or b is None or not a or not b:
            return None
        a2 = [1, *a] if len(a) == 1 else a
        b2 = [*b, 1] if len(b) == 1 else b
        batch = _broadcast(a2[:-2], b2[:-2])
        return 2 * math.prod(batch) * a2[-2] * a2[-1] * b2[-1]
    if node.op_type == "Conv":
        w = ins[1] if len(ins) > 1 else None
        out = shapes.get(node.output[0])
        if w is None or out is None or len(out) < 3 or len(w) != len(out):
            return None
        n, c_out, spatial = out[0], out[1], out[2:]
        # the weight is (C_out, C_in / group, *kernel): one multiply-add per weight of a filter
        per_output = 2 * w[1] * math.prod(w[2:])
        bias = 1 if len(node.input) > 2 and node.input[2] else 0
        return n * c_out * math.prod(spatial) * (per_output + bias)
    return None


def _broadcast(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + a, [1] * (n - len(b)) + b
    return [max(x, y) for x, y in zip(a, b, strict=True)]


def _flops(graph: Any, shapes: dict[str, list[int]]) -> tuple[int, dict[str, int], int]:
    total, unknown = 0, 0
    by_op: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in FLOP_OPS:
            continue
        f = node_flops(node, shapes)
        if f is None:
            unknown += 1
            continue
        total += f
        by_op[node.op_type] = by_op.get(node.op_type, 0) + f
    return total, by_op, unknown
