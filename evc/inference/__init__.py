"""Inference across a cluster, on deployments (:mod:`evc.deployments`).

``POST /api/v1/inference/jobs`` takes a ``kind``; :data:`KINDS` maps each kind to the function
that checks the request and enqueues its job (``submit(ctx, data) -> Job``). ``parallel``
(:mod:`evc.inference.parallel`) spreads a data set over a deployment's devices; collaborative
kinds (edge + cloud) add themselves here. ``routing`` serves one request through the least
loaded device of a deployment (``POST /api/v1/deployments/{id}/infer``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from evc.context import Context
from evc.errors import ValidationError
from evc.model import Job

Submit = Callable[[Context, Mapping[str, Any]], Job]


def _parallel(ctx: Context, data: Mapping[str, Any]) -> Job:
    from evc.inference import parallel

    return parallel.submit(ctx, data)


#: kind -> its submit function; a new kind adds itself here (and its request schema to the API's
#: ``JOB_SCHEMAS``)
KINDS: dict[str, Submit] = {"parallel": _parallel}


def submit(ctx: Context, data: Mapping[str, Any]) -> Job:
    """Enqueue an inference job of ``data["kind"]``."""
    kind = str(data.get("kind"))
    if kind not in KINDS:
        raise ValidationError(f"kind must be one of {sorted(KINDS)}", field="kind")
    return KINDS[kind](ctx, data)


__all__ = ["KINDS", "Submit", "submit"]
