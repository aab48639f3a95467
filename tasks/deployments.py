"""Thin Celery tasks of deployments: ``deploy`` and ``deploy-remove`` (:mod:`evc.deployments`)."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of

from evc.deployments import converge, events, service
from evc.jobs import JobRun

#: how often a re-convergence waiting for another job looks again (seconds)
WAIT_POLL_S = 2.0


def _wait_for_blocker(task: Any, run: JobRun) -> None:
    """A re-convergence that follows another job (a level job, a rollout) goes back to the queue
    until that job has ended (bounded: :data:`evc.deployments.converge.WAIT_S`)."""
    job_id = converge.blocker(run.store, run)
    if job_id:
        run.requeue(WAIT_POLL_S, f"waiting for job {job_id}", waiting_for=job_id)
        raise task.retry(countdown=WAIT_POLL_S, max_retries=int(converge.WAIT_S / WAIT_POLL_S) + 10)


@shared_task(name="evc.deploy", **TASK_OPTIONS)
def deploy(self, job_id: str) -> str:
    """Ship a model and the edge server to the job's devices and start it (kind ``deploy``)."""
    settings = settings_of(self)

    def body(run: JobRun) -> Any:
        _wait_for_blocker(self, run)
        return events.around_job(
            run.store, settings, "deploy", str(run.params["deployment"]),
            lambda: service.deploy(run.store, settings, run),
        )  # fmt: skip

    return run_job(self, job_id, body)


@shared_task(name="evc.deploy_remove", **TASK_OPTIONS)
def deploy_remove(self, job_id: str) -> str:
    """Stop a deployment's servers and remove their folders (kind ``deploy-remove``)."""
    settings = settings_of(self)
    return run_job(
        self,
        job_id,
        lambda run: events.around_job(
            run.store,
            settings,
            "deploy-remove",
            str(run.params["deployment"]),
            lambda: service.remove_job(run.store, settings, run),
        ),  # fmt: skip
    )
