"""Thin Celery tasks of model recommendation: ``model-profile`` and ``device-calibrate``
(:mod:`evc.recommend.service`)."""

from __future__ import annotations

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of

from evc.recommend import service


@shared_task(name="evc.model_profile", **TASK_OPTIONS)
def model_profile(self, job_id: str) -> str:
    """Run a model's variants on the job's devices and store their profiles."""
    settings = settings_of(self)
    return run_job(self, job_id, lambda run: service.profile_job(run.store, settings, run))


@shared_task(name="evc.device_calibrate", **TASK_OPTIONS)
def device_calibrate(self, job_id: str) -> str:
    """Run the calibration micro-benchmark on the job's devices and store their coefficients."""
    settings = settings_of(self)
    return run_job(self, job_id, lambda run: service.calibrate_job(run.store, settings, run))
