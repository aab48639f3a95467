"""Core job tasks: the no-op job, device registration and fact refresh."""

from __future__ import annotations

import asyncio
import time

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of, store_of

from evc.errors import EVCError
from evc.jobs import JobRun
from evc.store import JSON


@shared_task(name="evc.noop", **TASK_OPTIONS)
def noop(self, job_id: str) -> str:
    """A job that does nothing (optionally for ``sleep_s``): measures the pipeline, proves a
    worker is alive; its one effect, counted once per job, lets tests see exactly-once."""

    def body(run: JobRun) -> JSON:
        sleep_s = float(run.params.get("sleep_s") or 0)
        deadline = time.monotonic() + sleep_s
        while time.monotonic() < deadline:
            run.check_cancel()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if sleep_s and run.once("noop"):  # refused to a stale attempt: one effect per job
            run.store.incr("noop-effects")
        return {"noop": True}

    return run_job(self, job_id, body)


@shared_task(name="evc.reap_jobs", bind=True, max_retries=0)
def reap_jobs(self) -> JSON:
    """Re-queue jobs whose worker died or stalled mid-run (their lease expired on Redis's
    clock), and re-publish queued jobs whose task message is missing from the broker. Beat
    runs this often; every worker also runs it when it starts."""
    from evc.jobs import republish_missing, requeue_lost

    store, settings = store_of(self), settings_of(self)
    out: dict[str, int] = {}
    for job_id in store.expired_leases():
        try:
            what = requeue_lost(store, self.app, job_id, settings.job_max_attempts)
        except EVCError:
            store.release_lease(job_id)
            what = "gone"
        out[what] = out.get(what, 0) + 1
    republished = republish_missing(store, self.app, settings.job_republish_after_s)
    if republished:
        out["republished"] = republished
    return out


@shared_task(name="evc.prune_jobs", bind=True, max_retries=0)
def prune_jobs(self) -> JSON:
    """Delete finished jobs older than the retention (with their events, results, FL records
    and index entries). Beat runs this."""
    from evc.jobs import prune

    store, settings = store_of(self), settings_of(self)
    return {"deleted": prune(store, settings.job_retention_s)}


@shared_task(name="evc.register_device", **TASK_OPTIONS)
def register_device(self, job_id: str) -> str:
    from evc.registration import register

    def body(run: JobRun) -> JSON:
        return asyncio.run(register(run.store, settings_of(self), run))

    return run_job(self, job_id, body)


@shared_task(name="evc.import_devices", **TASK_OPTIONS)
def import_devices(self, job_id: str) -> str:
    """A fleet import's batch registration: every device probed, each one's outcome recorded."""
    from evc.registration import register_all

    def body(run: JobRun) -> JSON:
        return asyncio.run(register_all(run.store, settings_of(self), run))

    return run_job(self, job_id, body)


@shared_task(name="evc.refresh_facts", **TASK_OPTIONS)
def refresh_facts(self, job_id: str) -> str:
    from evc.registration import refresh_facts as refresh

    def body(run: JobRun) -> JSON:
        return asyncio.run(refresh(run.store, settings_of(self), run))

    return run_job(self, job_id, body)


@shared_task(name="evc.reconnect_device", **TASK_OPTIONS)
def reconnect_device(self, job_id: str) -> str:
    """Probe a device at its new connection details; they replace the old ones only if it answers."""
    from evc.connections import reconnect

    def body(run: JobRun) -> JSON:
        return asyncio.run(reconnect(run.store, settings_of(self), run))

    return run_job(self, job_id, body)
