"""Thin Celery tasks of collaborative inference: ``infer-joint`` and ``infer-split`` (:mod:`evc.inference`)."""

from __future__ import annotations

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of

from evc.jobs import JobRun
from evc.store import JSON


@shared_task(name="evc.infer_joint", **TASK_OPTIONS)
def infer_joint(self, job_id: str) -> str:
    """The edge's light model, hard examples to the cloud's strong one (kind ``infer-joint``)."""
    from evc.inference import joint

    settings = settings_of(self)

    def body(run: JobRun) -> JSON:
        return joint.run_job(run.store, settings, run)

    return run_job(self, job_id, body)


@shared_task(name="evc.infer_split", **TASK_OPTIONS)
def infer_split(self, job_id: str) -> str:
    """A model cut between device and cloud at the cut EVC picks (kind ``infer-split``)."""
    from evc.inference import split

    settings = settings_of(self)

    def body(run: JobRun) -> JSON:
        return split.run_job(run.store, settings, run)

    return run_job(self, job_id, body)
