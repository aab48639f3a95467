"""Thin Celery tasks of deployments: ``deploy`` and ``deploy-remove`` (:mod:`evc.deployments`)."""

from __future__ import annotations

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of

from evc.deployments import events, service


@shared_task(name="evc.deploy", **TASK_OPTIONS)
def deploy(self, job_id: str) -> str:
    """Ship a model and the edge server to the job's devices and start it (kind ``deploy``)."""
    settings = settings_of(self)
    return run_job(
        self,
        job_id,
        lambda run: events.around_job(
            run.store,
            settings,
            "deploy",
            str(run.params["deployment"]),
            lambda: service.deploy(run.store, settings, run),
        ),  # fmt: skip
    )


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
