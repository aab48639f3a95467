"""Thin Celery task for the model registry: EVC's own int8 variant (``model-quantize``)."""

from __future__ import annotations

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of

from evc.jobs import JobRun
from evc.store import JSON


@shared_task(name="evc.model_quantize", **TASK_OPTIONS)
def model_quantize(self, job_id: str) -> str:
    from evc.models.quantize import run as body

    settings = settings_of(self)

    def run(run: JobRun) -> JSON:
        return body(run.store, settings, run)

    return run_job(self, job_id, run)
