"""The models a server holds: ``<models dir>/<name>/<version>/model.onnx``, each beside a
``model.json`` that pins its digest (``{"sha256": "<hex>", ...}``, as a deployment writes it).

A version whose ``model.onnx`` does not hash to the pinned digest, or that ONNX Runtime cannot
load, is kept as *unavailable* with the reason (the repository index and readiness say it); a
version without ``model.json`` is loaded and reports the digest it has. :meth:`Repository.scan`
reloads the folder: versions whose digest is unchanged keep their session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .tensors import ORT_TYPES, TensorError, datatype_of

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
META_FILE = "model.json"
PLATFORM = "onnxruntime_onnx"
_CHUNK = 1024 * 1024


class ModelUnavailable(Exception):
    """A model version exists but is not serving (it failed to load, or its digest is wrong)."""


class UnknownModel(LookupError):
    """No such model, or no such version of it."""


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a model: its name, protocol datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def check(self, array: np.ndarray) -> None:
        """Raise :class:`TensorError` unless *array* fits this input."""
        try:
            got = datatype_of(array)
        except TensorError:
            got = str(array.dtype)
        if got != self.datatype:
            raise TensorError(f"input {self.name}: datatype {got}, the model expects {self.datatype}")
        if len(array.shape) != len(self.shape) or any(
            want >= 0 and want != have for want, have in zip(self.shape, array.shape)
        ):
            raise TensorError(
                f"input {self.name}: shape {list(array.shape)}, the model expects {list(self.shape)} (-1: any size)"
            )


def _spec(arg: Any) -> TensorSpec:
    datatype = ORT_TYPES.get(arg.type, arg.type)
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelVersion:
    """One version of a model: its session when it loaded, else the reason it did not."""

    name: str
    version: str
    path: Path
    sha256: str = ""
    pinned: bool = False  # model.json named the digest
    session: Any = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    reason: str = ""
    _by_name: dict[str, TensorSpec] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.inputs}

    @property
    def ready(self) -> bool:
        return self.session is not None

    def index_entry(self) -> dict[str, Any]:
        """This version as the repository index lists it (Triton's shape, plus the digest)."""
        entry = {"name": self.name, "version": self.version, "state": "READY" if self.ready else "UNAVAILABLE"}
        if self.reason:
            entry["reason"] = self.reason
        if self.sha256:
            entry["sha256"] = self.sha256
        return entry

    def metadata(self, versions: Sequence[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(versions),
            "platform": PLATFORM,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None) -> dict[str, np.ndarray]:
        """Run the model on *inputs* (checked against its inputs first); *outputs* None: all."""
        return self.run(self.prepare(inputs, outputs), inputs)

    def run(self, names: list[str], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ONNX Runtime alone: *names* of the outputs, *inputs* as :meth:`prepare` checked them."""
        return dict(zip(names, self.session.run(names, inputs)))

    def prepare(self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None) -> list[str]:
        """Check *inputs* against the model's; the names of the outputs to compute (None: all)."""
        if not self.ready:
            raise ModelUnavailable(self.reason)
        want = self._by_name or {t.name: t for t in self.inputs}
        for name, array in inputs.items():
            spec = want.get(name)
            if spec is None:
                raise TensorError("the model has no input {} (its inputs: {})".format(name, ", ".join(want)))
            spec.check(array)
        if len(inputs) != len(want):
            missing = [n for n in want if n not in inputs]
            raise TensorError("missing input(s): {}".format(", ".join(missing)))
        names = [t.name for t in self.outputs]
        if outputs is not None:
            unknown = [n for n in outputs if n not in names]
            if unknown:
                raise TensorError("the model has no output {} (its outputs: {})".format(unknown[0], ", ".join(names)))
            names = list(outputs)
        return names


def _version_key(v: str) -> tuple[Any, ...]:
    """Natural order: ``2`` < ``10``, ``1.9`` < ``1.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", v) if p)


def load_version(
    name: str, version: str, folder: Path, session_options: Any = None, providers: Sequence[str] | None = None
) -> ModelVersion:
    """Load ``folder/model.onnx`` after checking it against ``folder/model.json``'s digest."""
    import onnxruntime as ort

    mv = ModelVersion(name=name, version=version, path=folder / MODEL_FILE)
    try:
        mv.sha256 = sha256_file(mv.path)
        meta_path = folder / META_FILE
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            pinned = str(meta.get("sha256", "")).lower().replace("sha256:", "")
            if pinned:
                mv.pinned = True
                if pinned != mv.sha256:
                    mv.reason = (
                        f"digest mismatch: {META_FILE} pins sha256:{pinned}, {MODEL_FILE} has sha256:{mv.sha256}"
                    )
                    return mv
        sess = ort.InferenceSession(str(mv.path), sess_options=session_options, providers=providers or None)
    except Exception as exc:  # noqa: BLE001 - any failure makes the version unavailable, with its reason
        mv.reason = f"cannot load: {exc}"
        return mv
    mv.inputs = [_spec(a) for a in sess.get_inputs()]
    mv.outputs = [_spec(a) for a in sess.get_outputs()]
    mv.__post_init__()
    mv.session = sess
    return mv


def _pick(versions: dict[str, ModelVersion]) -> ModelVersion:
    """The highest version that is ready, else the highest."""
    ordered = sorted(versions, key=_version_key, reverse=True)
    ready = [v for v in ordered if versions[v].ready]
    return versions[(ready or ordered)[0]]


class Repository:
    """The models under a folder, by name and version; :meth:`scan` (re)loads them."""

    def __init__(self, root: Path, session_options: Any = None, providers: Sequence[str] | None = None) -> None:
        self.root = root
        self.session_options = session_options
        self.providers = providers
        self._models: dict[str, dict[str, ModelVersion]] = {}
        self._default: dict[str, ModelVersion] = {}  # by name: what a request without a version gets
        self._lock = threading.Lock()

    def scan(self) -> list[ModelVersion]:
        """Load what the folder holds now; returns every version, loaded or not."""
        old = self._models
        found: dict[str, dict[str, ModelVersion]] = {}
        for folder in sorted(self.root.glob("*/*/" + MODEL_FILE)):
            vdir = folder.parent
            name, version = vdir.parent.name, vdir.name
            if name.startswith(".") or version.startswith("."):
                continue
            prev = old.get(name, {}).get(version)
            if prev is not None and prev.ready and prev.sha256 == sha256_file(folder):
                mv = prev
            else:
                mv = load_version(name, version, vdir, self.session_options, self.providers)
                if mv.ready:
                    log.info("loaded %s:%s (sha256:%s)", name, version, mv.sha256)
                else:
                    log.error("model %s:%s is unavailable: %s", name, version, mv.reason)
            found.setdefault(name, {})[version] = mv
        default = {name: _pick(versions) for name, versions in found.items()}
        with self._lock:
            self._models, self._default = found, default
        return self.versions()

    def versions(self) -> list[ModelVersion]:
        models = self._models
        return [models[n][v] for n in sorted(models) for v in sorted(models[n], key=_version_key)]

    def names(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def version_names(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=_version_key)

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """A version of *name* (None: the highest that is ready, else the highest)."""
        if version is None:
            mv = self._default.get(name)
            if mv is None:
                raise UnknownModel(f"unknown model {name}")
            return mv
        versions = self._models.get(name)
        if not versions:
            raise UnknownModel(f"unknown model {name}")
        mv = versions.get(version)
        if mv is None:
            raise UnknownModel(f"model {name} has no version {version}")
        return mv

    def ready(self) -> bool:
        """Every version found loaded, and there is at least one."""
        all_versions = self.versions()
        return bool(all_versions) and all(mv.ready for mv in all_versions)
