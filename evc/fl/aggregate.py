"""Aggregation maths as pure functions: weighted mean, streaming accumulator, server optimisers.

Parameters are ordered lists of float arrays (``list[np.ndarray]``).  Nothing here keeps global
state; the server-optimiser functions take their state in and hand the new state back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from evc.errors import ValidationError

__all__ = [
    "AccumulatorState",
    "AdamState",
    "WeightedAccumulator",
    "fedadam_update",
    "fedavgm_update",
    "weighted_average",
    "weighted_metrics",
]


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not np.isfinite(w) or w <= 0:
        raise ValidationError(f"aggregation weight must be a positive number, got {weight!r}")
    return w


def _check_like(params: Sequence[np.ndarray], like: Sequence[np.ndarray]) -> None:
    shapes = [np.shape(p) for p in params]
    expected = [np.shape(p) for p in like]
    if shapes != expected:
        raise ValidationError(f"parameter shapes {shapes} do not match {expected}", shapes=[list(s) for s in shapes])


def weighted_average(params_list: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> list[np.ndarray]:
    """FedAvg's ``w = sum_k (n_k / sum_j n_j) * w_k``, array by array, in the given order."""
    if not params_list or len(params_list) != len(weights):
        raise ValidationError("weighted_average needs one weight per parameter set, at least one")
    ws = [_check_weight(w) for w in weights]
    total = sum(ws)
    for params in params_list[1:]:
        _check_like(params, params_list[0])
    out: list[np.ndarray] = []
    for i in range(len(params_list[0])):
        acc = (ws[0] / total) * np.asarray(params_list[0][i], dtype=np.float64)
        for w, params in zip(ws[1:], params_list[1:], strict=True):
            acc = acc + (w / total) * np.asarray(params[i], dtype=np.float64)
        out.append(acc)
    return out


@dataclass(frozen=True)
class AccumulatorState:
    """A :class:`WeightedAccumulator` at rest: ``sum_k n_k w_k``, ``sum_k n_k``, keys, count."""

    sums: list[np.ndarray]
    total_weight: float
    keys: tuple[str, ...]
    count: int


class WeightedAccumulator:
    """Folds ``(params, weight)`` pairs one at a time into a weighted mean in O(model) memory.

    ``add(..., key=...)`` makes folding idempotent: a key already folded is ignored (``add``
    returns ``False``), first write wins.  ``result()`` is ``sum_k n_k w_k / sum_k n_k``,
    equal to :func:`weighted_average` up to float rounding (~1e-16 relative).
    """

    def __init__(self) -> None:
        self._sums: list[np.ndarray] | None = None
        self._total = 0.0
        self._keys: set[str] = set()
        self._count = 0

    @property
    def total_weight(self) -> float:
        return self._total

    @property
    def count(self) -> int:
        """How many parameter sets have been folded in."""
        return self._count

    @property
    def keys(self) -> frozenset[str]:
        """The keys folded so far (updates added without a key are not listed)."""
        return frozenset(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, params: Sequence[np.ndarray], weight: float, *, key: str | None = None) -> bool:
        """Fold one update in; ``False`` (and no change) when ``key`` was already folded."""
        if key is not None and key in self._keys:
            return False
        w = _check_weight(weight)
        if self._sums is None:
            self._sums = [w * np.asarray(p, dtype=np.float64) for p in params]
        else:
            _check_like(params, self._sums)
            for acc, p in zip(self._sums, params, strict=True):
                acc += w * np.asarray(p, dtype=np.float64)
        self._total += w
        self._count += 1
        if key is not None:
            self._keys.add(key)
        return True

    def result(self) -> list[np.ndarray]:
        """The weighted mean so far; raises ValidationError when nothing was added."""
        if self._sums is None:
            raise ValidationError("nothing to aggregate: no update was added")
        return [s / self._total for s in self._sums]

    def state(self) -> AccumulatorState:
        """A copy of the running sums, so a half-finished round can be persisted and resumed."""
        sums = [s.copy() for s in self._sums] if self._sums is not None else []
        return AccumulatorState(sums, self._total, tuple(sorted(self._keys)), self._count)

    @classmethod
    def from_state(cls, state: AccumulatorState) -> WeightedAccumulator:
        """Rebuild an accumulator from :meth:`state`."""
        acc = cls()
        if state.sums:
            acc._sums = [np.array(s, dtype=np.float64, copy=True) for s in state.sums]
            acc._total = _check_weight(state.total_weight)
        acc._keys = set(state.keys)
        acc._count = state.count
        return acc


def weighted_metrics(results: Iterable[tuple[float, Mapping[str, object]]]) -> dict[str, float]:
    """Weighted mean of every numeric metric over ``(num_examples, metrics)`` pairs.

    A metric missing from some results is averaged over the results that have it.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in results:
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                continue
            sums[name] = sums.get(name, 0.0) + float(n) * float(value)
            weights[name] = weights.get(name, 0.0) + float(n)
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}


def fedavgm_update(
    global_params: Sequence[np.ndarray],
    averaged: Sequence[np.ndarray],
    momentum: Sequence[np.ndarray] | None,
    *,
    server_lr: float,
    server_momentum: float,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """FedAvgM (Hsu et al. 2019, as in Flower): server SGD with momentum on the pseudo-gradient.

    ``g = global - averaged``; with ``server_momentum > 0``: ``v = beta * v + g`` (``v = g`` in
    the first round); ``new = global - server_lr * v``.  Returns ``(new_params, v or None)``.
    ``server_lr = 1, server_momentum = 0`` is plain FedAvg.
    """
    _check_like(averaged, global_params)
    grad = [np.asarray(g, np.float64) - np.asarray(a, np.float64)
            for g, a in zip(global_params, averaged, strict=True)]  # fmt: skip
    new_momentum: list[np.ndarray] | None = None
    if server_momentum > 0:
        if momentum is None:
            new_momentum = grad
        else:
            _check_like(momentum, global_params)
            new_momentum = [server_momentum * m + g for m, g in zip(momentum, grad, strict=True)]
        grad = new_momentum
    new = [np.asarray(p, np.float64) - server_lr * g
           for p, g in zip(global_params, grad, strict=True)]  # fmt: skip
    return new, new_momentum


@dataclass(frozen=True)
class AdamState:
    """FedAdam's server state: first and second moments and the number of steps taken."""

    m: list[np.ndarray]
    v: list[np.ndarray]
    t: int


def fedadam_update(
    global_params: Sequence[np.ndarray],
    averaged: Sequence[np.ndarray],
    state: AdamState | None,
    *,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
) -> tuple[list[np.ndarray], AdamState]:
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization").

    ``d = averaged - global``; ``m = b1 m + (1-b1) d``; ``v = b2 v + (1-b2) d^2``;
    ``new = global + eta * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + tau)`` with ``t`` the 1-based
    step.  (Flower uses ``t = round + 1`` in the bias correction; we use the step count, so a
    resumed or skipped round does not shift it.)
    """
    _check_like(averaged, global_params)
    delta = [np.asarray(a, np.float64) - np.asarray(g, np.float64)
             for a, g in zip(averaged, global_params, strict=True)]  # fmt: skip
    if state is None:
        m0 = [np.zeros_like(d) for d in delta]
        v0 = [np.zeros_like(d) for d in delta]
        t = 0
    else:
        _check_like(state.m, global_params)
        m0, v0, t = state.m, state.v, state.t
    t += 1
    m = [beta_1 * mi + (1 - beta_1) * d for mi, d in zip(m0, delta, strict=True)]
    v = [beta_2 * vi + (1 - beta_2) * d * d for vi, d in zip(v0, delta, strict=True)]
    eta_t = eta * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    new = [np.asarray(p, np.float64) + eta_t * mi / (np.sqrt(vi) + tau)
           for p, mi, vi in zip(global_params, m, v, strict=True)]  # fmt: skip
    return new, AdamState(m=m, v=v, t=t)
