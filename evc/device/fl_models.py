"""The FL client's vision model and plug-ins: a small numpy CNN, and user training code in the
shape of Flower's ``NumPyClient``.

Shipped beside the client (``~/.evc/fl/fl_models.py`` next to ``client.py``) and loaded by it
by path; numpy only, Python >= 3.8, no ``evc`` import.  The controller loads the same file the
same way (:mod:`evc.fl.models`), so the CNN's maths is defined once.

CNN (``"cnn"``, ``"cnn:<channels>"``, default 8 channels), for square single-channel images of
``side x side`` pixels given as rows of ``side * side`` features (digits: 8 x 8 = 64):
``conv 3x3 (zero padding 1, stride 1) -> relu -> max-pool 2x2 -> flatten (NCHW order) -> dense
-> softmax``.  Parameters, in order, float64: ``W1 (c, 1, 3, 3)`` and ``b1 (c,)`` (the
convolution, ONNX ``Conv`` layout), ``W2 (c * (side // 2) ** 2, k)`` and ``b2 (k,)`` (the dense
layer).  Initialisation: ``rng = numpy.random.default_rng(seed)``, then ``W1 = rng.normal(0,
sqrt(2 / 9), (c, 1, 3, 3))`` (He, fan-in 9), then ``W2 = rng.normal(0, sqrt(2 / (f + k)), (f,
k))`` with ``f = c * (side // 2) ** 2`` (Glorot-scaled); biases zero.

Plug-ins: a Python file on the device defining ``client_fn(X, y)`` that returns an object with
Flower's ``NumPyClient`` methods, all on lists of numpy arrays::

    get_parameters(config) -> list[np.ndarray]
    fit(parameters, config) -> (list[np.ndarray], num_examples, metrics)
    evaluate(parameters, config) -> (loss, num_examples, metrics)     # metrics: "accuracy"

:class:`PluginModel` adapts it to the client's model interface.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Sequence

import numpy as np

Arrays = List[np.ndarray]


# --------------------------------------------------------------------------------------------
# the CNN
# --------------------------------------------------------------------------------------------


def cnn_side(n_features: int) -> int:
    """The image side for *n_features* pixels (a square image, at least 2 x 2)."""
    side = int(round(n_features**0.5))
    if side * side != n_features or side < 2:
        raise ValueError(f"cnn needs square images: {n_features} features is not side * side")
    return side


def cnn_shapes(n_features: int, n_classes: int, channels: int) -> list[tuple[int, ...]]:
    flat = channels * (cnn_side(n_features) // 2) ** 2
    return [(channels, 1, 3, 3), (channels,), (flat, n_classes), (n_classes,)]


def cnn_init(n_features: int, n_classes: int, channels: int, seed: int) -> Arrays:
    """He-normal convolution, then Glorot-scaled dense weights from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    s1, _, s2, _ = cnn_shapes(n_features, n_classes, channels)
    return [
        rng.normal(0.0, np.sqrt(2.0 / 9.0), size=s1),
        np.zeros(channels),
        rng.normal(0.0, np.sqrt(2.0 / (s2[0] + n_classes)), size=s2),
        np.zeros(n_classes),
    ]


def _patches(X: np.ndarray, side: int) -> np.ndarray:
    """(n, side*side) -> (n, side, side, 9): each pixel's 3x3 neighbourhood, zero padded."""
    img = np.pad(np.asarray(X, dtype=np.float64).reshape(-1, side, side), ((0, 0), (1, 1), (1, 1)))
    return np.stack([img[:, i : i + side, j : j + side] for i in range(3) for j in range(3)], axis=-1)


def _windows(act: np.ndarray) -> np.ndarray:
    """(n, s, s, c) -> (n, h, h, c, 4): the 2x2 pooling windows (odd edges dropped)."""
    n, s, _, c = act.shape
    h = s // 2
    return act[:, : 2 * h, : 2 * h, :].reshape(n, h, 2, h, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h, h, c, 4)


def cnn_forward(params: Sequence[np.ndarray], X: np.ndarray) -> dict[str, np.ndarray]:
    """Every intermediate of the forward pass; ``"logits"`` is the output before softmax."""
    W1, b1, W2, b2 = params
    side = cnn_side(np.shape(X)[1])
    patches = _patches(X, side)
    conv = patches @ np.asarray(W1).reshape(len(b1), 9).T + b1  # (n, s, s, c)
    act = np.maximum(conv, 0.0)
    windows = _windows(act)
    pooled = windows.max(axis=-1)  # (n, h, h, c)
    flat = pooled.transpose(0, 3, 1, 2).reshape(len(pooled), -1)  # NCHW order, as ONNX Flatten
    return {"patches": patches, "conv": conv, "windows": windows, "flat": flat, "logits": flat @ W2 + b2}


def cnn_backward(params: Sequence[np.ndarray], cache: dict[str, np.ndarray], dlogits: np.ndarray) -> Arrays:
    """Gradients of the four parameters given the gradient of the logits."""
    W1, b1, W2, _ = params
    c = len(b1)
    conv, windows = cache["conv"], cache["windows"]
    n, h = windows.shape[0], windows.shape[1]
    dpooled = (dlogits @ W2.T).reshape(n, c, h, h).transpose(0, 2, 3, 1)  # (n, h, h, c)
    winner = np.eye(4)[windows.argmax(axis=-1)]  # the max of each window takes the gradient
    dwin = (winner * dpooled[..., None]).reshape(n, h, h, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    dact = np.zeros_like(conv)
    dact[:, : 2 * h, : 2 * h, :] = dwin.reshape(n, 2 * h, 2 * h, c)
    dconv = dact * (conv > 0)
    dW1 = (dconv.reshape(-1, c).T @ cache["patches"].reshape(-1, 9)).reshape(np.shape(W1))
    return [dW1, dconv.sum(axis=(0, 1, 2)), cache["flat"].T @ dlogits, dlogits.sum(axis=0)]


# --------------------------------------------------------------------------------------------
# plug-ins in Flower's NumPyClient shape
# --------------------------------------------------------------------------------------------


class PluginModel:
    """A user plug-in (see the module doc) as the client's model: ``init_params``, ``fit``,
    ``evaluate``.  :meth:`bind` makes its one client, ``client_fn(X, y)``, on the device's shard."""

    def __init__(self, name: str, client_fn: Callable[..., Any]) -> None:
        self.name = name
        self.client_fn = client_fn
        self._client: Any = None

    def bind(self, X: np.ndarray, y: np.ndarray) -> None:
        """Make the plug-in's client for the shard ``X``, ``y`` (once)."""
        if self._client is None:
            client = self.client_fn(X, y)
            missing = [m for m in ("get_parameters", "fit", "evaluate") if not callable(getattr(client, m, None))]
            if missing:
                raise ValueError("plug-in {}: its client lacks {}".format(self.name, ", ".join(missing)))
            self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            raise ValueError(f"plug-in {self.name} is not bound to a shard")
        return self._client

    def init_params(self, seed: int = 0) -> Arrays:
        return [np.asarray(p) for p in self.client.get_parameters({"seed": seed})]

    def fit(self, params: Sequence[np.ndarray], X: np.ndarray, y: np.ndarray, **config: Any) -> tuple[Arrays, dict]:
        """``config`` (passed on as the plug-in's fit config): epochs, lr, batch_size,
        batch_order_seed, prox_mu; ``global_params`` is dropped (the parameters are the global
        model)."""
        wire = {k: v for k, v in config.items() if k != "global_params"}
        new, num_examples, metrics = self.client.fit([np.asarray(p) for p in params], wire)
        out = dict(metrics or {})
        out.setdefault("n", int(num_examples))
        return [np.asarray(p) for p in new], out

    def evaluate(self, params: Sequence[np.ndarray], X: np.ndarray, y: np.ndarray) -> dict:
        loss, num_examples, metrics = self.client.evaluate([np.asarray(p) for p in params], {})
        out = dict(metrics or {})
        out.update(loss=float(loss), n=int(num_examples))
        return out


def plugin_path(name: str) -> str:
    """Where plug-in *name* lives: ``plugins/<name>.py`` beside this file (``~/.evc/fl/plugins``)."""
    if not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"plug-in names are 1-64 letters, digits, _ and -: got {name!r}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins", name + ".py")


def load_plugin(name: str, import_file: Callable[[str, str], Any]) -> PluginModel:
    """Plug-in *name* (imported with *import_file(path, module name)*) as a model."""
    path = plugin_path(name)
    if not os.path.isfile(path):
        raise ValueError(f"no plug-in {name!r} at {path}: ship it with the fl-client playbook (its plugins parameter)")
    module = import_file(path, "evc_fl_plugin_" + name.replace("-", "_"))
    if not callable(getattr(module, "client_fn", None)):
        raise ValueError(f"plug-in {name!r} defines no client_fn(X, y)")
    return PluginModel("plugin:" + name, module.client_fn)
