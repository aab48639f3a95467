"""Thin Celery task of inference jobs: ``parallel-infer`` (:mod:`evc.inference.parallel`)."""

from __future__ import annotations

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of

from evc.inference import parallel


@shared_task(name="evc.parallel_infer", **TASK_OPTIONS)
def parallel_infer(self, job_id: str) -> str:
    """Spread a data set over a deployment's devices (kind ``parallel-infer``); its results are
    keyed by item, so a redelivered job runs again and writes the same file."""
    settings = settings_of(self)
    return run_job(self, job_id, lambda run: parallel.run(run.store, settings, run))
