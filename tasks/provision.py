"""The provision task: run a catalogued playbook on a job's devices (queue ``ansible``)."""

from __future__ import annotations

from celery import Task, shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of

from evc.jobs import JobRun
from evc.store import JSON


@shared_task(name="evc.provision", **TASK_OPTIONS)
def provision(self: Task, job_id: str) -> str:
    """Load the job, hand it to :func:`evc.provisioning.service.provision`, record the end."""
    from evc.provisioning.service import provision as run_provision

    def body(run: JobRun) -> JSON:
        return run_provision(run.store, settings_of(self), run)

    return run_job(self, job_id, body)
