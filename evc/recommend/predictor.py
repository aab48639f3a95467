"""The latency predictor (pure): per-operator costs from the graph × the device's calibration,
corrected on the profiles that exist, then the device's CPU quota.

1. CPU time of one inference: ``w = β_device · Σ_i α_i · t_i(device) · x_i(variant, batch)``
   where ``x`` are the graph's cost features (:mod:`evc.recommend.features`), ``t`` the device's
   calibrated cost per unit (:mod:`evc.recommend.calibration`), ``α`` one global correction per
   feature (ridge regression toward 1 on the relative errors of every profile's CPU time) and
   ``β`` a per-device factor (the geometric mean of its profiles' ratios, shrunk toward the
   fleet's: a device with no profile gets the fleet's).
2. Wall-clock latency: an inference much shorter than a scheduling slice mostly runs between
   stalls (latency ``w``); a long one is slowed by the device's ``S``, the wall-clock / CPU
   time of the long calibration graph (the CPU quota, other load on the device; ``1 / quota``
   when not measured). In between, linearly: ``p50 = w · (1 + (S - 1) · ramp(w))`` where
   ``ramp`` rises from 0 at ``onset`` to 1 at ``onset + span`` (CPU ms; a scheduler lets a
   short inference finish: the step is sharp), both fitted on the profiles and the calibration
   graphs' own wall-clock and CPU times; at least ``w`` plus the CFS stalls its median sees
   under a quota (:func:`quota_stalls`: once ``w`` outlasts the budget ``quota · period``, a
   whole ``period - budget`` per budget); the mean is ``w · S``. A per-device factor ``γ``
   (shrunk toward the fleet's) corrects what this leaves out.
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
RIDGE = 0.002
#: prior weight (in profiles) of the fleet's factor in a device's β and γ
SHRINK = 1.0
#: the candidate values of :attr:`Predictor.span_ms`
SPANS_MS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 35.0, 60.0, 100.0)
#: the candidate values of :attr:`Predictor.onset_ms`
ONSETS_MS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: uncertainty when there are too few profiles to measure it
DEFAULT_UNCERTAINTY = 0.3
MIN_UNCERTAINTY = 0.05
#: at most this many leave-one-out fits per report
MAX_HELD_OUT = 40


@dataclass(frozen=True)
class Calibration:
    """A device's calibration: CPU ms per feature unit, its CPU quota (CPUs; None: no limit),
    the CFS period (s) and the measured slowdown of a long inference (None: from the quota)."""

    coef: Mapping[str, float]
    quota: float | None = None
    period_s: float | None = None
    measured_slowdown: float | None = None

    @property
    def slowdown(self) -> float:
        if self.measured_slowdown:
            return max(1.0, float(self.measured_slowdown))
        return 1.0 / self.quota if self.quota and self.quota < 1 else 1.0

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
    #: how long (CPU ms) an inference must be to be slowed by the device's full slowdown (fitted)
    span_ms: float = 5.0
    #: below this CPU time an inference is not slowed at all (fitted)
    onset_ms: float = 0.0
    #: the fleet's median p95 / p50 of the profiles, quota stalls left out (a predicted p95 is
    #: the p50 times it, plus :func:`quota_stall`)
    tail: float = 1.5

    def cpu_ms(self, device: str, cal: Calibration, x: Mapping[str, float]) -> float:
        z = cal.vector() * np.array(feats.vector(dict(x)))
        return float(z @ self.alpha) * self.beta.get(device, self.beta0)

    def predict(self, device: str, cal: Calibration, x: Mapping[str, float]) -> Estimate:
        w = self.cpu_ms(device, cal, x)
        g = self.gamma.get(device, self.gamma0)
        p50 = max(wall_latency(w, cal.slowdown, self.span_ms, self.onset_ms), w + quota_stalls(w, cal)) * g
        mean = max(p50, w * cal.slowdown * g)
        return Estimate(p50, p50 * self.tail + quota_stall(w, cal), mean, w, self.uncertainty)


def wall_latency(w_ms: float, slowdown: float, span_ms: float, onset_ms: float = 0.0) -> float:
    """The p50 wall-clock latency of inferences of CPU time *w_ms* on a device whose long
    inferences run *slowdown* times slower than their CPU time (see the module doc)."""
    if w_ms <= 0:
        return w_ms
    return w_ms * (1 + (slowdown - 1) * min(1.0, max(0.0, w_ms - onset_ms) / span_ms))


def quota_stalls(w_ms: float, cal: Calibration) -> float:
    """The CFS stalls in the median of back-to-back inferences of CPU time *w_ms*: an inference
    sees ``floor(w / budget)`` or one more stall of ``period - budget``, the latter with probability
    ``frac(w / budget)``."""
    if not cal.quota or cal.quota >= 1 or not cal.period_s:
        return 0.0
    budget = cal.quota * cal.period_s * 1000.0
    r = w_ms / budget
    return (cal.period_s * 1000.0 - budget) * (math.floor(r) + (1 if r - math.floor(r) > 0.5 else 0))


def quota_stall(w_ms: float, cal: Calibration) -> float:
    """What a CFS quota adds to the p95 of back-to-back inferences of CPU time *w_ms*: once more
    than about 5 % of them run into an exhausted budget ``quota · period``, the p95 includes a
    stall of ``period - budget`` (ramped in between 3 % and 10 %)."""
    if not cal.quota or cal.quota >= 1 or not cal.period_s:
        return 0.0
    budget = cal.quota * cal.period_s * 1000.0
    hit = w_ms / budget
    return (cal.period_s * 1000.0 - budget) * min(1.0, max(0.0, (hit - 0.03) / 0.07))


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def _shrunk(logs: Sequence[float], prior: float) -> float:
    """A device's factor: the median of its log ratios, shrunk toward the fleet's *prior*."""
    n = len(logs)
    return math.exp((n * _median(logs) + SHRINK * prior) / (n + SHRINK))


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


#: (device, CPU ms, wall-clock p50 ms) of one timed graph: a profile's, or a calibration graph's
WallPoint = tuple[str, float, float]


def _wall_fit(
    points: Sequence[WallPoint], calibrations: Mapping[str, Calibration], span: float, onset: float
) -> tuple[float, dict[str, list[float]]]:
    """The log ratios measured p50 / modelled p50 (from the measured CPU time) by device, and
    their absolute spread around each device's median (what *span* and *onset* should make small)."""
    logs: dict[str, list[float]] = {}
    for dev, cpu, wall in points:
        cal = calibrations[dev]
        model = max(wall_latency(cpu, cal.slowdown, span, onset), cpu + quota_stalls(cpu, cal))
        logs.setdefault(dev, []).append(math.log(wall / model))
    spread = 0.0  # absolute deviations around each device's median: one noisy profile counts once
    for xs in logs.values():
        m = _median(xs)
        spread += sum(abs(x - m) for x in xs) + (abs(m) if len(xs) == 1 else 0.0)
    return spread, logs


def fit(
    observations: Iterable[Observation], calibrations: Mapping[str, Calibration], timed: Sequence[WallPoint] = ()
) -> Predictor:
    """The predictor fitted on *observations* of calibrated devices (others are left out); the
    wall-clock model also on *timed* (the calibration graphs' CPU and wall-clock times)."""
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
    points = [(o.device, o.cpu_ms, o.p50_ms) for o in obs]
    points += [p for p in timed if p[0] in calibrations and p[1] > 0 and p[2] > 0]
    if any(calibrations[p[0]].slowdown > 1.05 for p in points):  # else it cannot be told
        grid = [(s, o) for s in SPANS_MS for o in ONSETS_MS]
        pred.span_ms, pred.onset_ms = min(grid, key=lambda so: _wall_fit(points, calibrations, *so)[0])
    _, wall_logs = _wall_fit(points, calibrations, pred.span_ms, pred.onset_ms)
    all_wall = [x for xs in wall_logs.values() for x in xs]
    pred.gamma0 = math.exp(_median(all_wall))
    pred.gamma = {d: _shrunk(xs, math.log(pred.gamma0)) for d, xs in wall_logs.items()}
    tails = [(o.p95_ms - quota_stall(o.cpu_ms, calibrations[o.device])) / o.p50_ms for o in obs]
    pred.tail = max(1.0, _median(tails))
    return pred


def held_out(
    observations: Sequence[Observation], calibrations: Mapping[str, Calibration], timed: Sequence[WallPoint] = ()
) -> list[tuple[Observation, Estimate]]:
    """Leave-one-out: each observation predicted by the predictor fitted on the others."""
    obs = [o for o in observations if o.device in calibrations]
    out = []
    step = max(1, math.ceil(len(obs) / MAX_HELD_OUT))  # a large fleet: every step-th one
    for i, o in list(enumerate(obs))[::step]:
        p = fit(obs[:i] + obs[i + 1 :], calibrations, timed)
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
    observations: Sequence[Observation], calibrations: Mapping[str, Calibration], timed: Sequence[WallPoint] = ()
) -> tuple[Predictor, dict[str, float | int | None]]:
    """The predictor on every observation, its uncertainty and error report from leave-one-out."""
    pred = fit(observations, calibrations, timed)
    errors = relative_errors(held_out(observations, calibrations, timed)) if len(observations) >= 3 else []
    report = error_report(errors)
    if errors:
        pred.uncertainty = max(MIN_UNCERTAINTY, float(report["rms"] or 0.0))
    return pred, report
