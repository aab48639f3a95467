"""Federated strategies in Flower's shape: configure a round, aggregate a round (FedAvg & co).

A strategy is plain, broker-free Python.  The orchestrator, per round ``r`` (1-based):

1. ``plan = strategy.configure_fit(r, available_ids, rng, client_index=job_index)`` -> the
   sampled clients and the :class:`FitConfig` each one trains with;
2. either ``strategy.aggregate_fit(r, global_params, results, failures)`` with all results, or
   streaming, O(model) memory: ``begin_round(r, global_params)``, then
   ``accumulate(client_id, params, num_examples, metrics)`` as each update arrives, then
   ``finish_round(failures)``.  Both paths run the same code.
3. checkpoint the new global parameters together with ``strategy.state()`` (server-optimiser
   moments for FedAvgM/FedAdam; empty for FedAvg/FedProx) and, on resume, rebuild the strategy
   with :func:`make_strategy` and call ``load_state``.

Folding the same ``client_id`` twice in one round is ignored (``accumulate`` returns ``False``),
so a redelivered update is never double counted.  A strategy object is not thread-safe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypedDict

import numpy as np

from evc.errors import Conflict, PreconditionFailed, ValidationError
from evc.fl.aggregate import (
    AdamState,
    WeightedAccumulator,
    fedadam_update,
    fedavgm_update,
    weighted_metrics,
)
from evc.fl.models import validate_model_spec

__all__ = [
    "STRATEGIES",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FitConfig",
    "FitFailure",
    "FitResult",
    "Strategy",
    "TrainingPlan",
    "make_strategy",
    "sampling_rng",
]


class FitConfig(TypedDict):
    """What one client trains with in one round; ``evc.fl.protocol.fit_request`` sends it."""

    round: int
    client_index: int
    epochs: int
    lr: float
    batch_size: int
    seed: int | None
    prox_mu: float
    model: str


#: ``(client_id, params, num_examples, metrics)`` as returned by a client's fit
FitResult = tuple[str, Sequence[np.ndarray], int, Mapping[str, Any]]
#: ``(client_id, reason)``: a client that was selected but produced no usable update
FitFailure = tuple[str, str]


@dataclass(frozen=True)
class TrainingPlan:
    """Parameters every strategy shares: sampling gates and the clients' local training.

    ``fraction_fit`` of the available clients (floored, at least ``min_fit_clients``) train
    each round; a round needs ``min_available_clients`` to start and ``min_fit_clients``
    results to aggregate.  ``seed`` seeds both client sampling and each client's batch order
    (``None``: unseeded batch order, sampling then needs an explicit rng).
    """

    fraction_fit: float = 1.0
    min_fit_clients: int = 1
    min_available_clients: int = 1
    local_epochs: int = 1
    lr: float = 0.1
    batch_size: int = 32
    seed: int | None = 0
    model: str = "softmax"
    accept_failures: bool = True


def sampling_rng(seed: int | None, round: int) -> np.random.Generator:
    """The generator that samples round ``round``'s clients: ``default_rng([seed, round])``."""
    return np.random.default_rng(None if seed is None else [seed, round])


class Strategy:
    """FedAvg-style base: sample, train locally, weighted-average; subclasses adjust one step.

    Subclasses override :meth:`client_config` (what clients are told) and/or
    :meth:`server_update` (how the weighted mean becomes the new global model).
    """

    name: ClassVar[str] = "fedavg"

    def __init__(self, plan: TrainingPlan | None = None) -> None:
        self.plan = plan or TrainingPlan()
        self._round: int | None = None
        self._global: list[np.ndarray] | None = None
        self._acc: WeightedAccumulator | None = None
        self._client_metrics: list[tuple[int, Mapping[str, Any]]] = []

    # ---- description and persistence -------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """Every parameter, as :func:`make_strategy` accepts them (for the job record)."""
        return asdict(self.plan) | self._own_params()

    def _own_params(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """Server-side optimiser state to checkpoint beside the global parameters."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state` (e.g. from the checkpoint of the round being resumed)."""
        if state:
            raise ValidationError(f"{self.name} keeps no server state, got {sorted(state)}")

    # ---- configure a round -------------------------------------------------------------------

    def num_fit_clients(self, num_available: int) -> int:
        """How many clients to sample: ``max(floor(n * fraction_fit), min_fit_clients)``."""
        n = int(math.floor(num_available * self.plan.fraction_fit + 1e-9))
        return min(max(n, self.plan.min_fit_clients), num_available)

    def client_config(self, round: int, client_index: int) -> FitConfig:
        """The :class:`FitConfig` for one client in one round."""
        return FitConfig(
            round=round,
            client_index=client_index,
            epochs=self.plan.local_epochs,
            lr=self.plan.lr,
            batch_size=self.plan.batch_size,
            seed=self.plan.seed,
            prox_mu=0.0,
            model=self.plan.model,
        )

    def configure_fit(
        self,
        round: int,
        available_clients: Sequence[str],
        rng: np.random.Generator | None = None,
        *,
        client_index: Mapping[str, int] | None = None,
    ) -> list[tuple[str, FitConfig]]:
        """Sample this round's clients and say how each one trains.

        Sampling draws ``num_fit_clients`` positions without replacement,
        ``rng.choice(len(pool), k, replace=False)``, from the available clients ordered by
        ``client_index`` (their stable index in the job, which also seeds the batch order;
        default: the position in ``available_clients``), with ``rng`` (default
        :func:`sampling_rng(plan.seed, round) <sampling_rng>`).  Sampling never looks at the
        ids themselves: two fleets registered separately (different device ids) with the same
        shards, device order and seed train the same client sets.  The result is ordered by
        client index.  Raises :class:`PreconditionFailed` when fewer than
        ``min_available_clients`` are available.
        """
        if round < 1:
            raise ValidationError(f"rounds are numbered from 1, got {round}")
        ids = list(available_clients)
        if len(set(ids)) != len(ids):
            raise ValidationError("available_clients contains duplicate ids")
        if len(ids) < self.plan.min_available_clients:
            raise PreconditionFailed(
                f"round {round} needs at least {self.plan.min_available_clients} available "
                f"clients, {len(ids)} available",
                round=round,
                available=len(ids),
                min_available_clients=self.plan.min_available_clients,
            )
        index = dict(client_index) if client_index is not None else {c: i for i, c in enumerate(ids)}
        missing = [c for c in ids if c not in index]
        if missing:
            raise ValidationError(f"client_index has no entry for {missing}")
        if rng is None:
            if self.plan.seed is None and self.plan.fraction_fit < 1.0:
                raise ValidationError("unseeded plan: pass an rng to sample clients")
            rng = sampling_rng(self.plan.seed, round)
        pool = sorted(ids, key=lambda c: (index[c], c))  # job order, never the ids' own order
        k = self.num_fit_clients(len(pool))
        chosen = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
        chosen.sort(key=lambda c: (index[c], c))
        return [(c, self.client_config(round, index[c])) for c in chosen]

    # ---- aggregate a round -------------------------------------------------------------------

    def begin_round(self, round: int, global_params: Sequence[np.ndarray]) -> None:
        """Open round ``round`` for streaming aggregation (discards any unfinished round)."""
        self._round = round
        self._global = [np.asarray(p, dtype=np.float64) for p in global_params]
        self._acc = WeightedAccumulator()
        self._client_metrics = []

    def accumulate(
        self,
        client_id: str,
        params: Sequence[np.ndarray],
        num_examples: int,
        metrics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Fold one client's update in, weighted by ``num_examples``.

        Returns ``False`` and changes nothing when ``client_id`` was already folded this round
        (first update wins).  Raises :class:`Conflict` when no round is open and
        :class:`ValidationError` for a non-positive ``num_examples`` or mismatched shapes.
        """
        if self._acc is None or self._global is None:
            raise Conflict("no open round: call begin_round first")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
            raise ValidationError(f"num_examples must be an integer, got {num_examples!r}")
        if client_id in self._acc:
            return False
        if len(params) != len(self._global):
            raise ValidationError(
                f"client {client_id} sent {len(params)} arrays, model has {len(self._global)}",
                client_id=client_id,
            )
        shapes = [np.shape(p) for p in params]
        expected = [p.shape for p in self._global]
        if shapes != expected:
            raise ValidationError(
                f"client {client_id} sent parameter shapes {shapes}, model has {expected}",
                client_id=client_id,
            )
        self._acc.add(params, int(num_examples), key=client_id)
        self._client_metrics.append((int(num_examples), dict(metrics or {})))
        return True

    @property
    def round_clients(self) -> frozenset[str]:
        """Ids folded into the open round so far."""
        return self._acc.keys if self._acc is not None else frozenset()

    def finish_round(self, failures: Iterable[FitFailure] = ()) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Close the open round: the new global parameters and the round's metrics.

        Raises :class:`PreconditionFailed` with fewer than ``min_fit_clients`` updates, or
        with any failure when ``accept_failures`` is false; the round then stays open.
        Metrics: ``round``, ``num_clients``, ``num_examples``, ``num_failures``, ``clients``
        (ids), ``failures`` ({id: reason}) and ``train_<name>``, the example-weighted mean of
        each numeric client metric (e.g. ``train_loss``).
        """
        if self._acc is None or self._global is None or self._round is None:
            raise Conflict("no open round: call begin_round first")
        failed = {str(c): str(reason) for c, reason in failures}
        rnd = self._round
        if self._acc.count < self.plan.min_fit_clients:
            raise PreconditionFailed(
                f"round {rnd} has {self._acc.count} results, needs min_fit_clients={self.plan.min_fit_clients}",
                round=rnd,
                results=self._acc.count,
                failures=failed,
            )
        if failed and not self.plan.accept_failures:
            raise PreconditionFailed(
                f"round {rnd} had {len(failed)} failures and accept_failures is false",
                round=rnd,
                failures=failed,
            )
        averaged = self._acc.result()
        new = self.server_update(rnd, self._global, averaged)
        metrics: dict[str, Any] = {
            "round": rnd,
            "num_clients": self._acc.count,
            "num_examples": int(self._acc.total_weight),
            "num_failures": len(failed),
            "clients": sorted(self._acc.keys),
            "failures": failed,
        }
        client_means = weighted_metrics(self._client_metrics)
        client_means.pop("n", None)
        metrics.update({f"train_{k}": v for k, v in sorted(client_means.items())})
        self._round = self._global = self._acc = None
        self._client_metrics = []
        return new, metrics

    def aggregate_fit(
        self,
        round: int,
        global_params: Sequence[np.ndarray],
        results: Sequence[FitResult],
        failures: Sequence[FitFailure] = (),
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Aggregate a whole round at once (``begin_round`` + ``accumulate`` each +
        ``finish_round``); a client id listed twice counts once."""
        self.begin_round(round, global_params)
        for client_id, params, num_examples, metrics in results:
            self.accumulate(client_id, params, num_examples, metrics)
        return self.finish_round(failures)

    def aggregate_evaluate(self, round: int, results: Sequence[tuple[str, int, Mapping[str, Any]]]) -> dict[str, Any]:
        """Example-weighted means of clients' evaluation metrics (``eval_<name>``)."""
        means = weighted_metrics((n, m) for _, n, m in results)
        means.pop("n", None)
        out: dict[str, Any] = {"round": round, "num_clients": len(results)}
        out["num_examples"] = int(sum(n for _, n, _ in results))
        out.update({f"eval_{k}": v for k, v in sorted(means.items())})
        return out

    def server_update(
        self, round: int, global_params: list[np.ndarray], averaged: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Turn the clients' weighted mean into the new global model (FedAvg: take it)."""
        return averaged


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): the example-weighted mean of the clients' models."""

    name = "fedavg"


class FedProx(Strategy):
    """FedProx (Li et al. 2020): FedAvg whose clients add ``mu/2 ||w - w_global||^2``."""

    name = "fedprox"

    def __init__(self, plan: TrainingPlan | None = None, *, mu: float = 0.01) -> None:
        super().__init__(plan)
        self.mu = float(mu)

    def _own_params(self) -> dict[str, Any]:
        return {"mu": self.mu}

    def client_config(self, round: int, client_index: int) -> FitConfig:
        config = super().client_config(round, client_index)
        config["prox_mu"] = self.mu
        return config


class FedAvgM(Strategy):
    """FedAvgM (Hsu et al. 2019): server SGD with momentum on ``global - mean``."""

    name = "fedavgm"

    def __init__(
        self,
        plan: TrainingPlan | None = None,
        *,
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
    ) -> None:
        super().__init__(plan)
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.momentum: list[np.ndarray] | None = None

    def _own_params(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr, "server_momentum": self.server_momentum}

    def state(self) -> dict[str, np.ndarray]:
        if self.momentum is None:
            return {}
        return {f"momentum_{i}": m for i, m in enumerate(self.momentum)}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.momentum = _indexed(state, "momentum") or None

    def server_update(
        self, round: int, global_params: list[np.ndarray], averaged: list[np.ndarray]
    ) -> list[np.ndarray]:
        new, self.momentum = fedavgm_update(
            global_params,
            averaged,
            self.momentum,
            server_lr=self.server_lr,
            server_momentum=self.server_momentum,
        )
        return new


class FedAdam(Strategy):
    """FedAdam (Reddi et al. 2021): Adam on the server, the pseudo-gradient ``mean - global``."""

    name = "fedadam"

    def __init__(
        self,
        plan: TrainingPlan | None = None,
        *,
        eta: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
    ) -> None:
        super().__init__(plan)
        self.eta, self.beta_1, self.beta_2, self.tau = (
            float(eta),
            float(beta_1),
            float(beta_2),
            float(tau),
        )
        self.adam: AdamState | None = None

    def _own_params(self) -> dict[str, Any]:
        return {"eta": self.eta, "beta_1": self.beta_1, "beta_2": self.beta_2, "tau": self.tau}

    def state(self) -> dict[str, np.ndarray]:
        if self.adam is None:
            return {}
        out = {f"m_{i}": m for i, m in enumerate(self.adam.m)}
        out.update({f"v_{i}": v for i, v in enumerate(self.adam.v)})
        out["t"] = np.asarray(self.adam.t)
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if not state:
            self.adam = None
            return
        m, v = _indexed(state, "m"), _indexed(state, "v")
        if "t" not in state or not m or len(m) != len(v):
            raise ValidationError("fedadam state needs m_i, v_i and t")
        self.adam = AdamState(m=m, v=v, t=int(state["t"]))

    def server_update(
        self, round: int, global_params: list[np.ndarray], averaged: list[np.ndarray]
    ) -> list[np.ndarray]:
        new, self.adam = fedadam_update(
            global_params,
            averaged,
            self.adam,
            eta=self.eta,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            tau=self.tau,
        )
        return new


def _indexed(state: Mapping[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    while f"{prefix}_{len(out)}" in state:
        out.append(np.asarray(state[f"{prefix}_{len(out)}"], dtype=np.float64))
    return out


# ---- construction with validation ----------------------------------------------------------

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
}

# name -> (kind, lower bound, upper bound, lower inclusive); kind: "int", "float", "bool"
_Rule = tuple[str, float | None, float | None, bool]
_PLAN_RULES: dict[str, _Rule] = {
    "fraction_fit": ("float", 0.0, 1.0, False),
    "min_fit_clients": ("int", 1, None, True),
    "min_available_clients": ("int", 1, None, True),
    "local_epochs": ("int", 1, 1000, True),
    "lr": ("float", 0.0, None, False),
    "batch_size": ("int", 1, None, True),
    "accept_failures": ("bool", None, None, True),
}
_OWN_RULES: dict[str, dict[str, _Rule]] = {
    "fedavg": {},
    "fedprox": {"mu": ("float", 0.0, None, True)},
    "fedavgm": {
        "server_lr": ("float", 0.0, None, False),
        "server_momentum": ("float", 0.0, 0.9999, True),
    },
    "fedadam": {
        "eta": ("float", 0.0, None, False),
        "beta_1": ("float", 0.0, 0.9999, True),
        "beta_2": ("float", 0.0, 0.9999, True),
        "tau": ("float", 0.0, None, False),
    },
}


def _check(strategy: str, key: str, value: object, rule: _Rule) -> object:
    kind, low, high, low_inclusive = rule
    where = f"{strategy} parameter {key!r}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValidationError(f"{where} must be true or false, got {value!r}", field=key)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{where} must be a number, got {value!r}", field=key)
    if kind == "int" and (not float(value).is_integer()):
        raise ValidationError(f"{where} must be an integer, got {value!r}", field=key)
    if not math.isfinite(value):
        raise ValidationError(f"{where} must be finite, got {value!r}", field=key)
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    if too_low or (high is not None and value > high):
        bound = "[" if low_inclusive else "("
        raise ValidationError(
            f"{where} must be in {bound}{low}, {high if high is not None else 'inf'}], got {value!r}",
            field=key,
        )
    return int(value) if kind == "int" else float(value)


def make_strategy(name: str, /, **params: object) -> Strategy:
    """Build a strategy by name (``fedavg``, ``fedprox``, ``fedavgm``, ``fedadam``), checked.

    Accepts every :class:`TrainingPlan` field plus the strategy's own parameters
    (fedprox: ``mu``; fedavgm: ``server_lr``, ``server_momentum``; fedadam: ``eta``,
    ``beta_1``, ``beta_2``, ``tau``).  Unknown names, unknown or mistyped parameters and
    out-of-range values raise :class:`evc.errors.ValidationError` saying which and why.
    """
    key = str(name).lower()
    if key not in STRATEGIES:
        raise ValidationError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}", field="strategy")
    own_rules = _OWN_RULES[key]
    plan_fields = {f.name for f in fields(TrainingPlan)}
    unknown = sorted(set(params) - plan_fields - set(own_rules))
    if unknown:
        allowed = sorted(plan_fields | set(own_rules))
        raise ValidationError(
            f"unknown {key} parameter(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}",
            field=unknown[0],
        )
    plan_kw: dict[str, Any] = {}
    own_kw: dict[str, Any] = {}
    for k, v in params.items():
        if k in _PLAN_RULES:
            plan_kw[k] = _check(key, k, v, _PLAN_RULES[k])
        elif k in own_rules:
            own_kw[k] = _check(key, k, v, own_rules[k])
        elif k == "seed":
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValidationError(f"{key} parameter 'seed' must be an integer >= 0 or null")
            plan_kw[k] = v
        elif k == "model":
            plan_kw[k] = validate_model_spec(v)
    plan = TrainingPlan(**plan_kw)
    if plan.min_available_clients < plan.min_fit_clients:
        raise ValidationError(
            f"min_available_clients ({plan.min_available_clients}) must be >= min_fit_clients ({plan.min_fit_clients})",
            field="min_available_clients",
        )
    return STRATEGIES[key](plan, **own_kw)
