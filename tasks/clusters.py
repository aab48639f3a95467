"""Thin Celery task for the level job (raising cluster members through function levels)."""

from __future__ import annotations

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of

from evc.jobs import JobRun, Partial
from evc.store import JSON


@shared_task(name="evc.raise_level", **TASK_OPTIONS)
def raise_level(self, job_id: str) -> str:
    from evc.levels import raise_level as body
    from evc.provisioning.service import step_runner

    settings = settings_of(self)

    def run(run: JobRun) -> JSON | Partial:
        return body(run.store, settings, run, step_runner(run.store, settings))

    return run_job(self, job_id, run)
