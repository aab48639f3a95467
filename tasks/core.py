"""Core job tasks: the no-op job, device registration and fact refresh."""

from __future__ import annotations

import asyncio

from celery import shared_task

from evc.jobs import JobRun
from evc.store import JSON
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of


@shared_task(name="evc.noop", **TASK_OPTIONS)
def noop(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    """A job that does nothing: measures the pipeline, proves a worker is alive."""
    return run_job(self, job_id, lambda run: {"noop": True})


@shared_task(name="evc.register_device", **TASK_OPTIONS)
def register_device(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    from evc.registration import register

    def body(run: JobRun) -> JSON:
        return asyncio.run(register(run.store, settings_of(self), run))

    return run_job(self, job_id, body)


@shared_task(name="evc.refresh_facts", **TASK_OPTIONS)
def refresh_facts(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    from evc.registration import refresh_facts as refresh

    def body(run: JobRun) -> JSON:
        return asyncio.run(refresh(run.store, settings_of(self), run))

    return run_job(self, job_id, body)
