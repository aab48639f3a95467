"""A device's calibration micro-benchmark: tiny ONNX graphs that each stress one cost feature
(:mod:`evc.recommend.features`), timed on the device by the profiling runner, and the per-device
cost of one unit of each feature solved from those timings (pure).

The graphs are built here with ``onnx.helper`` and numpy weights (deterministic); the integer
ones are ONNX Runtime's dynamic quantization of the float ones, as EVC's int8 variants are.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from evc.recommend import features as feats

#: the calibration graphs, in the order they run
GRAPHS = ("call", "nodes", "elements", "conv", "gemm", "qconv", "qgemm", "thin", "mid", "long")
#: the graph whose wall-clock / CPU time says how much slower a long inference runs on the
#: device than its CPU time (CPU quota, other load): not used for the coefficients
LONG = "long"
#: the runner's counts for a calibration (short: a few seconds of CPU on a slow device)
WARMUP, TIMED, BATCH = 3, 25, 1


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any], name: str) -> bytes:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, f"evc-calibrate-{name}", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="evc-calibrate")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _relu_chain(n: int, width: int, name: str) -> bytes:
    from onnx import TensorProto as T
    from onnx import helper as h

    nodes = [h.make_node("Relu", [f"t{i}" if i else "X"], [f"t{i + 1}" if i + 1 < n else "Y"]) for i in range(n)]
    io = [h.make_tensor_value_info(x, T.FLOAT, [1, width]) for x in ("X", "Y")]
    return _model(nodes, io[:1], io[1:], [], name)


def _conv(c: int = 32, hw: int = 32, c_out: int | None = None, n: int = 1, name: str = "conv") -> bytes:
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(1)
    co = c_out or c
    w = nh.from_array((rng.standard_normal((co, c, 3, 3)) * 0.1).astype(np.float32), "W")
    b = nh.from_array(np.zeros(co, np.float32), "B")
    node = h.make_node("Conv", ["X", "W", "B"], ["Y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    return _model([node], [h.make_tensor_value_info("X", T.FLOAT, [n, c, hw, hw])],
                  [h.make_tensor_value_info("Y", T.FLOAT, [n, co, hw, hw])], [w, b], name)  # fmt: skip


def _gemm(m: int = 64, k: int = 512, n: int = 512) -> bytes:
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(2)
    w = nh.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "W")
    node = h.make_node("MatMul", ["X", "W"], ["Y"])
    return _model([node], [h.make_tensor_value_info("X", T.FLOAT, [m, k])],
                  [h.make_tensor_value_info("Y", T.FLOAT, [m, n])], [w], "gemm")  # fmt: skip


def quantize(data: bytes) -> bytes:
    """ONNX Runtime's dynamic int8 quantization of the model *data* (EVC's int8 variant)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="evc-calibrate-") as tmp:
        src, dest = Path(tmp) / "m.onnx", Path(tmp) / "m.int8.onnx"
        src.write_bytes(data)
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8)
        return dest.read_bytes()


def graphs() -> dict[str, bytes]:
    """The calibration graphs by name (deterministic bytes)."""
    conv, gemm = _conv(), _gemm()
    return {
        "call": _relu_chain(1, 1, "call"),
        "nodes": _relu_chain(48, 8, "nodes"),
        "elements": _relu_chain(8, 1 << 18, "elements"),
        "conv": conv,
        "gemm": gemm,
        "qconv": quantize(conv),
        "qgemm": quantize(gemm),
        "thin": _conv(8, 128, c_out=2, name="thin"),
        "mid": _conv(32, 32, n=24, name="mid"),
        "long": _conv(32, 32, n=160, name="long"),
    }


# ---------------------------------------------------------------------------- solving (pure)
def nnls(a: np.ndarray, b: np.ndarray, iterations: int = 500) -> np.ndarray:
    """Non-negative least squares min ||a x - b|| with x >= 0 (coordinate descent; small problems)."""
    x = np.zeros(a.shape[1])
    col = (a * a).sum(axis=0)
    r = b - a @ x
    for _ in range(iterations):
        for j in range(a.shape[1]):
            if col[j] <= 0:
                continue
            new = max(0.0, x[j] + float(a[:, j] @ r) / col[j])
            r -= a[:, j] * (new - x[j])
            x[j] = new
    return x


def coefficients(timings_ms: dict[str, float], graph_features: dict[str, dict[str, float]]) -> dict[str, float]:
    """The CPU milliseconds one unit of each feature costs on the device, from the CPU time per
    inference of each calibration graph (*timings_ms*) and the graphs' features: non-negative
    least squares on relative errors, so small graphs count as much as big ones."""
    names = [g for g in GRAPHS if g != LONG and timings_ms.get(g, 0) > 0 and g in graph_features]
    a = np.array([feats.vector(graph_features[g]) for g in names], dtype=float)
    y = np.array([timings_ms[g] for g in names], dtype=float)
    if not len(names):
        return dict.fromkeys(feats.NAMES, 0.0)
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    x = nnls(a / scale / y[:, None], np.ones(len(names)))
    return {k: float(v) for k, v in zip(feats.NAMES, x / scale, strict=True)}


def slowdown(outs: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Wall-clock p50 / CPU p50 of the long calibration graph (None when it did not run)."""
    res = ((outs.get(LONG) or {}).get("results") or [{}])[0]
    wall, cpu = res.get("p50_ms"), res.get("cpu_p50_ms")
    return max(1.0, float(wall) / float(cpu)) if wall and cpu else None


def summary(coef: dict[str, float]) -> dict[str, float | None]:
    """What a person reads of the coefficients: GFLOP/s per class, ns per element, µs per node."""

    def rate(ms_per_flop: float) -> float | None:
        return round(1e-6 / ms_per_flop, 3) if ms_per_flop > 0 else None

    return {
        "conv_gflops": rate(coef.get("conv", 0.0)), "gemm_gflops": rate(coef.get("gemm", 0.0)),
        "qconv_gops": rate(coef.get("qconv", 0.0)), "qgemm_gops": rate(coef.get("qgemm", 0.0)),
        "ns_per_element": round(coef.get("elements", 0.0) * 1e6, 4),
        "us_per_node": round(coef.get("nodes", 0.0) * 1e3, 3),
        "us_per_call": round(coef.get("call", 0.0) * 1e3, 3),
        "ns_per_im2col": round(coef.get("im2col", 0.0) * 1e6, 4),
    }  # fmt: skip
