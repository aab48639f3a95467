"""FL data: the reference digits task, IID and label-Dirichlet partitions, ``.npz`` shards.

See ``shared/reference/FEDERATED.md``.  A shard is an uncompressed ``.npz`` holding ``X``
(float64, ``(n, d)``) and ``y`` (int64, ``(n,)``), the format ``client.py --data`` reads.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evc.errors import ConfigError, ValidationError

__all__ = [
    "Dataset",
    "load_reference_digits",
    "load_shard",
    "partition_dirichlet",
    "partition_iid",
    "save_shard",
    "write_shards",
]


@dataclass(frozen=True)
class Dataset:
    """A train/test split (features float64, labels int64)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


#: the digits data (UCI "Optical Recognition of Handwritten Digits", CC BY 4.0, as scikit-learn
#: ships it) with the reference split's row indices: EVC needs no scikit-learn to partition it
DIGITS_PATH = Path(__file__).with_name("digits.npz")


def load_reference_digits() -> Dataset:
    """scikit-learn's digits, ``/16``, split 80/20 stratified with ``random_state=42``.

    Read from :data:`DIGITS_PATH`, shipped with EVC (images, labels and that split's row
    indices, the very rows ``train_test_split`` picks), so the controller needs no extra package.
    """
    try:
        with np.load(DIGITS_PATH, allow_pickle=False) as z:
            X = z["images"].astype(np.float64) / 16.0
            y = z["labels"].astype(np.int64)
            train, test = z["train"].astype(np.intp), z["test"].astype(np.intp)
    except (OSError, KeyError) as exc:  # pragma: no cover - a broken installation
        raise ConfigError(f"the digits data set {DIGITS_PATH} is missing or damaged: {exc}") from exc
    return Dataset(X[train], y[train], X[test], y[test])


def _check_clients(num_clients: int, n: int) -> None:
    if num_clients < 1:
        raise ValidationError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValidationError(f"cannot split {n} samples across {num_clients} clients")


def partition_iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """``np.array_split(default_rng(seed).permutation(n), num_clients)``: index arrays."""
    _check_clients(num_clients, n)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.asarray(p) for p in np.array_split(perm, num_clients)]


def partition_dirichlet(
    y: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 10,
    max_draws: int = 1000,
) -> list[np.ndarray]:
    """Label-Dirichlet split: index arrays, one per client, in the reference's order.

    One ``rng = default_rng(seed)`` for everything.  For each class ``c`` in ascending order:
    shuffle its indices, draw ``p ~ Dirichlet([alpha] * num_clients)``, cut at
    ``(cumsum(p) * len(idx)).astype(int)[:-1]``, and client ``k`` appends chunk ``k``.  The whole
    draw repeats (same rng) while any client has fewer than ``min_size`` samples; after
    ``max_draws`` tries :class:`ValidationError` is raised.
    """
    y = np.asarray(y)
    _check_clients(num_clients, len(y))
    if not alpha > 0:
        raise ValidationError(f"alpha must be > 0, got {alpha}")
    if min_size * num_clients > len(y):
        raise ValidationError(f"{len(y)} samples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    classes = range(int(y.max()) + 1)  # every label 0..max, as the reference does
    for _ in range(max_draws):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.where(y == c)[0]
            rng.shuffle(idx)
            p = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.concatenate(chunks).astype(np.int64) for chunks in parts]
        if min(len(o) for o in out) >= min_size:
            return out
    raise ValidationError(
        f"no Dirichlet(alpha={alpha}) split gave every client {min_size} samples in {max_draws} draws"
    )


def save_shard(path: str | os.PathLike[str], X: np.ndarray, y: np.ndarray) -> Path:
    """Write a shard atomically (temp file + rename); returns the path."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValidationError(f"shard needs X (n, d) and y (n,), got {X.shape} and {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValidationError(f"shard labels must be integers, got {y.dtype}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, X=X, y=y.astype(np.int64))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_shard(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a shard: ``(X, y)``; raises :class:`ValidationError` when X or y is missing."""
    with np.load(path, allow_pickle=False) as z:
        if "X" not in z.files or "y" not in z.files:
            raise ValidationError(f"{path} must hold arrays X and y, has {z.files}")
        return z["X"], z["y"]


def write_shards(
    directory: str | os.PathLike[str],
    X: np.ndarray,
    y: np.ndarray,
    parts: Sequence[np.ndarray],
    *,
    prefix: str = "shard",
) -> list[Path]:
    """Write ``<prefix>-<k>.npz`` for each index array in ``parts``; returns the paths."""
    return [save_shard(Path(directory) / f"{prefix}-{k}.npz", X[idx], y[idx]) for k, idx in enumerate(parts)]
