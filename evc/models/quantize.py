"""EVC's own int8 variant: the ``model-quantize`` job's body.

ONNX Runtime's dynamic quantization (:func:`onnxruntime.quantization.quantize_dynamic`, int8
weights, activations quantized at run time) of a registered version, registered as its variant
``int8``. With an evaluation set (an ``.npz`` holding ``X``, the inputs, and ``y``, the integer
labels) the top-1 accuracy of the parent and of the variant are measured with ONNX Runtime and
recorded on the variant.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from evc.context import Caller, Context
from evc.errors import ValidationError
from evc.jobs import JobRun
from evc.model import JSON
from evc.models import registry
from evc.settings import Settings
from evc.store import Store

VARIANT = "int8"


def load_eval_set(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``X`` and ``y`` of an ``.npz`` evaluation set (:class:`ValidationError` otherwise)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            x, y = np.asarray(z["X"]), np.asarray(z["y"])
    except (KeyError, ValueError, OSError) as exc:
        raise ValidationError(f"the evaluation set must be an .npz holding X and y: {exc}", field="eval_set") from exc
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValidationError(
            f"the evaluation set's X and y must have one row per sample (X {x.shape}, y {y.shape})", field="eval_set"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValidationError("the evaluation set's y must hold integer class labels", field="eval_set")
    return x, y


def top1(model_path: Path, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy of the model at *model_path* on (*x*, *y*), run with ONNX Runtime (CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    correct = 0
    for start in range(0, len(x), batch):
        out = sess.run(None, {inp.name: x[start : start + batch].astype(dtype)})[0]
        correct += int((np.asarray(out).reshape(len(out), -1).argmax(axis=1) == y[start : start + batch]).sum())
    return correct / len(y)


def quantize_int8(src: Path, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8)


def run(store: Store, settings: Settings, run: JobRun) -> JSON:
    """The job: quantize ``params.name``:``params.version``, measure, register variant int8."""
    p: dict[str, Any] = run.params
    name, version = p["name"], p["version"]
    parent = registry.get_version(store, name, version)
    if parent.get("format", "onnx") != "onnx":
        raise ValidationError(f"model {name}:{version} is {parent.get('format')!r}; only ONNX can be quantized")
    ctx = Context(store, settings, caller=Caller(run.job.get("created_by") or "evc:quantize"))
    # named after the job: what a killed attempt leaves, the next removes (jobs.remove_temp_files)
    with tempfile.TemporaryDirectory(prefix=f"evc-{run.id}-quantize-") as tmp:
        src, dest = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        src.write_bytes(
            registry.storage(settings, parent).read_verified(
                parent["sha256"], registry.record_ref(parent), parent.get("storage")
            )
        )
        run.event(f"quantizing {name}:{version} (sha256:{parent['sha256'][:12]}) to int8")
        quantize_int8(src, dest)
        run.check_cancel()
        meta: JSON = {
            "task": parent.get("task"),
            "labels": parent.get("labels") or {},
            "license": parent.get("license"),
        }
        summary: JSON = {"name": name, "version": version, "variant": VARIANT}
        if p.get("eval_set"):
            x, y = load_eval_set(registry.storage(settings).read_verified(p["eval_set"], registry.EVAL_SETS))
            run.event(f"measuring top-1 accuracy on {len(y)} samples")
            dataset = p.get("dataset") or f"sha256:{p['eval_set']}"
            acc_parent, acc_variant = top1(src, x, y), top1(dest, x, y)
            meta["accuracy"] = {"dataset": dataset, "value": acc_variant}
            meta["evaluation"] = {
                "dataset": dataset, "eval_set": f"sha256:{p['eval_set']}", "samples": int(len(y)),
                "metric": "top1", "parent": acc_parent, "variant": acc_variant,
            }  # fmt: skip
            summary["evaluation"] = meta["evaluation"]
        with open(dest, "rb") as f:
            rec, created = registry.register_variant(ctx, name, version, VARIANT, f, meta, source="evc-quantize")
    summary.update(sha256=rec["sha256"], size=rec["size"], created=created)
    return summary
