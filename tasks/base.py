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

from evc.errors import TRANSIENT_ERRORS, EVCError, JobCancelled
from evc.jobs import JobRun, Partial
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
    """The jobs this process is executing, with a thread that renews their leases."""

    def __init__(self) -> None:
        self.active: dict[str, Store] = {}
        self.lock = threading.Lock()
        self.pid = 0
        self.ttl = 30.0

    def hold(self, store: Store, job_id: str, ttl_s: float) -> None:
        store.lease_jobs([job_id], ttl_s)
        with self.lock:
            self.active[job_id] = store
            self.ttl = ttl_s
            if self.pid != os.getpid():  # first use in this (possibly forked) process
                self.pid = os.getpid()
                threading.Thread(target=self._renew, name="evc-job-leases", daemon=True).start()

    def drop(self, store: Store, job_id: str) -> None:
        with self.lock:
            self.active.pop(job_id, None)
        store.release_lease(job_id)

    def _renew(self) -> None:
        while True:
            time.sleep(max(0.2, self.ttl / 3))
            with self.lock:
                held = list(self.active.items())
            for job_id, store in held:
                try:
                    store.lease_jobs([job_id], self.ttl)
                except Exception:  # noqa: BLE001 - Redis away for a moment: the next round retries
                    log.debug("could not renew the lease of %s", job_id)


_leases = _Leases()


def run_job(task: Task, job_id: str, body: Callable[[JobRun], JSON | Partial | None]) -> str:
    """Run *body* for a job: idempotent on redelivery, retries transient errors, holds a lease
    while it runs (so a killed worker's job is re-queued), never raises anything but Celery's
    Retry."""
    store = store_of(task)
    run = JobRun.start(store, job_id)
    if run is None:
        return "skipped"
    _leases.hold(store, job_id, settings_of(task).job_lease_s)
    try:
        return _run(task, run, job_id, body)
    finally:
        _leases.drop(store, job_id)


def _run(task: Task, run: JobRun, job_id: str, body: Callable[[JobRun], JSON | Partial | None]) -> str:
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
    if isinstance(summary, Partial):
        if run.cancelled():
            run.cancel(summary.summary)
            return "cancelled"
        run.partial(summary.summary, summary.message)
        return "partial"
    if run.cancelled():
        run.cancel(summary or {})
        return "cancelled"
    run.succeed(summary or {})
    return "succeeded"
