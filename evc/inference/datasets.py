"""Inference data sets and results on the controller: ``<data_dir>/inference/``.

A data set is an uploaded ``.npz`` with ``x`` (items along the first axis) and optionally
``y`` (one integer label per item), kept as ``datasets/<id>.npz`` beside ``<id>.json`` (its
shape, dtype, whether it has labels). Named data sets need no upload: ``digits`` (the shipped
digits test split, with labels) and ``digits-train``. A job's results go to
``jobs/<job id>/results.npz``. The API and the workers share the data dir, as for the models.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from evc.errors import NotFound, ValidationError
from evc.fl.data import load_reference_digits
from evc.models.blobs import TooLarge
from evc.settings import Settings
from evc.store import new_id

ID_RE = re.compile(r"^ds_[A-Za-z0-9_-]{1,60}$")
NAMED = ("digits", "digits-train")
MAX_REPEAT = 10_000


@dataclass(frozen=True)
class Data:
    """Items ``x`` (N, ...) and their labels ``y`` (N,) or None."""

    x: np.ndarray
    y: np.ndarray | None

    def repeated(self, times: int) -> Data:
        """The items *times* over (the labels too)."""
        if check_repeat(times) == 1:
            return self
        y = None if self.y is None else np.tile(self.y, times)
        return Data(np.tile(self.x, (times,) + (1,) * (self.x.ndim - 1)), y)


def check_repeat(times: int) -> int:
    if not 1 <= times <= MAX_REPEAT:
        raise ValidationError(f"repeat must be in 1..{MAX_REPEAT}", field="repeat")
    return times


def root(settings: Settings) -> Path:
    return Path(settings.data_dir) / "inference"


def _folder(settings: Settings) -> Path:
    path = root(settings) / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse(raw: bytes) -> Data:
    """An uploaded ``.npz``: ``x`` numeric with at least one item, ``y`` one integer per item."""
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            if "x" not in z.files:
                raise ValidationError(f"the .npz has no array 'x' (it has {sorted(z.files)})", field="file")
            x, y = z["x"], (z["y"] if "y" in z.files else None)
    except ValidationError:
        raise
    except Exception as exc:  # np.load raises many kinds for a file that is not an .npz
        raise ValidationError(f"not a readable .npz without pickles: {exc}", field="file") from exc
    if x.ndim < 1 or len(x) == 0 or x.dtype.kind not in "biuf":
        raise ValidationError(f"x must be a numeric array with at least one item (got {x.dtype} {x.shape})")
    if y is not None and (y.shape != (len(x),) or y.dtype.kind not in "biu"):
        raise ValidationError(f"y must hold one integer label per item of x ({len(x)}), got {y.dtype} {y.shape}")
    return Data(x, y)


def _chunks(stream: IO[bytes], limit: int) -> Iterator[bytes]:
    total = 0
    while block := stream.read(1 << 20):
        total += len(block)
        if total > limit:
            raise TooLarge(f"the data set is larger than the limit of {limit} bytes (inference_dataset_max_bytes)")
        yield block


def store(settings: Settings, stream: IO[bytes], name: str = "") -> dict[str, Any]:
    """Keep an uploaded data set; its description (``id``, ``items``, ``shape``, ``dtype``,
    ``labels``, ``bytes``)."""
    raw = b"".join(_chunks(stream, settings.inference_dataset_max_bytes))
    data = parse(raw)
    meta = {
        "id": new_id("ds"), "name": name or None, "items": len(data.x), "shape": list(data.x.shape[1:]),
        "dtype": str(data.x.dtype), "labels": data.y is not None, "bytes": len(raw),
    }  # fmt: skip
    folder = _folder(settings)
    _write(folder / f"{meta['id']}.npz", raw)
    _write(folder / f"{meta['id']}.json", json.dumps(meta).encode())
    return meta


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def describe(settings: Settings, ref: str) -> dict[str, Any]:
    """A data set's description: an uploaded one's (by id) or a named one's."""
    if ref in NAMED:
        d = load(settings, ref)
        return {"id": ref, "name": ref, "items": len(d.x), "shape": list(d.x.shape[1:]), "dtype": str(d.x.dtype),
                "labels": True, "bytes": None}  # fmt: skip
    path = _folder(settings) / f"{ref}.json"
    if not ID_RE.match(ref) or not path.is_file():
        raise NotFound(f"data set {ref} not found: upload one (POST /api/v1/inference/datasets) or name one of "
                       f"{list(NAMED)}", id=ref)  # fmt: skip
    return dict(json.loads(path.read_text()))


def load(settings: Settings, ref: str) -> Data:
    """The items (float32 for the named ones) of data set *ref*."""
    if ref in NAMED:
        d = load_reference_digits()
        x, y = (d.X_test, d.y_test) if ref == "digits" else (d.X_train, d.y_train)
        return Data(x.astype(np.float32), y.astype(np.int64))
    describe(settings, ref)
    return parse((_folder(settings) / f"{ref}.npz").read_bytes())


def results_path(settings: Settings, job_id: str) -> Path:
    return root(settings) / "jobs" / job_id / "results.npz"


def save_results(settings: Settings, job_id: str, arrays: dict[str, np.ndarray]) -> Path:
    path = results_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    _write(path, buf.getvalue())
    return path


def results_file(settings: Settings, job_id: str) -> Path:
    """The job's results file (NotFound while there is none)."""
    path = results_path(settings, job_id)
    if not path.is_file():
        raise NotFound(f"job {job_id} has no results (not a parallel inference job, or not finished)", id=job_id)
    return path


def load_results(settings: Settings, job_id: str) -> dict[str, np.ndarray]:
    with np.load(results_file(settings, job_id), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def jsonl(results: dict[str, np.ndarray]) -> Iterator[bytes]:
    """The results as JSON lines, one per item in input order: ``item``, ``prediction``,
    ``score``, ``device``, ``latency_ms``, ``label`` (when given)."""
    names = [str(n) for n in results["devices"]]
    labels = results.get("label")
    for i in range(len(results["prediction"])):
        row: dict[str, Any] = {
            "item": i, "prediction": int(results["prediction"][i]), "score": round(float(results["score"][i]), 6),
            "device": names[int(results["device"][i])], "latency_ms": round(float(results["latency_ms"][i]), 3),
        }  # fmt: skip
        if labels is not None:
            row["label"] = int(labels[i])
        yield (json.dumps(row) + "\n").encode()


__all__ = [
    "NAMED", "Data", "check_repeat", "describe", "jsonl", "load", "load_results", "parse", "results_file",
    "results_path", "save_results", "store",
]  # fmt: skip
