"""The latency predictor (pure): per-operator costs from the graph × the device's calibration,
corrected on the profiles that exist, then the device's CPU quota.

1. CPU time of one inference: ``w = β_device · δ_variant · Σ_i α_i · t_i(device) · x_i(variant, batch)``
   where ``x`` are the graph's cost features (:mod:`evc.recommend.features`), ``t`` the device's
   calibrated cost per unit (:mod:`evc.recommend.calibration`), ``α`` one global correction per
   feature (ridge regression toward 1 on the relative errors of every profile's CPU time), ``β``
   a per-device factor (shrunk toward the fleet's ``β0``: a device with no profile gets it) and
   ``δ`` a per-variant factor: what the features miss of that graph (kernels the runtime fuses,
   pads to its SIMD block or calls per image), learnt from its profiles on other devices (a
   variant never profiled: 1). ``β`` and ``δ`` are one two-way fit of the log ratios.
2. Wall-clock p50 under a CFS quota ``q`` (period ``P``): the group runs ``B = q · P`` CPU ms per
   period, then waits ``P - B``. An inference of ``r = w / B`` budgets waits ``floor(r)`` or one
   more time, the latter when it starts in the last ``frac(r)`` of a budget; back to back, the
   starts fall evenly over the budget, so ``frac(r)`` of the inferences wait once more and the
   quantiles of the profiling runner's ``n`` timed runs follow (:func:`quota_stalls` for the
   p50, :func:`quota_stall` for the p95, checked against a step-by-step simulation in the tests
   and the bench's devices). Without a quota an inference much shorter than a scheduling slice
   mostly runs between stalls (latency ``w``); a long one is slowed by the device's ``S``, the
   wall-clock / CPU time of the long calibration graph: ``p50 = w · (1 + (S - 1) · ramp(w))``
   where ``ramp`` rises from 0 at ``onset`` to 1 at ``onset + span`` (CPU ms), both fitted on the
   profiles and the calibration graphs' own wall-clock and CPU times. A per-device factor ``γ``
   (shrunk toward the fleet's) corrects what this leaves out (other load). The mean is ``w / q``
   under a quota (the group's CPU share), else ``w · S``.
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
#: prior weight (in profiles) of "the features are right" in a variant's factor δ
VARIANT_SHRINK = 0.1
#: the candidate values of :attr:`Predictor.span_ms`
SPANS_MS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 35.0, 60.0, 100.0)
#: the candidate values of :attr:`Predictor.onset_ms`
ONSETS_MS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: the timed inferences of a profile when the profiles do not say (the profiling job's default)
DEFAULT_TIMED = 50
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
    def throttled(self) -> bool:
        """Whether the CFS quota model applies: a quota under one CPU and its period known."""
        return bool(self.quota and self.quota < 1 and self.period_s)

    @property
    def slowdown(self) -> float:
        if self.measured_slowdown:
            return max(1.0, float(self.measured_slowdown))
        return 1.0 / self.quota if self.quota and self.quota < 1 else 1.0

    @property
    def load_slowdown(self) -> float:
        """The slowdown the ramp of :func:`wall_latency` applies: none under a CFS quota, whose
        stalls :func:`quota_stalls` counts (other load is in the device's ``γ``); else the
        measured (or the quota's) slowdown."""
        return 1.0 if self.throttled else self.slowdown

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
    timed: int | None = None


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
    #: per variant (:attr:`Observation.variant`): what the feature model misses of its CPU time
    delta: dict[str, float] = field(default_factory=dict)
    uncertainty: float = DEFAULT_UNCERTAINTY
    profiles: int = 0
    #: how long (CPU ms) an inference must be to be slowed by the device's full slowdown (fitted)
    span_ms: float = 5.0
    #: below this CPU time an inference is not slowed at all (fitted)
    onset_ms: float = 0.0
    #: the fleet's median p95 / p50 of the profiles, quota stalls left out (a predicted p95 is
    #: the p50 without its stalls times it, plus :func:`quota_stall`)
    tail: float = 1.5
    #: how many inferences a profile times (the fleet's median; the quantiles' stalls depend on it)
    timed: int = DEFAULT_TIMED

    def cpu_ms(self, device: str, cal: Calibration, x: Mapping[str, float], variant: str | None = None) -> float:
        z = cal.vector() * np.array(feats.vector(dict(x)))
        return float(z @ self.alpha) * self.beta.get(device, self.beta0) * self.delta.get(variant or "", 1.0)

    def predict(self, device: str, cal: Calibration, x: Mapping[str, float], variant: str | None = None) -> Estimate:
        """The estimate for the graph of features *x* (at its batch) on *device*; *variant* (the
        key of :attr:`Observation.variant`) brings in what that graph's own profiles (on other
        devices) say about its cost."""
        w = self.cpu_ms(device, cal, x, variant)
        g = self.gamma.get(device, self.gamma0)
        p50 = p50_model(w, cal, self.span_ms, self.onset_ms, self.timed) * g
        p95 = ((p50 / g - quota_stalls(w, cal, self.timed)) * self.tail + quota_stall(w, cal, self.timed)) * g
        # back to back under a quota, a run costs its CPU time over the quota on average
        mean = max(p50, w / cal.quota * g if cal.throttled and cal.quota else w * cal.slowdown * g)
        return Estimate(p50, p95, mean, w, self.uncertainty)


def p50_model(
    w_ms: float, cal: Calibration, span_ms: float, onset_ms: float = 0.0, timed: int = DEFAULT_TIMED
) -> float:
    """The p50 wall-clock latency of back-to-back inferences of CPU time *w_ms* on the device of
    *cal* (γ left out): under a CFS quota, the CPU time plus the stalls its median sees
    (:func:`quota_stalls`); else :func:`wall_latency`'s ramp to the device's slowdown."""
    if cal.throttled:
        return w_ms + quota_stalls(w_ms, cal, timed)
    return wall_latency(w_ms, cal.load_slowdown, span_ms, onset_ms)


def wall_latency(w_ms: float, slowdown: float, span_ms: float, onset_ms: float = 0.0) -> float:
    """The p50 wall-clock latency of inferences of CPU time *w_ms* on a device whose long
    inferences run *slowdown* times slower than their CPU time (see the module doc)."""
    if w_ms <= 0:
        return w_ms
    return w_ms * (1 + (slowdown - 1) * min(1.0, max(0.0, w_ms - onset_ms) / span_ms))


def quota_stalls(w_ms: float, cal: Calibration, timed: int = DEFAULT_TIMED) -> float:
    """The CFS stalls in the p50 of *timed* back-to-back inferences of CPU time *w_ms*: a whole
    number of them (the median of an even count between the two modes is a tie that a few
    per cent of CPU time decides: the slower mode, which a throttled device's colder caches favour)."""
    if not cal.throttled or not cal.quota or not cal.period_s:
        return 0.0
    stall = (1.0 - cal.quota) * cal.period_s * 1000.0
    return stall * math.floor(_stalls_at(0.5, w_ms, cal, timed) / stall + 0.5)


def quota_stall(w_ms: float, cal: Calibration, timed: int = DEFAULT_TIMED) -> float:
    """The CFS stalls in the p95 of *timed* back-to-back inferences of CPU time *w_ms*."""
    return _stalls_at(0.95, w_ms, cal, timed)


def _stalls_at(q: float, w_ms: float, cal: Calibration, timed: int) -> float:
    """The CFS stalls in the *q* quantile (interpolated, as the profiling runner's) of *timed*
    back-to-back inferences of CPU time *w_ms* under a quota.

    The group runs ``budget = quota · period`` CPU ms per period, then waits ``period - budget``:
    an inference of ``r = w / budget`` budgets waits ``floor(r)`` or ``floor(r) + 1`` times,
    the latter when it starts in the last ``frac(r)`` of a budget. Back to back, the starts
    advance by ``w`` modulo the budget and so fall evenly over it: about ``K = frac(r) · timed``
    of the inferences (rounded: the likeliest count) wait once more, the slowest ``K`` of them."""
    if not cal.throttled or not cal.quota or not cal.period_s or w_ms <= 0:
        return 0.0
    period = cal.period_s * 1000.0
    budget = cal.quota * period
    r = w_ms / budget
    n = max(1, timed)
    more = round((r - math.floor(r)) * n)
    at = q * (n - 1)  # the quantile's (fractional) index in the sorted times
    return (period - budget) * (math.floor(r) + min(1.0, max(0.0, at - (n - more - 1))))


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def _shrunk(logs: Sequence[float], prior: float) -> float:
    """A device's factor: the median of its log ratios, shrunk toward the fleet's *prior*."""
    n = len(logs)
    return math.exp((n * _median(logs) + SHRINK * prior) / (n + SHRINK))


def _device_and_variant_factors(
    obs: Sequence[Observation], base: np.ndarray, iterations: int = 20
) -> tuple[float, dict[str, float], dict[str, float]]:
    """The fleet's CPU factor ``β0``, each device's ``β`` and each variant's ``δ``: a two-way model
    of the log ratios measured / modelled CPU time (device × variant), by alternating means.

    ``β`` is shrunk toward ``β0`` with ``SHRINK`` profiles of prior weight; ``δ`` toward 1 with
    ``VARIANT_SHRINK``: what the features miss of a graph (fused or blocked kernels, per-call
    costs the calibration graphs do not show) is the graph's, about the same on every device,
    while one profile's noise is a few per cent, so one profile of a variant says much."""
    rows = [(o.device, o.variant, math.log(o.cpu_ms / b)) for o, b in zip(obs, base, strict=True) if b > 0]
    if not rows:
        return 1.0, {}, {}
    b0, dev, var = 0.0, dict[str, float](), dict[str, float]()
    for _ in range(iterations):
        b0 = sum(e - var.get(v, 0.0) for _, v, e in rows) / len(rows)
        dev = _group_means([(d, e - var.get(v, 0.0)) for d, v, e in rows], b0, SHRINK)
        var = _group_means([(v, e - dev[d]) for d, v, e in rows], 0.0, VARIANT_SHRINK)
    return math.exp(b0), {k: math.exp(x) for k, x in dev.items()}, {k: math.exp(x) for k, x in var.items()}


def _group_means(items: Iterable[tuple[str, float]], prior: float, weight: float) -> dict[str, float]:
    """Per key, the mean of its values shrunk toward *prior* with *weight* values' worth."""
    sums: dict[str, list[float]] = {}
    for k, x in items:
        sums.setdefault(k, []).append(x)
    return {k: (sum(xs) + weight * prior) / (len(xs) + weight) for k, xs in sums.items()}


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
    points: Sequence[WallPoint],
    calibrations: Mapping[str, Calibration],
    span: float,
    onset: float,
    timed: int = DEFAULT_TIMED,
) -> tuple[float, dict[str, list[float]]]:
    """The log ratios measured p50 / modelled p50 (from the measured CPU time) by device, and
    their absolute spread around each device's median (what *span* and *onset* should make small)."""
    logs: dict[str, list[float]] = {}
    for dev, cpu, wall in points:
        model = p50_model(cpu, calibrations[dev], span, onset, timed)
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
    counts = [o.timed for o in obs if o.timed]
    pred.timed = int(_median(counts)) if counts else DEFAULT_TIMED
    pred.alpha = _fit_alpha(z, y)
    base = z @ pred.alpha
    pred.beta0, pred.beta, pred.delta = _device_and_variant_factors(obs, base)
    points = [(o.device, o.cpu_ms, o.p50_ms) for o in obs]
    points += [p for p in timed if p[0] in calibrations and p[1] > 0 and p[2] > 0]
    if any(calibrations[p[0]].load_slowdown > 1.05 for p in points):  # else it cannot be told
        grid = [(s, o) for s in SPANS_MS for o in ONSETS_MS]
        pred.span_ms, pred.onset_ms = min(
            grid, key=lambda so: _wall_fit(points, calibrations, so[0], so[1], pred.timed)[0]
        )
    _, wall_logs = _wall_fit(points, calibrations, pred.span_ms, pred.onset_ms, pred.timed)
    all_wall = [x for xs in wall_logs.values() for x in xs]
    pred.gamma0 = math.exp(_median(all_wall))
    pred.gamma = {d: _shrunk(xs, math.log(pred.gamma0)) for d, xs in wall_logs.items()}
    tails = []  # the p95 / p50 of the CPU time and other waits, the quota's stalls left out
    for o in obs:
        cal = calibrations[o.device]
        p50 = o.p50_ms - quota_stalls(o.cpu_ms, cal, o.timed or pred.timed)
        p95 = o.p95_ms - quota_stall(o.cpu_ms, cal, o.timed or pred.timed)
        if p50 > 0 and p95 > 0:
            tails.append(p95 / p50)
    pred.tail = max(1.0, _median(tails)) if tails else pred.tail
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
