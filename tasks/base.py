"""What every job task shares: one store per process, and the run/retry/fail wrapper."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded

from evc.errors import TRANSIENT_ERRORS, EVCError, JobCancelled
from evc.jobs import JobRun
from evc.settings import Settings, load_settings
from evc.store import JSON, Store

log = logging.getLogger(__name__)

_stores: dict[tuple[int, int], Store] = {}

#: what every job task is declared with (bounded retries, limits, late acks)
TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": 3,
}


def settings_of(task: Task) -> Settings:
    return getattr(task.app, "evc_settings", None) or load_settings()


def store_of(task: Task) -> Store:
    """One Store per (process, app): redis-py reconnects by itself after a fork."""
    key = (os.getpid(), id(task.app))
    st = _stores.get(key)
    if st is None:
        st = _stores[key] = Store.from_settings(settings_of(task))
    return st


def backoff(retries: int, base: float = 1.0, cap: float = 30.0) -> float:
    return float(min(cap, base * (2**retries)))


def run_job(task: Task, job_id: str, body: Callable[[JobRun], JSON | None]) -> str:
    """Run *body* for a job: idempotent on redelivery, retries transient errors, never raises
    anything but Celery's Retry."""
    store = store_of(task)
    run = JobRun.start(store, job_id)
    if run is None:
        return "skipped"
    if run.cancelled():
        run.cancel()
        return "cancelled"
    try:
        summary = body(run)
    except Retry:
        raise
    except JobCancelled:
        run.cancel()
        return "cancelled"
    except TRANSIENT_ERRORS as exc:
        retries = int(task.request.retries or 0)
        if retries < min(task.max_retries or 0, settings_of(task).ssh_retries):
            delay = backoff(retries)
            run.event(f"{exc} — retrying in {delay:.0f}s", type="retry", attempt=retries + 1)
            raise task.retry(exc=exc, countdown=delay) from None
        run.fail(exc)
        return "failed"
    except EVCError as exc:
        run.fail(exc)
        return "failed"
    except SoftTimeLimitExceeded:
        run.fail(EVCError(f"the job ran past its time limit ({task.soft_time_limit or 'default'} s)"))
        return "failed"
    except Exception as exc:  # a bug: record it on the job so nobody waits forever
        log.exception("job %s crashed", job_id)
        run.fail(EVCError(f"internal error: {type(exc).__name__}: {exc}"))
        return "failed"
    if run.cancelled():
        run.cancel(summary or {})
        return "cancelled"
    run.succeed(summary or {})
    return "succeeded"
