"""The latency predictor (pure): per-operator costs from the graph × the device's calibration,
corrected on the profiles that exist, then the device's CPU quota.

1. CPU time of one inference: ``w = β_device · Σ_i α_i · t_i(device) · x_i(variant, batch)``
   where ``x`` are the graph's cost features (:mod:`evc.recommend.features`), ``t`` the device's
   calibrated cost per unit (:mod:`evc.recommend.calibration`), ``α`` one global correction per
   feature (ridge regression toward 1 on the relative errors of every profile's CPU time) and
   ``β`` a per-device factor (the geometric mean of its profiles' ratios, shrunk toward the
   fleet's: a device with no profile gets the fleet's).
2. Wall-clock latency under a CFS CPU quota ``q`` < 1 (period ``P``; the runner and the edge
   server use one thread): run back to back, an inference of CPU time ``w`` is stalled
   ``P - qP`` at each exhausted budget ``qP``, so it sees ``floor(w/qP)`` or one more stall
   (that one with probability ``frac(w/qP)``): the p50 and p95 follow, the mean is ``w/q``. A
   per-device factor ``γ`` (shrunk toward the fleet's) corrects what this leaves out (other load).
3. Uncertainty: the root-mean-square relative error of the p50 on held-out profiles
   (leave-one-out).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from evc.recommend import features as feats

#: ridge strength toward α = 1 (relative-error units)
RIDGE = 0.05
#: prior weight (in profiles) of the fleet's factor in a device's β and γ
SHRINK = 1.0
#: the candidate values of :attr:`Predictor.reach`
REACHES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: uncertainty when there are too few profiles to measure it
DEFAULT_UNCERTAINTY = 0.3
MIN_UNCERTAINTY = 0.05


@dataclass(frozen=True)
class Calibration:
    """A device's calibration: CPU ms per feature unit, its CPU quota (CPUs; None: no limit)
    and the CFS period (s)."""

    coef: Mapping[str, float]
    quota: float | None = None
    period_s: float | None = None

    def vector(self) -> np.ndarray:
        return np.array([float(self.coef.get(k, 0.0)) for k in feats.NAMES])


@dataclass(frozen=True)
class Observation:
    """One profile point: a variant (its features at the batch) measured on a device."""

    device: str
    variant: str
    batch: int
    features: Mapping[str, float]
    p50_ms: float
    p95_ms: float
    cpu_ms: float
    mean_ms: float | None = None


@dataclass(frozen=True)
class Estimate:
    p50_ms: float
    p95_ms: float
    mean_ms: float
    cpu_ms: float
    uncertainty: float

    @property
    def throughput_per_ms(self) -> float:
        return 1.0 / self.mean_ms if self.mean_ms > 0 else 0.0


@dataclass
class Predictor:
    alpha: np.ndarray = field(default_factory=lambda: np.ones(len(feats.NAMES)))
    beta: dict[str, float] = field(default_factory=dict)
    gamma: dict[str, float] = field(default_factory=dict)
    beta0: float = 1.0
    gamma0: float = 1.0
    uncertainty: float = DEFAULT_UNCERTAINTY
    profiles: int = 0
    #: how many CFS budgets an inference needs to see its full share of stalls (fitted)
    reach: float = 0.1
    #: the fleet's median p95 / p50 of the profiles (a predicted p95 is the p50 times it)
    tail: float = 1.5

    def cpu_ms(self, device: str, cal: Calibration, x: Mapping[str, float]) -> float:
        z = cal.vector() * np.array(feats.vector(dict(x)))
        return float(z @ self.alpha) * self.beta.get(device, self.beta0)

    def predict(self, device: str, cal: Calibration, x: Mapping[str, float]) -> Estimate:
        w = self.cpu_ms(device, cal, x)
        g = self.gamma.get(device, self.gamma0)
        p50 = cfs_latency(w, cal.quota, cal.period_s, self.reach) * g
        mean = max(p50, cfs_latency(w, cal.quota, cal.period_s, None) * g)
        return Estimate(p50, p50 * self.tail, mean, w, self.uncertainty)


def cfs_latency(w_ms: float, quota: float | None, period_s: float | None, reach: float | None) -> float:
    """Wall-clock latency of back-to-back inferences of CPU time *w_ms* under a CFS quota of
    *quota* CPUs per period (one thread). *reach* None: the mean, ``w / quota``. Otherwise the
    median: an inference much shorter than the budget ``quota · period`` mostly runs between
    stalls (latency ``w``); one of *reach* budgets or longer sees its share of stalls (``w /
    quota``); in between, linearly in ``w / budget``."""
    if quota is None or quota >= 1 or not period_s or w_ms <= 0:
        return w_ms
    slow = 1.0 / quota - 1.0
    if reach is None:
        return w_ms * (1 + slow)
    r = w_ms / (quota * period_s * 1000.0)
    return w_ms * (1 + slow * min(1.0, r / reach))


def _shrunk(logs: Sequence[float], prior: float) -> float:
    return math.exp((sum(logs) + SHRINK * prior) / (len(logs) + SHRINK))


def _fit_alpha(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """α minimising the relative errors plus ``RIDGE`` per profile times ||α - 1||²: a column
    of ``z / y`` is the share of each profile's time the feature is predicted to take, so every
    feature is on one scale."""
    a = z / y[:, None]
    used = np.abs(a).sum(axis=0) > 0
    alpha = np.ones(z.shape[1])
    if used.any():
        au = a[:, used]
        lam = RIDGE * len(y)
        sol = np.linalg.solve(au.T @ au + lam * np.eye(au.shape[1]), au.T @ np.ones(len(y)) + lam)
        alpha[used] = np.clip(sol, 0.05, 20.0)
    return alpha


def _wall_fit(
    obs: Sequence[Observation], calibrations: Mapping[str, Calibration], reach: float
) -> tuple[float, dict[str, list[float]]]:
    """The log ratios measured p50 / modelled p50 (from the measured CPU time) by device, and
    their squared spread around each device's mean (what *reach* should make small)."""
    logs: dict[str, list[float]] = {}
    for o in obs:
        cal = calibrations[o.device]
        logs.setdefault(o.device, []).append(math.log(o.p50_ms / cfs_latency(o.cpu_ms, cal.quota, cal.period_s, reach)))
    spread = 0.0
    for xs in logs.values():
        m = sum(xs) / len(xs)
        spread += sum((x - m) ** 2 for x in xs) + (m * m if len(xs) == 1 else 0.0)
    return spread, logs


def fit(observations: Iterable[Observation], calibrations: Mapping[str, Calibration]) -> Predictor:
    """The predictor fitted on *observations* of calibrated devices (others are left out)."""
    obs = [o for o in observations if o.device in calibrations and o.cpu_ms > 0 and o.p50_ms > 0]
    pred = Predictor(profiles=len(obs))
    if not obs:
        return pred
    z = np.array([calibrations[o.device].vector() * np.array(feats.vector(dict(o.features))) for o in obs])
    y = np.array([o.cpu_ms for o in obs])
    pred.alpha = _fit_alpha(z, y)
    base = z @ pred.alpha
    cpu_logs = [math.log(o.cpu_ms / b) for o, b in zip(obs, base, strict=True) if b > 0]
    pred.beta0 = math.exp(sum(cpu_logs) / len(cpu_logs)) if cpu_logs else 1.0
    cpu_by_dev: dict[str, list[float]] = {}
    for o, b in zip(obs, base, strict=True):
        if b > 0:
            cpu_by_dev.setdefault(o.device, []).append(math.log(o.cpu_ms / b))
    pred.beta = {d: _shrunk(xs, math.log(pred.beta0)) for d, xs in cpu_by_dev.items()}
    if any((calibrations[o.device].quota or 1.0) < 1.0 for o in obs):  # else it cannot be told
        pred.reach = min(REACHES, key=lambda r: _wall_fit(obs, calibrations, r)[0])
    _, wall_logs = _wall_fit(obs, calibrations, pred.reach)
    all_wall = [x for xs in wall_logs.values() for x in xs]
    pred.gamma0 = math.exp(sum(all_wall) / len(all_wall))
    pred.gamma = {d: _shrunk(xs, math.log(pred.gamma0)) for d, xs in wall_logs.items()}
    tails = sorted(o.p95_ms / o.p50_ms for o in obs)
    pred.tail = max(1.0, tails[len(tails) // 2])
    return pred


def held_out(
    observations: Sequence[Observation], calibrations: Mapping[str, Calibration]
) -> list[tuple[Observation, Estimate]]:
    """Leave-one-out: each observation predicted by the predictor fitted on the others."""
    obs = [o for o in observations if o.device in calibrations]
    out = []
    for i, o in enumerate(obs):
        p = fit(obs[:i] + obs[i + 1 :], calibrations)
        out.append((o, p.predict(o.device, calibrations[o.device], o.features)))
    return out


def relative_errors(pairs: Iterable[tuple[Observation, Estimate]]) -> list[float]:
    return [(e.p50_ms - o.p50_ms) / o.p50_ms for o, e in pairs]


def error_report(errors: Sequence[float]) -> dict[str, float | int | None]:
    """How good the p50 predictions are: count, share within ±10 % and ±20 %, median |error|."""
    if not errors:
        return {"pairs": 0, "within_10pct": None, "within_20pct": None, "median_abs_error": None, "rms": None}
    abs_e = sorted(abs(e) for e in errors)
    return {
        "pairs": len(errors),
        "within_10pct": round(sum(e <= 0.10 for e in abs_e) / len(abs_e), 3),
        "within_20pct": round(sum(e <= 0.20 for e in abs_e) / len(abs_e), 3),
        "median_abs_error": round(abs_e[len(abs_e) // 2], 4),
        "rms": round(math.sqrt(sum(e * e for e in errors) / len(errors)), 4),
    }


def fit_with_uncertainty(
    observations: Sequence[Observation], calibrations: Mapping[str, Calibration]
) -> tuple[Predictor, dict[str, float | int | None]]:
    """The predictor on every observation, its uncertainty and error report from leave-one-out."""
    pred = fit(observations, calibrations)
    errors = relative_errors(held_out(observations, calibrations)) if len(observations) >= 3 else []
    report = error_report(errors)
    if errors:
        pred.uncertainty = max(MIN_UNCERTAINTY, float(report["rms"] or 0.0))
    return pred, report
