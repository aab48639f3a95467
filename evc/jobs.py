"""The one job model: create and enqueue jobs, and the run-time handle tasks use to report."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from evc.errors import Conflict, EVCError, JobCancelled, NotFound, StaleAttempt, ValidationError
from evc.model import (
    ACTIVE_JOB_STATES,
    JOB_STATES,
    JSON,
    TERMINAL_STATES,
    EventType,
    Job,
    JobKindName,
    JobState,
    Queue,
    strings,
)
from evc.store import Store, new_id, now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobKind:
    """How a kind of job is executed: the Celery task name and the queue it goes to."""

    name: str
    task: str
    queue: str
    mutating: bool = True

    def __post_init__(self) -> None:  # plain strings: Celery, kombu and click see no enums
        object.__setattr__(self, "name", str(self.name))
        object.__setattr__(self, "queue", str(self.queue))


#: every kind of asynchronous operation EVC runs; features add theirs here
JOB_KINDS: dict[str, JobKind] = {
    k.name: k
    for k in (
        JobKind(JobKindName.NOOP, "evc.noop", Queue.DEFAULT, mutating=False),
        JobKind(JobKindName.REGISTER, "evc.register_device", Queue.SSH),
        JobKind(JobKindName.IMPORT, "evc.import_devices", Queue.SSH),
        JobKind(JobKindName.FACTS, "evc.refresh_facts", Queue.SSH, mutating=False),
        JobKind(JobKindName.RECONNECT, "evc.reconnect_device", Queue.SSH),
        JobKind(JobKindName.PROVISION, "evc.provision", Queue.ANSIBLE),
        JobKind(JobKindName.HEALTH, "evc.health_sweep", Queue.SSH, mutating=False),
        JobKind(JobKindName.LEVEL, "evc.raise_level", Queue.ANSIBLE),
        JobKind(JobKindName.FL, "evc.fl_start", Queue.FL),
        JobKind(JobKindName.FL_INSTALL, "evc.fl_install", Queue.SSH),
        JobKind(JobKindName.FL_PARTITION, "evc.fl_partition", Queue.SSH),
        JobKind(JobKindName.MODEL_QUANTIZE, "evc.model_quantize", Queue.DEFAULT),
        JobKind(JobKindName.DEPLOY, "evc.deploy", Queue.SSH),
        JobKind(JobKindName.DEPLOY_REMOVE, "evc.deploy_remove", Queue.SSH),
        JobKind(JobKindName.PARALLEL_INFER, "evc.parallel_infer", Queue.DEFAULT, mutating=False),
        JobKind(JobKindName.INFER_JOINT, "evc.infer_joint", Queue.SSH, mutating=False),
        JobKind(JobKindName.INFER_SPLIT, "evc.infer_split", Queue.SSH, mutating=False),
        JobKind(JobKindName.MODEL_PROFILE, "evc.model_profile", Queue.SSH, mutating=False),
        JobKind(JobKindName.DEVICE_CALIBRATE, "evc.device_calibrate", Queue.SSH, mutating=False),
    )
}

QUEUES: tuple[str, ...] = strings(*Queue)


class Sender(Protocol):
    """What the job service needs of Celery: ``Celery.send_task`` (a Celery app, its
    :class:`~evc.queue.JobQueue`, or a test's fake)."""

    def send_task(self, name: str, args: Any = ..., **options: Any) -> Any: ...


def new_job(
    kind: str,
    *,
    params: JSON | None = None,
    targets: list[str] | None = None,
    created_by: str = "",
) -> Job:
    if kind not in JOB_KINDS:
        raise NotFound(f"unknown job kind {kind!r}")
    targets = targets or []
    return {
        "id": new_id("job"),
        "kind": kind,
        "state": JobState.QUEUED,
        "progress": {"done": 0, "total": len(targets) or 1, "percent": 0.0},
        "targets": targets,
        "params": params or {},
        "summary": {},
        "error": None,
        "created_by": created_by,
        "created_at": now(),
        "started_at": None,
        "finished_at": None,
        "cancel_requested": False,
        "attempt": 0,
        "lost": 0,
        "queued_at": None,
        "not_before": None,
    }


def submit(
    store: Store,
    sender: Sender,
    kind: str,
    *,
    params: JSON | None = None,
    targets: list[str] | None = None,
    created_by: str = "",
    idempotency_key: str | None = None,
    countdown: float | None = None,
    pipe: Any = None,
) -> tuple[Job, bool]:
    """Create a job and enqueue its task. Returns (job, created); repeated keys return the first.

    With EVC's Celery apps (their :class:`~evc.queue.JobQueue` has the publisher fast path),
    the job record and its task message are written in one MULTI/EXEC — the worker can never see
    the message without the job — or queued on *pipe*, the caller's unit of work."""
    from evc.queue import JobQueue

    queue = JobQueue.of(sender)
    job = new_job(kind, params=params, targets=targets, created_by=created_by)
    job["queued_at"] = job["created_at"]
    if countdown:
        job["not_before"] = job["created_at"] + countdown
    if idempotency_key:
        idempotency_key = f"{created_by}:{idempotency_key}"
    publish = queue.job_commands(job, countdown=countdown)
    stored, created = store.create_job(job, idempotency_key, publish=publish, pipe=pipe)
    if created and not publish:
        queue.enqueue(stored, countdown=countdown)
    return stored, created


def scoped_key(key: str, scope: str, request: bytes) -> str:
    """An idempotency key for :func:`submit`: *key* within *scope* (e.g. the endpoint), carrying
    a fingerprint of *request* (e.g. the body) that is stored next to it, so that the same key
    with another request is refused rather than answered with an unrelated job."""
    if not 0 < len(key) <= 255 or not key.isprintable():
        raise ValidationError("Idempotency-Key must be 1-255 printable characters", field="Idempotency-Key")
    return f"{scope} {key}\n{hashlib.sha256(request).hexdigest()}"


def enqueue(store: Store, sender: Sender, job: Mapping[str, Any], countdown: float | None = None) -> None:
    """(Re-)enqueue an existing job's task (:meth:`evc.queue.JobQueue.enqueue`)."""
    from evc.queue import JobQueue

    JobQueue.of(sender).enqueue(job, countdown=countdown)


def _record_finished(kind: str, state: str, duration_s: float | None) -> None:
    from evc import metrics

    metrics.record_job_finished(kind, state, duration_s)


def requeue_lost(store: Store, sender: Sender, job_id: str, max_lost: int) -> str:
    """A job whose lease expired (on Redis's clock: its worker died or stalled) goes back to
    the queue, its lost count up by one, or fails with "worker lost N times" once that count
    reaches *max_lost*. Its stale attempt's writes are refused from now on."""
    what, attempt, lost = store.requeue_lost_job(job_id, max_lost)
    if what == "requeued":
        enqueue(store, sender, {**store.get_job(job_id), "attempt": attempt})
    if what == "failed":
        job = store.get_job(job_id)
        _record_finished(job["kind"], JobState.FAILED, None)
        remove_temp_files(job_id)
    return what


def republish_missing(store: Store, sender: Sender, after_s: float) -> int:
    """Re-publish the task of each job queued for more than *after_s* whose message is not in
    its broker queue (lost in a Redis crash after the caller was answered). The task id is the
    job's, so a message that turns up after all only delivers a duplicate that the job's start
    skips. Returns how many were re-published."""
    waiting = store.waiting_jobs(after_s)
    present: dict[str, set[str] | None] = {}
    republished = 0
    for job in waiting:
        kind = JOB_KINDS.get(str(job.get("kind")))
        if kind is None:
            continue
        queue = kind.queue
        if queue not in present:
            present[queue] = store.jobs_in_queue(queue)
        held = present[queue]
        if held is None or job["id"] in held:
            continue
        store.update_job(job["id"], queued_at=now())
        why = "its task message was missing from the broker; re-published"
        store.add_event(job["id"], {"type": EventType.JOB, "state": JobState.QUEUED, "message": why})
        enqueue(store, sender, job)
        republished += 1
    return republished


def get(store: Store, job_id: str) -> Job:
    """The job *job_id* (NotFound when there is none)."""
    return store.get_job(job_id)


def prune(store: Store, retention_s: float) -> int:
    """Delete jobs finished longer than *retention_s* ago; returns how many."""
    return store.prune_jobs(retention_s)


def remove_temp_files(job_id: str) -> int:
    """Remove what a killed execution of *job_id* left in this host's temp dir (its private
    inventories and ansible-runner data, named after the job). Returns how many went."""
    from evc.provisioning.inventory import remove_job_dirs

    return remove_job_dirs(job_id)


def public(job: Job, store: Store | None = None, with_results: bool = True) -> Job:
    """A job as the API shows it."""
    out = job.copy()
    if with_results and store is not None:
        out["results"] = store.results(job["id"])
    return out


def cancel(store: Store, job_id: str, revoke: Any | None = None) -> Job:
    """Ask a job to stop. A queued job is cancelled at once; a running one at its next check."""
    job = store.get_job(job_id)
    if job["state"] in TERMINAL_STATES:
        raise Conflict(f"job {job_id} already {job['state']}", state=job["state"])
    store.update_job(job_id, cancel_requested=True)
    if store.transition_job(job_id, JobState.CANCELLED, [JobState.QUEUED], finished_at=now()):
        _record_finished(job["kind"], JobState.CANCELLED, None)
        store.add_event(
            job_id, {"type": EventType.JOB, "state": JobState.CANCELLED, "message": "cancelled before it started"}
        )
        if revoke is not None:
            revoke(f"{job_id}-{job.get('attempt', 0)}")
    else:
        store.add_event(job_id, {"type": EventType.JOB, "message": "cancel requested"})
    return get(store, job_id)


@dataclass(frozen=True)
class Partial:
    """What a job body returns when only some targets got what was asked: the job ends
    ``partial`` with *summary*; *message* says which fell short (details in the results)."""

    summary: JSON
    message: str


@dataclass
class JobRun:
    """The handle a task body reports through: state, progress, events, per-target results.

    A run begun with :meth:`begin` is one attempt of the job: its writes are fenced (refused
    with :class:`~evc.errors.StaleAttempt` once another attempt took the job over or its lease
    expired); one built directly (``attempt`` None) writes unfenced."""

    store: Store
    job: Job
    done: int = 0
    attempt: int | None = None
    _buffer: list[JSON] = field(default_factory=list)
    stale: bool = False

    @property
    def id(self) -> str:
        return str(self.job["id"])

    @property
    def owner(self) -> str:
        """Who holds this run's locks: (job, attempt)."""
        return self.id if self.attempt is None else f"{self.id}:{self.attempt}"

    @property
    def params(self) -> JSON:
        return dict(self.job.get("params") or {})

    @classmethod
    def start(cls, store: Store, job_id: str) -> JobRun | None:
        """Mark the job running, unfenced (FL jobs: their rounds run in many tasks); None when
        it is already final (a redelivery or a cancel)."""
        if not store.transition_job(job_id, JobState.RUNNING, list(ACTIVE_JOB_STATES), started_at=now()):
            return None
        job = get(store, job_id)
        run = cls(store, job, done=int(job.get("progress", {}).get("done", 0)))
        return run

    @classmethod
    def begin(cls, store: Store, job_id: str, lease_s: float, max_lost: int) -> tuple[str, JobRun | None]:
        """Start a new attempt of the job, with a lease it owns: ``("started", run)``, or
        ``(why not, None)`` — ``busy`` (a live attempt runs it), ``final``, ``lost`` (its
        workers were lost *max_lost* times: it is failed now)."""
        what, attempt, _lost = store.start_job(job_id, lease_s, max_lost)
        if what != "started":
            if what == "lost":
                _record_finished(get(store, job_id)["kind"], JobState.FAILED, None)
            return what, None
        job = get(store, job_id)
        return what, cls(store, job, done=int(job.get("progress", {}).get("done", 0)), attempt=attempt)

    def cancelled(self) -> bool:
        """A cancel was asked for — or this attempt is stale, which must stop just the same."""
        job = self.store.get_job(self.id)
        if self.attempt is not None and (job.get("attempt") != self.attempt or job.get("state") != JobState.RUNNING):
            self.stale = True
        return self.stale or job.get("cancel_requested", False) is True

    def check_cancel(self) -> None:
        if self.cancelled():
            self.check_stale()
            raise JobCancelled("cancelled by request")

    def check_stale(self) -> None:
        """Raise :class:`~evc.errors.StaleAttempt` when another attempt runs the job now."""
        if self.stale:
            raise StaleAttempt(f"attempt {self.attempt} of job {self.id} no longer runs it", job_id=self.id)

    def event(self, message: str = "", **fields: Any) -> int:
        event = {"type": fields.pop("type", EventType.LOG), "message": message, **fields}
        return self.store.add_event(self.id, event, fence=self.attempt)

    def events(self, events: list[JSON]) -> int:
        return self.store.add_events(self.id, events, fence=self.attempt)

    def progress(self, done: int | None = None, total: int | None = None, **extra: Any) -> None:
        if done is not None:
            self.done = done
        total = total if total is not None else int(self.job["progress"].get("total") or 1)
        percent = min(100.0, round(100.0 * self.done / max(total, 1), 1))
        prog = {"done": min(self.done, total), "total": total, "percent": percent, **extra}
        self.job["progress"] = prog
        self.store.update_job(self.id, fence=self.attempt, progress=prog)

    def result(self, target: str, result: JSON, count: bool = True) -> None:
        """Record *target*'s result; it counts towards progress once, however often a retry or a
        redelivery records it again (the latest result wins)."""
        first = self.store.set_result(self.id, target, result, fence=self.attempt)
        if count and first:
            self.progress(self.done + 1)

    def once(self, effect: str) -> bool:
        """Claim the one-time *effect* of this job (for this attempt only while it is current):
        True the first time any attempt claims it, False after."""
        return self.store.claim_job_effect(self.id, effect, self.attempt)

    def requeue(self, delay_s: float, message: str, **fields: Any) -> None:
        """Hand the job back to the queue for a retry in *delay_s* (this attempt ends)."""
        t = now()
        self.store.transition_job(
            self.id, JobState.QUEUED, [JobState.RUNNING], fence=self.attempt, queued_at=t, not_before=t + delay_s,
            event={"type": EventType.RETRY, "message": message, **fields},
        )  # fmt: skip

    def succeed(self, summary: JSON | None = None, message: str = "succeeded") -> bool:
        return self._finish(JobState.SUCCEEDED, summary=summary or {}, message=message)

    def partial(self, summary: JSON, message: str) -> bool:
        """End with some targets short of what was asked (their reasons are in the results)."""
        return self._finish(JobState.PARTIAL, summary=summary, message=message)

    def fail(self, error: EVCError | str, summary: JSON | None = None) -> bool:
        err = error.to_dict() if isinstance(error, EVCError) else {"code": "failed", "message": error}
        return self._finish(JobState.FAILED, summary=summary or {}, error=err, message=err["message"])

    def cancel(self, summary: JSON | None = None) -> bool:
        return self._finish(JobState.CANCELLED, summary=summary or {}, message="cancelled")

    def _finish(self, state: str, message: str, **changes: Any) -> bool:
        finished = now()
        ok = self.store.transition_job(
            self.id, state, list(ACTIVE_JOB_STATES), fence=self.attempt, finished_at=finished,
            event={"type": EventType.JOB, "state": state, "message": message}, **changes,
        )  # fmt: skip
        if ok:
            started = self.job.get("started_at") or self.job.get("created_at")
            _record_finished(self.job["kind"], state, finished - started if started else None)
        return ok


__all__ = [
    "JOB_KINDS", "JOB_STATES", "TERMINAL_STATES", "Job", "JobKind", "JobRun", "JobState", "Partial", "QUEUES",
    "cancel", "enqueue", "get", "submit",
]  # fmt: skip
