"""From training to deployment: a finished FL job's global model as an ONNX graph, measured and
registered in the model registry (``POST /api/v1/fl/jobs/{id}/export``, ``evc fl export``).

The graph is built from the weights with ``onnx.helper`` for the built-in models (input ``X``
(N, d) FP32, output ``probs`` (N, k) FP32, opset 17):

* ``softmax``: ``Gemm(X, W, b) -> Softmax``
* ``mlp``: ``Gemm -> Relu -> Gemm -> Softmax``
* ``cnn``: ``Reshape (N, 1, side, side) -> Conv 3x3 pad 1 -> Relu -> MaxPool 2x2 -> Flatten ->
  Gemm -> Softmax``

Before it is registered the graph is run with ONNX Runtime on the job's test set: its top-1
accuracy is what the registry records (``accuracy: {dataset, value}``), and it must agree with
the accuracy the job measured with numpy (float32 against float64: within 0.5 %), else the export
is refused. ``module:`` and ``plugin:`` models are device code with no graph EVC knows: refused.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from evc.context import Context
from evc.errors import Conflict, NotFound, PreconditionFailed, ValidationError
from evc.fl.checkpoint import latest_round, load_checkpoint
from evc.fl.jobspec import FLSpec, checkpoint_dir
from evc.fl.models import is_device_model
from evc.fl.rounds_core import load_test_set
from evc.model import JSON, JobState
from evc.store import Store

OPSET = 17
#: how far the ONNX graph's accuracy (float32) may be from the job's (float64)
TOLERANCE = 0.005


def onnx_graph(model: str, params: Sequence[np.ndarray], *, n_features: int, n_classes: int) -> bytes:
    """The ONNX bytes of built-in model *model* with *params* (see the module doc). Pure."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    kind = model.split(":", 1)[0]
    w = [np.asarray(p, dtype=np.float32) for p in params]
    names = [f"p{i}" for i in range(len(w))]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(w, names, strict=True)]
    if kind == "softmax":
        nodes = [helper.make_node("Gemm", ["X", "p0", "p1"], ["logits"])]
    elif kind == "mlp":
        nodes = [
            helper.make_node("Gemm", ["X", "p0", "p1"], ["h0"]),
            helper.make_node("Relu", ["h0"], ["h"]),
            helper.make_node("Gemm", ["h", "p2", "p3"], ["logits"]),
        ]
    elif kind == "cnn":
        side = int(round(n_features**0.5))
        inits.append(numpy_helper.from_array(np.array([-1, 1, side, side], dtype=np.int64), "image_shape"))
        nodes = [
            helper.make_node("Reshape", ["X", "image_shape"], ["img"]),
            helper.make_node("Conv", ["img", "p0", "p1"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["act"]),
            helper.make_node("MaxPool", ["act"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "p2", "p3"], ["logits"]),
        ]
    else:
        raise ValidationError(f"model {model!r} has no ONNX export: softmax, mlp and cnn do", model=model)
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes, f"evc-fl-{kind}",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_classes])],
        initializer=inits,
    )  # fmt: skip
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="evc-fl")
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model)
    return bytes(onnx_model.SerializeToString())


def onnx_accuracy(data: bytes, X: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model *data* on ``X``, ``y`` with ONNX Runtime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    probs = session.run(None, {"X": np.asarray(X, dtype=np.float32)})[0]
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(y)))


def _finished_spec(store: Store, job_id: str, finished: bool = True) -> tuple[FLSpec, JSON]:
    job = store.get_job(job_id)
    if job.get("kind") != "fl":
        raise NotFound(f"no FL job {job_id}", job=job_id)
    if finished and job["state"] != JobState.SUCCEEDED:
        raise Conflict(f"FL job {job_id} is {job['state']}: only a finished (succeeded) job is exported", job=job_id)
    spec = FLSpec.from_params(job["params"])
    if is_device_model(spec.model):
        raise PreconditionFailed(
            f"model {spec.model!r} is device code: EVC never runs it and knows no graph for it; export it "
            "from your own training code",
            model=spec.model,
        )
    return spec, dict(job)


def export(
    ctx: Context, job_id: str, name: str, version: str, round: int | None = None, *, finished: bool = True
) -> tuple[JSON, bool]:
    """Register FL job *job_id*'s global model (its last round, or *round*) as model version
    *name*:*version* in ONNX, with the accuracy measured on the job's test set. Returns the
    registry's (record, created). *finished* False: the round engine, as the job ends."""
    from evc.models import registry

    spec, _ = _finished_spec(ctx.store, job_id, finished)
    directory = checkpoint_dir(ctx.settings)
    rnd = latest_round(directory, job_id) if round is None else int(round)
    if rnd is None or rnd < 1:
        raise NotFound(f"FL job {job_id} has no trained round to export", job=job_id)
    try:
        checkpoint = load_checkpoint(directory, job_id, rnd)
    except NotFound:
        raise NotFound(f"FL job {job_id} has no checkpoint of round {rnd}", job=job_id, round=rnd) from None
    data = onnx_graph(spec.model, checkpoint.params, n_features=spec.n_features, n_classes=spec.n_classes)
    meta: JSON = {
        "name": name, "version": version, "task": "classification", "format": "onnx",
        "description": f"federated: FL job {job_id}, round {rnd}, model {spec.model}, {spec.strategy}",
    }  # fmt: skip
    if spec.test_set:
        X, y = load_test_set(ctx.settings, spec.test_set)
        value = onnx_accuracy(data, X, y)
        _agrees(value, checkpoint.metadata, rnd)
        meta["accuracy"] = {"dataset": spec.test_set, "value": value}
    meta["evaluation"] = {"fl_job": job_id, "round": rnd, "model": spec.model, "strategy": spec.strategy}
    return registry.register(ctx, io.BytesIO(data), meta)


def _agrees(value: float, metadata: Any, rnd: int) -> None:
    """Refuse a graph whose accuracy is not the job's (a wrong export must never be deployed)."""
    numpy_acc = (metadata or {}).get("eval_accuracy")
    if numpy_acc is not None and abs(float(numpy_acc) - value) > TOLERANCE:
        raise PreconditionFailed(
            f"the ONNX graph's accuracy {value:.4f} is not round {rnd}'s {float(numpy_acc):.4f}: not registered",
            onnx_accuracy=value, round_accuracy=numpy_acc,
        )  # fmt: skip
