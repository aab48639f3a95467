"""Global-model checkpoints per (job, round): atomic ``.npz`` files under a data directory.

Layout: ``<directory>/<job_id>/round-<00000r>.npz`` holding the parameters (``p_0 .. p_{n-1}``),
the strategy's server state (``s_<name>``) and a small JSON metadata string (``meta``).  Round 0
is the initial model.  Writes go to a temp file in the same directory, are fsynced and renamed
into place, so a reader never sees a half-written checkpoint and a crashed writer leaves none.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evc.errors import NotFound, ValidationError

__all__ = [
    "Checkpoint",
    "checkpoint_path",
    "latest_round",
    "list_rounds",
    "load_checkpoint",
    "save_checkpoint",
]

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FILE = re.compile(r"^round-(\d{6})\.npz$")


@dataclass(frozen=True)
class Checkpoint:
    """One saved round: global parameters, server-optimiser state and metadata."""

    job_id: str
    round: int
    params: list[np.ndarray]
    state: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _job_dir(directory: str | os.PathLike[str], job_id: str) -> Path:
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id) or job_id in (".", ".."):
        raise ValidationError(f"invalid job id for a checkpoint: {job_id!r}", job_id=job_id)
    return Path(directory) / job_id


def checkpoint_path(directory: str | os.PathLike[str], job_id: str, round: int) -> Path:
    """Where round ``round`` of ``job_id`` is (or would be) stored."""
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round <= 999_999:
        raise ValidationError(f"checkpoint round must be an integer in [0, 999999], got {round!r}")
    return _job_dir(directory, job_id) / f"round-{round:06d}.npz"


def save_checkpoint(
    directory: str | os.PathLike[str],
    job_id: str,
    round: int,
    params: Sequence[np.ndarray],
    *,
    state: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write (or replace) the checkpoint of ``round``; returns its path.

    ``metadata`` must be JSON-serialisable; ``state`` keys must be valid identifiers-ish names.
    """
    target = checkpoint_path(directory, job_id, round)
    arrays: dict[str, np.ndarray] = {f"p_{i}": np.asarray(p) for i, p in enumerate(params)}
    for name, value in (state or {}).items():
        arrays[f"s_{name}"] = np.asarray(value)
    try:
        arrays["meta"] = np.asarray(json.dumps(dict(metadata or {}), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"checkpoint metadata is not JSON-serialisable: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def list_rounds(directory: str | os.PathLike[str], job_id: str) -> list[int]:
    """Rounds with a checkpoint, ascending (empty when the job has none)."""
    job_dir = _job_dir(directory, job_id)
    if not job_dir.is_dir():
        return []
    rounds = []
    for entry in job_dir.iterdir():
        match = _FILE.match(entry.name)
        if match:
            rounds.append(int(match.group(1)))
    return sorted(rounds)


def latest_round(directory: str | os.PathLike[str], job_id: str) -> int | None:
    """The highest checkpointed round, or ``None``."""
    rounds = list_rounds(directory, job_id)
    return rounds[-1] if rounds else None


def load_checkpoint(directory: str | os.PathLike[str], job_id: str, round: int | None = None) -> Checkpoint:
    """Load round ``round`` (default: the latest); raises :class:`NotFound` when absent."""
    if round is None:
        round = latest_round(directory, job_id)
        if round is None:
            raise NotFound(f"job {job_id} has no checkpoint", job_id=job_id)
    path = checkpoint_path(directory, job_id, round)
    if not path.is_file():
        raise NotFound(f"job {job_id} has no checkpoint for round {round}", job_id=job_id)
    with np.load(path, allow_pickle=False) as z:
        count = sum(1 for k in z.files if k.startswith("p_"))
        params = [z[f"p_{i}"] for i in range(count)]
        state = {k[2:]: z[k] for k in z.files if k.startswith("s_")}
        metadata = json.loads(str(z["meta"])) if "meta" in z.files else {}
    return Checkpoint(job_id, round, params, state, metadata, path)
