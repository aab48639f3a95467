"""What a service call runs with: the store, the settings, the job queue, who is calling and the
request's idempotency key, passed as one explicit :class:`Context`.

The API builds one per request (:func:`evc.api.deps.context`), a Celery task one per job or tick
(e.g. the health sweep's, acting as ``evc:health``); services that enqueue jobs or record who
asked take it first. Functions that only read or write the store keep taking the store, and job
bodies keep (store, settings, run): the run carries the job."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from evc import jobs
from evc.model import JSON, Job
from evc.settings import Settings
from evc.store import Store


@dataclass(frozen=True)
class Caller:
    """Who asked: *actor* is recorded as ``created_by`` (``operator:ci``, ``evc:health``);
    *scopes* are an operator token's scopes (empty for devices and EVC itself)."""

    actor: str
    scopes: frozenset[str] = field(default_factory=frozenset)


#: EVC itself, when no person or device asked (beat ticks, tests, benchmarks)
SYSTEM = Caller("")


class _NoQueue:
    """The queue of a context that must not enqueue (e.g. the CLI's token bootstrap)."""

    def send_task(self, name: str, args: Any = None, **options: Any) -> Any:
        raise RuntimeError(f"this context has no job queue; cannot send {name}")


NO_QUEUE: jobs.Sender = _NoQueue()


@dataclass(frozen=True)
class Context:
    """One service call's surroundings. *queue* is anything with ``send_task`` (the Celery app
    or EVC's job queue); *idempotency_key* is the request's scoped key (:func:`jobs.scoped_key`)."""

    store: Store
    settings: Settings
    queue: jobs.Sender = NO_QUEUE
    caller: Caller = SYSTEM
    idempotency_key: str | None = None

    @property
    def actor(self) -> str:
        """What jobs and records this context creates say in ``created_by``."""
        return self.caller.actor

    def with_key(self, key: str | None) -> Context:
        """The same context with another idempotency key (None: none)."""
        return dataclasses.replace(self, idempotency_key=key)

    def acting_as(self, actor: str) -> Context:
        """The same context on behalf of *actor* (EVC's own follow-up work, e.g. ``evc:health``)."""
        return dataclasses.replace(self, caller=Caller(actor))

    def submit(
        self,
        kind: str,
        *,
        params: JSON | None = None,
        targets: list[str] | None = None,
        countdown: float | None = None,
        pipe: Any = None,
    ) -> tuple[Job, bool]:
        """:func:`jobs.submit` a job of *kind* created by this caller under this context's key."""
        return jobs.submit(
            self.store, self.queue, kind, params=params, targets=targets, created_by=self.actor,
            idempotency_key=self.idempotency_key, countdown=countdown, pipe=pipe,
        )  # fmt: skip


__all__ = ["NO_QUEUE", "SYSTEM", "Caller", "Context"]
