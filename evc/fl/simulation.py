"""In-process federated runs: every client's fit called directly, no processes, no broker.

The reference for what an orchestrated job must reproduce, and a quick way to try a strategy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evc.device.fl_client import fit_with_config
from evc.errors import ValidationError
from evc.fl.models import Model
from evc.fl.strategy import FitConfig, Strategy

__all__ = ["ClientFit", "SimulationResult", "local_fit", "simulate"]

#: ``(client_id, global_params, fit_config) -> (params, num_examples, metrics)``
ClientFit = Callable[[str, Sequence[np.ndarray], FitConfig], tuple[Sequence[np.ndarray], int, Mapping[str, Any]]]


def local_fit(
    model: Model, params: Sequence[np.ndarray], X: np.ndarray, y: np.ndarray, config: FitConfig
) -> tuple[list[np.ndarray], int, dict[str, Any]]:
    """What a device computes for ``config``, computed here: ``(params, n, metrics)``."""
    wire = dict(config)
    new, metrics = fit_with_config(model, params, X, y, wire, config["round"], config["client_index"])
    return new, int(len(y)), dict(metrics)


@dataclass
class SimulationResult:
    """Final parameters and one metrics dict per round (strategy metrics + ``eval_*``)."""

    params: list[np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)


def simulate(
    strategy: Strategy,
    model: Model,
    shards: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    rounds: int,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    initial_params: Sequence[np.ndarray] | None = None,
    client_fit: ClientFit | None = None,
) -> SimulationResult:
    """Run ``rounds`` rounds of ``strategy`` over clients ``"0" .. "n-1"`` (index k = shard k).

    Each round folds updates in one by one (``begin_round``/``accumulate``/``finish_round``),
    then evaluates the global model on ``test`` (``eval_loss``, ``eval_accuracy``).
    ``client_fit`` replaces the in-process fit (e.g. to go through client processes).
    """
    if rounds < 1 or not shards:
        raise ValidationError("simulate needs rounds >= 1 and at least one shard")
    ids = [str(k) for k in range(len(shards))]
    index = {c: k for k, c in enumerate(ids)}
    if client_fit is None:

        def client_fit(
            cid: str, params: Sequence[np.ndarray], config: FitConfig
        ) -> tuple[Sequence[np.ndarray], int, Mapping[str, Any]]:
            X, y = shards[index[cid]]
            return local_fit(model, params, X, y, config)

    seed = strategy.plan.seed if strategy.plan.seed is not None else 0
    params = [np.asarray(p) for p in (initial_params or model.init_params(seed))]
    result = SimulationResult(params)
    for rnd in range(1, rounds + 1):
        started = time.perf_counter()
        plan = strategy.configure_fit(rnd, ids, client_index=index)
        strategy.begin_round(rnd, params)
        for cid, config in plan:
            new, n, metrics = client_fit(cid, params, config)
            strategy.accumulate(cid, new, n, metrics)
        params, metrics = strategy.finish_round()
        if test is not None:
            scores = model.evaluate(params, *test)
            metrics["eval_loss"] = scores["loss"]
            metrics["eval_accuracy"] = scores["accuracy"]
        metrics["duration_s"] = time.perf_counter() - started
        result.history.append(metrics)
    result.params = params
    return result
