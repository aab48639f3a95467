"""Server-side view of the FL models: the ``Model`` protocol and the shared numpy maths.

The maths lives in :mod:`evc.device.fl_client` (which must stay a self-contained file for devices), and
is re-exported here so the server evaluates with exactly the code the devices train with.

A user model is a Python file on the device defining, at module level::

    def init_params(seed: int) -> list[np.ndarray]: ...
    def fit(params, X, y, *, epochs: int, lr: float, batch_size: int,
            batch_order_seed: list[int] | None, prox_mu: float = 0.0,
            global_params: list[np.ndarray] | None = None,
            ) -> tuple[list[np.ndarray], dict]: ...   # metrics with at least "loss" and "n"
    def evaluate(params, X, y) -> dict: ...           # "loss", "accuracy" and "n"

``fit`` must not modify ``params`` in place.  ``batch_order_seed`` is ``[seed, round,
client_index]`` when the job is seeded (use ``numpy.random.default_rng(batch_order_seed)`` for
a reproducible batch order) and ``None`` otherwise.  ``prox_mu > 0`` asks for the FedProx term
``mu/2 * ||w - global_params||^2`` (``global_params`` defaults to ``params``).

Built-in models and their seeds (each class documents its parameter layout and
initialisation): ``softmax`` (:class:`SoftmaxRegression`), ``mlp``/``mlp:<hidden>``
(:class:`MLP`), ``cnn``/``cnn:<channels>`` (:class:`CNN`, its maths in
:mod:`evc.device.fl_models`).  In a job with seed ``s`` (the strategy parameter ``seed``, default 0; a job
submitted without one gets 0): round 0's global model is ``init_params(s)``; round ``r``
samples its clients with ``numpy.random.default_rng([s, r])`` over the job's device order
(:meth:`evc.fl.strategy.Strategy.configure_fit`); client ``i`` (its position in the job)
shuffles its batches with ``numpy.random.default_rng([s, r, i]).permutation(n)`` once per
epoch, the last partial batch kept.  With ``seed: null`` batches follow the data order.

A ``module:`` model is code for the devices: the controller never imports or runs it.
:func:`load_model` here builds only the built-in models; the round engine asks a device for a
module model's initial parameters (``get_parameters``) and skips server-side evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from evc.device import fl_client as _client
from evc.device.fl_client import CNN, MLP, SoftmaxRegression, sgd_fit
from evc.errors import ValidationError

__all__ = [
    "CNN",
    "MLP",
    "PLUGIN_NAME",
    "Model",
    "Params",
    "SoftmaxRegression",
    "is_device_model",
    "load_model",
    "sgd_fit",
    "validate_model_spec",
]

#: a plug-in's name: ``~/.evc/fl/plugins/<name>.py`` on the devices
PLUGIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")

#: model parameters travel and aggregate as an ordered list of float arrays
Params = list[np.ndarray]


@runtime_checkable
class Model(Protocol):
    """What every FL model offers, built-in or user-supplied."""

    def init_params(self, seed: int = 0) -> list[np.ndarray]:
        """Initial global parameters (deterministic in ``seed``)."""
        ...

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
        """Local SGD from ``params``; returns new parameters and ``{"loss", "n"}``."""
        ...

    def evaluate(self, params: Sequence[np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """``{"loss": mean cross-entropy, "accuracy": fraction correct, "n": len(y)}``."""
        ...


def is_device_model(spec: str) -> bool:
    """Whether *spec* names user code on the devices (``module:<path>``, ``plugin:<name>``),
    which the controller must never import."""
    return spec.startswith(("module:", "plugin:"))


def load_model(spec: str, *, n_features: int = 64, n_classes: int = 10) -> Model:
    """Build a built-in model: ``"softmax"``, ``"mlp"``, ``"mlp:<hidden>"``, ``"cnn"`` or
    ``"cnn:<channels>"``.

    ``n_features``/``n_classes`` size it (defaults fit the digits task).  A ``module:`` or ``plugin:``
    spec is refused: it is code for the devices, never run here.  Raises
    :class:`evc.errors.ValidationError` for a bad spec.
    """
    if is_device_model(spec):
        raise ValidationError(f"model {spec!r} is code for the devices; the controller never loads it", model=spec)
    try:
        model: Model = _client.load_model(spec, n_features=n_features, n_classes=n_classes)
    except (ValueError, ImportError, OSError, SyntaxError) as exc:
        raise ValidationError(f"cannot load model {spec!r}: {exc}", model=spec) from exc
    return model


def validate_model_spec(spec: object) -> str:
    """Check a model spec's form without loading it (a module path lives on the devices).

    Returns the spec; raises :class:`evc.errors.ValidationError` naming what is wrong.
    """
    if not isinstance(spec, str) or not spec:
        raise ValidationError(f"model must be a non-empty string, got {spec!r}", model=spec)
    if spec in ("softmax", "mlp", "cnn"):
        return spec
    if spec.startswith(("mlp:", "cnn:")) and spec[4:].isdigit() and 0 < int(spec[4:]) <= 4096:
        return spec
    if spec.startswith("module:") and spec[len("module:") :].endswith(".py"):
        return spec
    if spec.startswith("plugin:") and PLUGIN_NAME.match(spec[len("plugin:") :]):
        return spec
    raise ValidationError(
        f"unknown model {spec!r}: use 'softmax', 'mlp', 'mlp:<hidden>', 'cnn', 'cnn:<channels>', "
        "'module:<path>.py' or 'plugin:<name>' (a plug-in shipped by the fl-client playbook)",
        model=spec,
    )
