"""What every job task shares: the process's store and settings, and the run/retry/fail wrapper."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded

from evc.errors import TRANSIENT_ERRORS, EVCError, JobCancelled, StaleAttempt, StoreUnavailable
from evc.jobs import JobRun, Partial, remove_temp_files
from evc.queue import JobQueue
from evc.runtime import WorkerRuntime
from evc.settings import Settings
from evc.store import JSON, Store

log = logging.getLogger(__name__)

#: what every job task is declared with (bounded retries, limits, late acks)
TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": 3,
}


def settings_of(task: Task) -> Settings:
    """The settings of the task's app (its :class:`~evc.queue.JobQueue`'s), else the runtime's."""
    settings = JobQueue.of(task.app).settings
    return settings if settings is not None else WorkerRuntime.current().settings


def store_of(task: Task) -> Store:
    """The process's Store for the task's settings (kept by :class:`~evc.runtime.WorkerRuntime`)."""
    return WorkerRuntime.current().store(settings_of(task))


def backoff(retries: int, base: float = 1.0, cap: float = 30.0) -> float:
    return float(min(cap, base * (2**retries)))


def publish_policy(settings: Settings) -> dict[str, float]:
    """How long a retry's publish keeps trying while the broker (Redis) is away: about a job
    lease, after which the job is presumed lost and the reaper re-queues it anyway."""
    return {"max_retries": int(settings.job_lease_s // 2) + 3, "interval_start": 0.2,
            "interval_step": 0.5, "interval_max": 2.0}  # fmt: skip


def record_retry(run: JobRun, delay: float, message: str, attempt: int, wait_s: float) -> None:
    """Record on the job that it is retried; while Redis is away (the outage that may be the
    very error retried), try again until it is back or *wait_s* has passed."""
    deadline, pause = time.monotonic() + wait_s, 0.2
    while True:
        try:
            run.requeue(delay, message, attempt=attempt)
            return
        except StoreUnavailable:
            if time.monotonic() >= deadline:
                log.warning("job %s: could not record the retry (Redis unavailable)", run.id)
                return
            time.sleep(pause)
            pause = min(2.0, pause * 2)


def run_job(task: Task, job_id: str, body: Callable[[JobRun], JSON | Partial | None]) -> str:
    """Run *body* as a new attempt of a job: skipped when the job is final or a live attempt
    runs it, holds a lease owned by the attempt (so a lost worker's job is re-queued), retries
    transient errors, stops quietly when the attempt turns stale, never raises anything but
    Celery's Retry."""
    store, settings = store_of(task), settings_of(task)
    try:
        what, run = JobRun.begin(store, job_id, settings.job_lease_s, settings.job_max_attempts)
    except StoreUnavailable as exc:
        delay = backoff(int(task.request.retries or 0))
        raise task.retry(exc=exc, countdown=delay, retry_policy=publish_policy(settings)) from None
    if run is None:
        if what == "busy" and int(task.request.retries or 0) < int(task.max_retries or 0):
            # a redelivery (e.g. its pool process was killed) while the attempt's lease still
            # runs: look again when it has expired, then this delivery takes the job over
            raise task.retry(countdown=settings.job_lease_s)
        if what == "lost":
            remove_temp_files(job_id)
        return "failed" if what == "lost" else "skipped"
    if int(run.job.get("lost") or 0):
        remove_temp_files(job_id)  # what a killed attempt left on this host
    leases = WorkerRuntime.current().leases
    leases.hold(run, settings.job_lease_s)
    try:
        return _run(task, run, job_id, body)
    except StaleAttempt:
        log.warning("job %s: attempt %s is stale; it stops, its writes refused", job_id, run.attempt)
        return "stale"
    finally:
        leases.drop(run)


def _run(task: Task, run: JobRun, job_id: str, body: Callable[[JobRun], JSON | Partial | None]) -> str:
    if run.cancelled():
        run.check_stale()
        run.cancel()
        return "cancelled"
    try:
        summary = body(run)  # the store raises StoreUnavailable (transient) for a Redis outage
    except (Retry, StaleAttempt):
        raise
    except JobCancelled:
        run.cancel()
        return "cancelled"
    except TRANSIENT_ERRORS as exc:
        retries = int(task.request.retries or 0)
        if retries < min(task.max_retries or 0, settings_of(task).ssh_retries):
            delay, settings = backoff(retries), settings_of(task)
            record_retry(run, delay, f"{exc} — retrying in {delay:.0f}s", retries + 1, settings.job_lease_s)
            raise task.retry(exc=exc, countdown=delay, retry_policy=publish_policy(settings)) from None
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
    if isinstance(summary, Partial):
        if run.cancelled():
            run.cancel(summary.summary)
            return "cancelled"
        run.partial(summary.summary, summary.message)
        return "partial"
    if run.cancelled():
        run.check_stale()
        run.cancel(summary or {})
        return "cancelled"
    run.succeed(summary or {})
    return "succeeded"
