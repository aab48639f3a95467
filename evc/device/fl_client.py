"""Self-contained numpy federated-learning client: the model maths and the device-side runtime.

This one file is copied to a device and run there as ONE long-lived process per FL job::

    python3 client.py --data /path/to/shard.npz

It depends on numpy only (no ``evc`` import), so it stays runnable on a bare device with
Python >= 3.8 (hence no ``zip(strict=...)``, ``match`` or runtime ``X | Y`` types here).
The server (``evc.fl.models``) imports the model maths from this module, so the
softmax-regression and MLP maths are defined exactly once.

Protocol: line-delimited JSON, one request per stdin line, one response per stdout line, in order.
Parameters travel as ``base64(npz)`` with arrays ``arr_0 .. arr_{n-1}`` in parameter order.

* ``{"op": "ping"}`` -> ``{"ok": true, "op": "pong", "version": v, "pid": p, "num_examples": n}``
* ``{"op": "info"}`` -> ``{"ok": true, "num_examples": n, "n_features": d, "label_counts": {...}}``
* ``{"op": "fit", "round": r, "client_index": k, "params": b64, "config": {...}}``
  -> ``{"ok": true, "op": "fit", "round": r, "client_index": k, "params": b64,
  "num_examples": n, "metrics": {"loss": ..., "n": n, "fit_seconds": ...}}``.
  ``config`` keys (all optional): ``epochs`` (1), ``lr`` (0.1), ``batch_size`` (32),
  ``seed`` (None: batches in data order; else the batch order comes from
  ``numpy.random.default_rng([seed, round, client_index])``), ``prox_mu`` (0.0),
  ``model`` ("softmax"), ``n_classes`` (inferred from the last parameter array for built-ins).
* ``{"op": "evaluate", "round": r, "params": b64, "config": {"model": ...}}``
  -> ``{"ok": true, "op": "evaluate", "round": r, "num_examples": n,
  "metrics": {"loss": ..., "accuracy": ..., "n": n}}``
* ``{"op": "get_parameters", "config": {"model": ..., "seed": s, "n_classes": k}}``
  -> ``{"ok": true, "op": "get_parameters", "params": b64, "shapes": [[...], ...]}``: the
  model's initial parameters (Flower's ``get_parameters``). The server asks one device for them
  at round 0 of a job whose model is a ``module:`` file, so it never runs user code itself.
* ``{"op": "shutdown"}`` -> ``{"ok": true, "op": "shutdown"}`` and the process exits 0.

A request's ``"id"`` (any JSON value) is echoed in its response.  A failing request is answered
``{"ok": false, "error": "...", "op": ...}`` and never ends the process; end of stdin ends it.

Models: ``softmax``, ``mlp[:<hidden>]``, ``cnn[:<channels>]`` (its maths in ``fl_models.py``,
shipped beside this file), ``module:/path/file.py`` (module-level ``init_params``, ``fit``,
``evaluate`` as :mod:`evc.fl.models` describes) and ``plugin:<name>`` (``plugins/<name>.py``
beside this file: Flower's NumPyClient shape, see ``fl_models.py``).

Anything user code prints goes to stderr; stdout carries protocol lines only.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CNN",
    "MLP",
    "PROTOCOL_VERSION",
    "ModuleModel",
    "SoftmaxRegression",
    "decode_params",
    "encode_params",
    "fit_with_config",
    "handle_request",
    "load_model",
    "main",
    "sgd_fit",
]

PROTOCOL_VERSION = 2

# --------------------------------------------------------------------------------------------
# model maths (shared by device and server)
# --------------------------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _cross_entropy(p: np.ndarray, y: np.ndarray) -> float:
    picked = p[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.maximum(picked, 1e-300))))


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"expected X of shape (n, d) and y of shape (n,), got {X.shape} and {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels y must be integers, got dtype {y.dtype}")
    return X, y.astype(np.int64, copy=False)


def _check_params(params: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]) -> None:
    got = [tuple(np.shape(p)) for p in params]
    if got != list(shapes):
        raise ValueError(f"parameter shapes {got} do not match the model's {list(shapes)}")


def sgd_fit(
    loss_grad: Callable[[list[np.ndarray], np.ndarray, np.ndarray], tuple[float, list[np.ndarray]]],
    params: Sequence[np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    batch_order_seed: list[int] | None,
    prox_mu: float = 0.0,
    global_params: Sequence[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Plain mini-batch SGD on ``loss_grad`` (mean loss of a batch and its gradients).

    The last partial batch is kept.  With ``batch_order_seed`` one
    ``numpy.random.default_rng(batch_order_seed)`` draws ``permutation(n)`` once per epoch;
    without it batches follow the data order.  ``prox_mu > 0`` adds the FedProx term
    ``mu/2 * ||w - w_global||^2`` (``global_params`` defaults to the starting ``params``).
    Returns the new parameters and ``{"loss": mean batch loss over the last epoch, "n": n}``.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    if prox_mu < 0:
        raise ValueError("prox_mu must be >= 0")
    X, y = _check_xy(X, y)
    w = [np.array(p, dtype=np.float64, copy=True) for p in params]
    anchor = None
    if prox_mu > 0:
        source = params if global_params is None else global_params
        anchor = [np.array(p, dtype=np.float64, copy=True) for p in source]
    n = X.shape[0]
    rng = np.random.default_rng(batch_order_seed) if batch_order_seed is not None else None
    epoch_loss = 0.0
    for _ in range(epochs):
        order = rng.permutation(n) if rng is not None else np.arange(n)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss, grads = loss_grad(w, X[idx], y[idx])
            total += loss * len(idx)
            if anchor is not None:
                grads = [g + prox_mu * (p - a) for g, p, a in zip(grads, w, anchor)]  # noqa: B905
            for p, g in zip(w, grads):  # noqa: B905
                p -= lr * g
        epoch_loss = total / n if n else 0.0
    return w, {"loss": float(epoch_loss), "n": int(n)}


class _GradientModel:
    """What the built-in models share: SGD on their ``loss_grad`` and evaluation of their
    ``predict_proba``; a subclass gives ``shapes``, ``init_params``, ``predict_proba`` and
    ``loss_grad``."""

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def predict_proba(self, params: Sequence[np.ndarray], X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def loss_grad(self, params: list[np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        raise NotImplementedError

    def fit(
        self,
        params: Sequence[np.ndarray],
        X: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        batch_order_seed: list[int] | None,
        prox_mu: float = 0.0,
        global_params: Sequence[np.ndarray] | None = None,
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        _check_params(params, self.shapes)
        return sgd_fit(
            self.loss_grad, params, X, y, epochs=epochs, lr=lr, batch_size=batch_size,
            batch_order_seed=batch_order_seed, prox_mu=prox_mu, global_params=global_params,
        )  # fmt: skip

    def evaluate(self, params: Sequence[np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        _check_params(params, self.shapes)
        return _evaluate(self.predict_proba(params, X), *_check_xy(X, y))


class SoftmaxRegression(_GradientModel):
    """Multinomial logistic regression (``"softmax"``): ``softmax(X @ W + b)``.

    Parameters, in order: ``W`` (d, k), ``b`` (k,), float64.  Initialisation: zeros (the seed is
    ignored).  Loss: mean cross-entropy of a batch; plain SGD (:func:`sgd_fit`).
    """

    name = "softmax"

    def __init__(self, n_features: int, n_classes: int) -> None:
        if n_features < 1 or n_classes < 2:
            raise ValueError("softmax needs n_features >= 1 and n_classes >= 2")
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.n_features, self.n_classes), (self.n_classes,)]

    def init_params(self, seed: int = 0) -> list[np.ndarray]:
        """Zeros (``seed`` is accepted for interface symmetry and ignored)."""
        return [np.zeros(s, dtype=np.float64) for s in self.shapes]

    def predict_proba(self, params: Sequence[np.ndarray], X: np.ndarray) -> np.ndarray:
        W, b = params
        return _softmax(np.asarray(X, dtype=np.float64) @ W + b)

    def loss_grad(self, params: list[np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        p = self.predict_proba(params, X)
        loss = _cross_entropy(p, y)
        p[np.arange(len(y)), y] -= 1.0
        p /= len(y)
        return loss, [X.T @ p, p.sum(axis=0)]


class MLP(_GradientModel):
    """One-hidden-layer ReLU network (``"mlp"``, ``"mlp:<hidden>"``, default 32 hidden units):
    ``softmax(relu(X @ W1 + b1) @ W2 + b2)``.

    Parameters, in order: ``W1`` (d, h), ``b1`` (h,), ``W2`` (h, k), ``b2`` (k,), float64.
    Initialisation (:meth:`init_params`): ``rng = numpy.random.default_rng(seed)``, then
    ``W1 = rng.normal(0, sqrt(2 / d), (d, h))`` (He), ``W2 = rng.normal(0, sqrt(2 / (h + k)),
    (h, k))`` (Glorot-scaled), drawn in that order; biases zero.
    """

    name = "mlp"

    def __init__(self, n_features: int, n_classes: int, hidden: int = 32) -> None:
        if n_features < 1 or n_classes < 2 or hidden < 1:
            raise ValueError("mlp needs n_features >= 1, n_classes >= 2 and hidden >= 1")
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)
        self.hidden = int(hidden)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        d, h, k = self.n_features, self.hidden, self.n_classes
        return [(d, h), (h,), (h, k), (k,)]

    def init_params(self, seed: int = 0) -> list[np.ndarray]:
        """He-normal W1, Glorot-scaled W2 from ``default_rng(seed)``; zero biases."""
        rng = np.random.default_rng(seed)
        d, h, k = self.n_features, self.hidden, self.n_classes
        return [
            rng.normal(0.0, np.sqrt(2.0 / d), size=(d, h)),
            np.zeros(h),
            rng.normal(0.0, np.sqrt(2.0 / (h + k)), size=(h, k)),
            np.zeros(k),
        ]

    def _forward(self, params: Sequence[np.ndarray], X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        W1, b1, W2, b2 = params
        hidden = np.maximum(np.asarray(X, dtype=np.float64) @ W1 + b1, 0.0)
        return hidden, _softmax(hidden @ W2 + b2)

    def predict_proba(self, params: Sequence[np.ndarray], X: np.ndarray) -> np.ndarray:
        return self._forward(params, X)[1]

    def loss_grad(self, params: list[np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        W1, b1, W2, b2 = params
        hidden, p = self._forward(params, X)
        loss = _cross_entropy(p, y)
        p[np.arange(len(y)), y] -= 1.0
        p /= len(y)
        dh = (p @ W2.T) * (hidden > 0)
        return loss, [X.T @ dh, dh.sum(axis=0), hidden.T @ p, p.sum(axis=0)]


class CNN(_GradientModel):
    """A small convolutional network (``"cnn"``, ``"cnn:<channels>"``, default 8 channels) for
    square single-channel images: conv 3x3 -> relu -> max-pool 2x2 -> dense -> softmax.  The
    maths, parameter layout and initialisation are in ``fl_models.py`` (shipped beside this
    file): ``W1 (c, 1, 3, 3)``, ``b1 (c,)``, ``W2 (c * (side // 2) ** 2, k)``, ``b2 (k,)``."""

    name = "cnn"

    def __init__(self, n_features: int, n_classes: int, channels: int = 8) -> None:
        if n_classes < 2 or channels < 1:
            raise ValueError("cnn needs n_classes >= 2 and channels >= 1")
        self.n_features, self.n_classes, self.channels = int(n_features), int(n_classes), int(channels)
        self._maths = models_module()
        self._maths.cnn_side(self.n_features)  # refuses non-square images now

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self._maths.cnn_shapes(self.n_features, self.n_classes, self.channels)]

    def init_params(self, seed: int = 0) -> list[np.ndarray]:
        """He-normal conv weights, then Glorot-scaled dense weights, from ``default_rng(seed)``."""
        return list(self._maths.cnn_init(self.n_features, self.n_classes, self.channels, seed))

    def predict_proba(self, params: Sequence[np.ndarray], X: np.ndarray) -> np.ndarray:
        return _softmax(self._maths.cnn_forward(params, X)["logits"])

    def loss_grad(self, params: list[np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        cache = self._maths.cnn_forward(params, X)
        p = _softmax(cache["logits"])
        loss = _cross_entropy(p, y)
        p[np.arange(len(y)), y] -= 1.0
        p /= len(y)
        return loss, list(self._maths.cnn_backward(params, cache, p))


def models_module() -> Any:
    """``fl_models.py`` beside this file (the CNN, plug-ins), loaded by its path: the same code
    from ``~/.evc/fl`` on a device and from ``evc/device`` in EVC."""
    key = "evc_fl_client_models"
    if key not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fl_models.py")
        spec = importlib.util.spec_from_file_location(key, path)
        if spec is None or spec.loader is None or not os.path.isfile(path):
            raise ImportError(f"{path} is missing: reinstall the FL client (fl-client playbook, `evc fl install`)")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def _evaluate(p: np.ndarray, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    n = int(y.shape[0])
    if n == 0:
        return {"loss": 0.0, "accuracy": 0.0, "n": 0}
    return {
        "loss": _cross_entropy(p, y),
        "accuracy": float(np.mean(p.argmax(axis=1) == y)),
        "n": n,
    }


class ModuleModel:
    """A user model: a Python file defining ``init_params``, ``fit`` and ``evaluate``."""

    def __init__(self, path: str) -> None:
        module = self.import_file(path, "evc_user_model_" + "".join(c if c.isalnum() else "_" for c in path))
        missing = [f for f in ("init_params", "fit", "evaluate") if not callable(getattr(module, f, None))]
        if missing:
            raise ValueError("model module {!r} lacks {}".format(path, ", ".join(missing)))
        self.name = "module:" + path
        self.module = module

    @staticmethod
    def import_file(path: str, name: str) -> Any:
        """Import the Python file *path* as module *name* (user code: devices only)."""
        if not os.path.isfile(path):
            raise ValueError(f"model module {path!r} does not exist")
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import model module {path!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def init_params(self, seed: int = 0) -> list[np.ndarray]:
        return [np.asarray(p) for p in self.module.init_params(seed)]

    def fit(
        self,
        params: Sequence[np.ndarray],
        X: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        batch_order_seed: list[int] | None,
        prox_mu: float = 0.0,
        global_params: Sequence[np.ndarray] | None = None,
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        new, metrics = self.module.fit(
            list(params), X, y, epochs=epochs, lr=lr, batch_size=batch_size,
            batch_order_seed=batch_order_seed, prox_mu=prox_mu, global_params=global_params,
        )  # fmt: skip
        return [np.asarray(p) for p in new], dict(metrics)

    def evaluate(self, params: Sequence[np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return dict(self.module.evaluate(list(params), X, y))


def load_model(spec: str, *, n_features: int, n_classes: int) -> Any:
    """Build a model from its spec: ``"softmax"``, ``"mlp"``, ``"mlp:<hidden>"``, ``"cnn"``,
    ``"cnn:<channels>"``, ``"module:/path/to/file.py"`` or ``"plugin:<name>"`` (dimensions are
    ignored for module models and plug-ins).

    Raises ``ValueError`` for an unknown or malformed spec.
    """
    if spec == "cnn" or spec.startswith("cnn:"):
        channels = spec[4:]
        if channels and not channels.isdigit():
            raise ValueError(f"cnn spec must be 'cnn' or 'cnn:<channels>', got {spec!r}")
        return CNN(n_features, n_classes, int(channels) if channels else 8)
    if spec.startswith("plugin:"):
        return models_module().load_plugin(spec[len("plugin:") :], ModuleModel.import_file)
    if spec == "softmax":
        return SoftmaxRegression(n_features, n_classes)
    if spec == "mlp" or spec.startswith("mlp:"):
        hidden = spec[4:]
        if hidden and not hidden.isdigit():
            raise ValueError(f"mlp spec must be 'mlp' or 'mlp:<hidden units>', got {spec!r}")
        return MLP(n_features, n_classes, int(hidden) if hidden else 32)
    if spec.startswith("module:") and len(spec) > len("module:"):
        return ModuleModel(spec[len("module:") :])
    raise ValueError(
        f"unknown model {spec!r}: use softmax, mlp[:<hidden>], cnn[:<channels>], module:<path> or plugin:<name>"
    )


# --------------------------------------------------------------------------------------------
# wire encoding
# --------------------------------------------------------------------------------------------


def encode_params(params: Sequence[np.ndarray]) -> str:
    """Parameters -> base64 text of an uncompressed ``.npz`` holding ``arr_0 .. arr_{n-1}``."""
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(p) for p in params])
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_params(text: str) -> list[np.ndarray]:
    """Inverse of :func:`encode_params` (no pickles are ever loaded)."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        count = len(z.files)
        try:
            return [z[f"arr_{i}"] for i in range(count)]
        except KeyError:
            raise ValueError(f"params npz must hold arr_0 .. arr_{count - 1}") from None


# --------------------------------------------------------------------------------------------
# device runtime
# --------------------------------------------------------------------------------------------


class _Shard:
    """The device-local data and a cache of loaded models."""

    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X, self.y = _check_xy(X, y)
        self._models: dict[tuple[str, int, int], Any] = {}

    def model(self, config: dict[str, Any], params: Sequence[np.ndarray]) -> Any:
        spec = str(config.get("model", "softmax"))
        n_classes = config.get("n_classes")
        if n_classes is None:  # built-ins end with the output bias; module models ignore it
            last = np.shape(params[-1]) if params else ()
            n_classes = int(last[0]) if len(last) == 1 else 0
        key = (spec, self.X.shape[1], int(n_classes))
        if key not in self._models:
            model = load_model(spec, n_features=key[1], n_classes=key[2])
            if hasattr(model, "bind"):  # a plug-in: its client gets this device's shard
                model.bind(self.X, self.y)
            self._models[key] = model
        return self._models[key]


def _int(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config {key!r} must be an integer, got {value!r}")
    return value


def _float(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


def fit_with_config(
    model: Any,
    params: Sequence[np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    config: dict[str, Any],
    round: Any,
    client_index: Any,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Run ``model.fit`` as a protocol ``config`` says (the one mapping, device and server).

    ``config``: ``epochs`` (1), ``lr`` (0.1), ``batch_size`` (32), ``prox_mu`` (0.0) and
    ``seed``: when not None the batch order seed is ``[seed, round, client_index]``.
    """
    order_seed = None
    if config.get("seed") is not None:
        if not isinstance(round, int) or not isinstance(client_index, int):
            raise ValueError("a seeded fit needs integer 'round' and 'client_index'")
        order_seed = [_int(config, "seed", 0), round, client_index]
    return model.fit(
        params, X, y,
        epochs=_int(config, "epochs", 1), lr=_float(config, "lr", 0.1),
        batch_size=_int(config, "batch_size", 32), batch_order_seed=order_seed,
        prox_mu=_float(config, "prox_mu", 0.0),
    )  # fmt: skip


def handle_request(shard: _Shard, request: Any) -> dict[str, Any]:
    """Answer one decoded request; raises on bad input (the loop turns that into ok=false)."""
    if not isinstance(request, dict):
        raise ValueError("a request must be a JSON object")
    op = request.get("op")
    if op == "ping":
        return {"ok": True, "op": "pong", "version": PROTOCOL_VERSION, "pid": os.getpid(),
                "num_examples": int(shard.y.shape[0])}  # fmt: skip
    if op == "info":
        labels, counts = np.unique(shard.y, return_counts=True)
        return {
            "ok": True, "op": "info", "version": PROTOCOL_VERSION,
            "num_examples": int(shard.y.shape[0]), "n_features": int(shard.X.shape[1]),
            "label_counts": {str(int(k)): int(c) for k, c in zip(labels, counts)},  # noqa: B905
        }  # fmt: skip
    if op == "shutdown":
        return {"ok": True, "op": "shutdown"}
    if op not in ("fit", "evaluate", "get_parameters"):
        raise ValueError(f"unknown op {op!r} (expected ping, info, fit, evaluate, get_parameters or shutdown)")
    config = request.get("config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError("config must be a JSON object")
    if op == "get_parameters":
        seed = config.get("seed")
        model = shard.model({"n_classes": 10, **config}, [])
        init = model.init_params(0 if seed is None else _int(config, "seed", 0))
        return {"ok": True, "op": "get_parameters", "params": encode_params(init),
                "shapes": [list(np.shape(p)) for p in init]}  # fmt: skip
    if not isinstance(request.get("params"), str):
        raise ValueError(f"{op} needs 'params' (base64 npz)")
    params = decode_params(request["params"])
    model = shard.model(config, params)
    rnd = request.get("round")
    if op == "evaluate":
        metrics = model.evaluate(params, shard.X, shard.y)
        return {"ok": True, "op": "evaluate", "round": rnd,
                "num_examples": int(shard.y.shape[0]), "metrics": metrics}  # fmt: skip
    started = time.perf_counter()
    new, metrics = fit_with_config(model, params, shard.X, shard.y, config, rnd, request.get("client_index"))
    metrics = dict(metrics)
    metrics["fit_seconds"] = time.perf_counter() - started
    return {
        "ok": True, "op": "fit", "round": rnd, "client_index": request.get("client_index"),
        "params": encode_params(new), "num_examples": int(shard.y.shape[0]), "metrics": metrics,
    }  # fmt: skip


def serve(shard: _Shard, stdin: Any, stdout: Any) -> int:
    """Read requests line by line from binary ``stdin`` and answer on binary ``stdout``."""
    for line in iter(stdin.readline, b""):
        if not line.strip():
            continue
        request: Any = None
        try:
            request = json.loads(line)
            response = handle_request(shard, request)
        except Exception as exc:  # every error becomes an answer, never a crash
            response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            if isinstance(request, dict) and "op" in request:
                response["op"] = request["op"]
        if isinstance(request, dict):
            if "id" in request:
                response["id"] = request["id"]
            if "round" in request and "round" not in response:
                response["round"] = request["round"]
        stdout.write(json.dumps(response, separators=(",", ":")).encode("utf-8") + b"\n")
        stdout.flush()
        if response.get("op") == "shutdown" and response.get("ok"):
            return 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python3 client.py --data shard.npz``."""
    parser = argparse.ArgumentParser(description="EVC numpy federated-learning client")
    parser.add_argument("--data", required=True, help=".npz file with arrays X and y")
    args = parser.parse_args(argv)
    with np.load(args.data, allow_pickle=False) as z:
        shard = _Shard(z["X"], z["y"])
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # user code that prints must not corrupt the protocol stream
    return serve(shard, stdin, stdout)


if __name__ == "__main__":
    sys.exit(main())
