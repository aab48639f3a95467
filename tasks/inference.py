"""Thin Celery task of inference jobs: ``parallel-infer`` (:mod:`evc.inference.parallel`)."""

from __future__ import annotations

import logging

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of

from evc.inference import parallel

log = logging.getLogger(__name__)


@shared_task(name="evc.parallel_infer", **TASK_OPTIONS)
def parallel_infer(self, job_id: str) -> str:
    """Spread a data set over a deployment's devices (kind ``parallel-infer``); its results are
    keyed by item, so a redelivered job runs again and writes the same file. Progress also goes
    out as ``task-progress`` events (Flower shows the task as PROGRESS with done/total)."""
    settings = settings_of(self)

    def notify(**fields: object) -> None:
        try:
            self.send_event("task-progress", retry=False, **fields)
        except Exception:  # best effort: the job's own progress is what counts
            log.debug("job %s: could not send a task-progress event", job_id, exc_info=True)

    return run_job(self, job_id, lambda run: parallel.run(run.store, settings, run, notify))
