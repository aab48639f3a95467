"""What every job task shares: one store per process, and the run/retry/fail wrapper."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded

from evc.errors import TRANSIENT_ERRORS, EVCError, JobCancelled, StaleAttempt, StoreUnavailable
from evc.jobs import JobRun, Partial, remove_temp_files
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


class _Leases:
    """The attempts this process is executing, with a thread that renews their leases. A lease
    that cannot be renewed (another attempt took the job, or it expired while this process
    was stalled) marks its run stale: the run stops at its next check point."""

    def __init__(self) -> None:
        self.active: dict[str, JobRun] = {}
        self.lock = threading.Lock()
        self.pid = 0
        self.ttl = 30.0

    def hold(self, run: JobRun, ttl_s: float) -> None:
        with self.lock:
            self.active[run.id] = run
            self.ttl = ttl_s
            if self.pid != os.getpid():  # first use in this (possibly forked) process
                self.pid = os.getpid()
                threading.Thread(target=self._renew, name="evc-job-leases", daemon=True).start()

    def drop(self, run: JobRun) -> None:
        with self.lock:
            if self.active.get(run.id) is run:
                del self.active[run.id]

    def _renew(self) -> None:
        while True:
            time.sleep(max(0.1, self.ttl / 3))
            with self.lock:
                held = list(self.active.values())
            for run in held:
                try:
                    if run.attempt is not None and not run.store.renew_lease(run.id, run.attempt, self.ttl):
                        log.warning("job %s: attempt %s lost its lease; it stops", run.id, run.attempt)
                        run.stale = True
                except Exception:  # noqa: BLE001 - Redis away for a moment: the next round retries
                    log.debug("could not renew the lease of %s", run.id)


_leases = _Leases()


def run_job(task: Task, job_id: str, body: Callable[[JobRun], JSON | Partial | None]) -> str:
    """Run *body* as a new attempt of a job: skipped when the job is final or a live attempt
    runs it, holds a lease owned by the attempt (so a lost worker's job is re-queued), retries
    transient errors, stops quietly when the attempt turns stale, never raises anything but
    Celery's Retry."""
    store, settings = store_of(task), settings_of(task)
    try:
        what, run = JobRun.begin(store, job_id, settings.job_lease_s, settings.job_max_attempts)
    except StoreUnavailable as exc:
        raise task.retry(exc=exc, countdown=backoff(int(task.request.retries or 0))) from None
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
    _leases.hold(run, settings.job_lease_s)
    try:
        return _run(task, run, job_id, body)
    except StaleAttempt:
        log.warning("job %s: attempt %s is stale; it stops, its writes refused", job_id, run.attempt)
        return "stale"
    finally:
        _leases.drop(run)


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
            delay = backoff(retries)
            try:
                run.requeue(delay, f"{exc} — retrying in {delay:.0f}s", attempt=retries + 1)
            except StoreUnavailable:
                log.warning("job %s: could not record the retry (Redis unavailable)", job_id)
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
