"""FL tasks: thin Celery entry points of the round engine (:mod:`evc.fl.orchestrator`).

A round is a chord: a group of ``evc.fl_fit`` (one per device) and ``evc.fl_aggregate`` after
them, which checkpoints the round and starts the next. Every body is idempotent (keyed by job,
round attempt and device) and declared ``acks_late`` + ``reject_on_worker_lost``; a worker that
starts asks ``evc.fl_recover`` to re-dispatch rounds whose tasks died with another worker
(:func:`evc.workers.signals.recover_fl_on_start`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from celery import Celery, chord, shared_task
from evc.tasks.base import TASK_OPTIONS, backoff, run_job, settings_of, store_of

from evc.errors import EVCError, StoreUnavailable
from evc.fl import service
from evc.fl.orchestrator import Rounds
from evc.jobs import JobRun, get
from evc.queue import JobQueue
from evc.store import JSON

log = logging.getLogger(__name__)

T = TypeVar("T")

#: round tasks: late acks on idempotent bodies; a lost one is re-dispatched by recovery
ROUND_OPTIONS: dict[str, Any] = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "max_retries": 3}


class CeleryDispatch:
    """The engine's :class:`~evc.fl.orchestrator.Dispatcher` on a Celery app."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.queue = JobQueue.of(app)

    def fit_round(self, job_id: str, token: str, device_ids: Sequence[str], queue: str) -> None:
        header = [
            self.app.signature("evc.fl_fit", args=(job_id, token, d), queue=queue, ignore_result=False)
            for d in device_ids
        ]
        body = self.app.signature("evc.fl_aggregate", args=(job_id, token), queue=queue, ignore_result=True)
        chord(header, body, app=self.app).apply_async()

    def close_round(self, job_id: str, token: str, queue: str) -> None:
        self.queue.publish("evc.fl_aggregate", [[], job_id, token], queue=queue, ignore_result=True)

    def start_round(self, job_id: str, round: int, queue: str, countdown: float) -> None:
        self.queue.publish("evc.fl_round", [job_id, round], queue=queue, countdown=countdown, ignore_result=True)

    def recover(self, job_id: str | None, countdown: float, queue: str = "fl") -> None:
        self.queue.publish("evc.fl_recover", [job_id], queue=queue, countdown=countdown, ignore_result=True)


def _rounds(task: Any) -> Rounds:
    return Rounds(store_of(task), settings_of(task), CeleryDispatch(task.app))


def _guard(task: Any, job_id: str, body: Callable[[], T]) -> T | str:
    """Run a round step: a store outage is retried; any other error fails the job with it."""
    try:
        return body()
    except StoreUnavailable as exc:
        raise task.retry(exc=exc, countdown=backoff(int(task.request.retries or 0))) from None
    except Exception as exc:  # noqa: BLE001 - the job records it, nobody waits forever
        if not isinstance(exc, EVCError):
            log.exception("FL job %s: round step crashed", job_id)
            exc = EVCError(f"internal error: {type(exc).__name__}: {exc}")
        try:
            rounds = _rounds(task)
            rounds.fail_job(JobRun(rounds.store, get(rounds.store, job_id)), exc)
        except Exception:  # noqa: BLE001
            log.exception("FL job %s: could not record the failure", job_id)
        return "failed"


@shared_task(name="evc.fl_start", **TASK_OPTIONS)
def fl_start(self, job_id: str) -> str:
    """Start or resume an FL job (kind ``fl``) from its latest checkpoint."""
    return str(_guard(self, job_id, lambda: _rounds(self).start(job_id)))


@shared_task(name="evc.fl_fit", ignore_result=False, track_started=False, **ROUND_OPTIONS)
def fl_fit(self, job_id: str, token: str, device_id: str) -> JSON:
    """Train one device for one round; never raises, so its chord always completes."""
    try:
        return _rounds(self).fit(job_id, token, device_id, task_id=str(self.request.id or ""))
    except Exception as exc:  # noqa: BLE001
        log.exception("FL job %s: training task for %s crashed", job_id, device_id)
        return {"device": device_id, "token": token, "status": "error", "error": repr(exc)}


@shared_task(name="evc.fl_aggregate", **ROUND_OPTIONS)
def fl_aggregate(self, results: list[Any], job_id: str, token: str) -> str:
    """Close a round: aggregate, checkpoint, record, start the next (the chord's body)."""
    return str(_guard(self, job_id, lambda: _rounds(self).close(job_id, token)))


@shared_task(name="evc.fl_round", **ROUND_OPTIONS)
def fl_round(self, job_id: str, round: int) -> str:
    """Start a round that waited for devices."""
    return str(_guard(self, job_id, lambda: _rounds(self).start_round(job_id, round)))


@shared_task(name="evc.fl_recover", **ROUND_OPTIONS)
def fl_recover(self, job_id: str | None = None) -> JSON:
    """Re-dispatch FL work lost with a worker (one job, or every active one)."""
    try:
        return _rounds(self).recover(job_id)
    except StoreUnavailable as exc:
        raise self.retry(exc=exc, countdown=backoff(int(self.request.retries or 0))) from None


@shared_task(name="evc.fl_install", **TASK_OPTIONS)
def fl_install(self, job_id: str) -> str:
    """Install the FL client on the job's devices (kind ``fl-install``)."""
    return run_job(self, job_id, lambda run: service.install(run.store, settings_of(self), run))


@shared_task(name="evc.fl_partition", **TASK_OPTIONS)
def fl_partition(self, job_id: str) -> str:
    """Split a dataset into shards and push one to each device (kind ``fl-partition``)."""
    return run_job(self, job_id, lambda run: service.partition(run.store, settings_of(self), run))
