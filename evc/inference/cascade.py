"""Joint (cascade) inference, the pure part: how confident the edge model is (pluggable scores,
Sedna's "hard example mining"), which items go to the cloud, the accuracy/offload curve, and the
threshold tuned on a labelled calibration set for a target accuracy or offload fraction.

Everything here is numpy over arrays: ``probs`` (N, classes), correctness masks (N,) — no I/O.
An item is *offloaded* when its confidence is strictly below the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from evc.errors import ValidationError

Score = Callable[[np.ndarray], np.ndarray]


def max_prob(probs: np.ndarray) -> np.ndarray:
    """The top class's probability."""
    return np.asarray(probs.max(axis=1), np.float64)


def margin(probs: np.ndarray) -> np.ndarray:
    """The top class's probability minus the runner-up's."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return np.asarray(top2[:, 1] - top2[:, 0], np.float64)


def entropy(probs: np.ndarray) -> np.ndarray:
    """1 − the normalised entropy of the distribution (1: certain, 0: uniform)."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    h = -(p * np.log(p)).sum(axis=1)
    return np.asarray(1.0 - h / math.log(probs.shape[1]), np.float64)


#: the confidence scores a joint job may use (higher: more confident)
SCORES: dict[str, Score] = {"max-prob": max_prob, "margin": margin, "entropy": entropy}


def confidence(probs: np.ndarray, score: str) -> np.ndarray:
    """Each item's confidence under *score* (one of :data:`SCORES`)."""
    if score not in SCORES:
        raise ValidationError(f"score must be one of {sorted(SCORES)}", field="score")
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValidationError(f"the edge model must output (N, classes) probabilities, got shape {p.shape}")
    return SCORES[score](p)


def offloaded(conf: np.ndarray, threshold: float) -> np.ndarray:
    """The items sent to the cloud: confidence below *threshold*."""
    return np.asarray(conf < threshold)


@dataclass(frozen=True)
class Curve:
    """The cascade's accuracy for every distinct threshold: ``offload[i]`` of the items go to
    the cloud with ``threshold[i]`` and the cascade is right on ``accuracy[i]`` of them."""

    threshold: np.ndarray
    offload: np.ndarray
    accuracy: np.ndarray


def curve(conf: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray) -> Curve:
    """The accuracy/offload curve: offloading the k least confident items, for each k a
    threshold can select (ties go together)."""
    n = len(conf)
    if n == 0 or len(edge_correct) != n or len(cloud_correct) != n:
        raise ValidationError("the calibration set is empty or its arrays differ in length")
    order = np.argsort(conf, kind="stable")
    c = conf[order]
    cloud_cum = np.concatenate([[0], np.cumsum(cloud_correct[order])])
    edge_rest = np.concatenate([np.cumsum(edge_correct[order][::-1])[::-1], [0]])
    ks = np.array([0, *[k for k in range(1, n) if c[k - 1] < c[k]], n])
    thresholds = np.array([c[k] if k < n else np.inf for k in ks], np.float64)
    acc = (cloud_cum[ks] + edge_rest[ks]) / n
    return Curve(thresholds, ks / n, acc.astype(np.float64))


@dataclass(frozen=True)
class Tuning:
    """A tuned threshold and what it does on the calibration set."""

    threshold: float
    accuracy: float
    offload: float
    reached: bool

    def to_json(self) -> dict[str, float | bool | None]:
        t = self.threshold
        return {"threshold": t if math.isfinite(t) else None, "accuracy": self.accuracy,
                "offload": self.offload, "reached": self.reached}  # fmt: skip


def tune(cv: Curve, target_accuracy: float | None = None, target_offload: float | None = None) -> Tuning:
    """The threshold for a target: the least offload that reaches *target_accuracy* (within
    *target_offload* when both are given), or the best accuracy within *target_offload*.
    ``reached`` is False when no threshold meets the targets (the best one is returned)."""
    if target_accuracy is None and target_offload is None:
        raise ValidationError("give a threshold, a target accuracy or a target offload", field="threshold")
    allowed = np.ones(len(cv.offload), bool) if target_offload is None else cv.offload <= target_offload + 1e-12
    idx = np.flatnonzero(allowed)  # never empty: offload 0 is always allowed
    if target_accuracy is not None:
        good = idx[cv.accuracy[idx] >= target_accuracy - 1e-12]
        if len(good):
            i = int(good[0])
            return Tuning(float(cv.threshold[i]), float(cv.accuracy[i]), float(cv.offload[i]), True)
    i = int(idx[np.argmax(cv.accuracy[idx])])  # first maximum: the least offload
    return Tuning(float(cv.threshold[i]), float(cv.accuracy[i]), float(cv.offload[i]), target_accuracy is None)


__all__ = ["SCORES", "Curve", "Tuning", "confidence", "curve", "entropy", "margin", "max_prob", "offloaded", "tune"]
