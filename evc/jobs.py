"""The one job model: create and enqueue jobs, and the run-time handle tasks use to report."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from evc.errors import Conflict, EVCError, JobCancelled, NotFound, ValidationError
from evc.store import JOB_STATES, JSON, TERMINAL_STATES, Store, new_id, now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobKind:
    """How a kind of job is executed: the Celery task name and the queue it goes to."""

    name: str
    task: str
    queue: str
    mutating: bool = True


#: every kind of asynchronous operation EVC runs; features add theirs here
JOB_KINDS: dict[str, JobKind] = {
    k.name: k
    for k in (
        JobKind("noop", "evc.noop", "default", mutating=False),
        JobKind("register", "evc.register_device", "ssh"),
        JobKind("import", "evc.import_devices", "ssh"),
        JobKind("facts", "evc.refresh_facts", "ssh", mutating=False),
        JobKind("reconnect", "evc.reconnect_device", "ssh"),
        JobKind("provision", "evc.provision", "ansible"),
        JobKind("health", "evc.health_sweep", "ssh", mutating=False),
        JobKind("level", "evc.raise_level", "ansible"),
        JobKind("fl", "evc.fl_start", "fl"),
        JobKind("fl-install", "evc.fl_install", "ssh"),
        JobKind("fl-partition", "evc.fl_partition", "ssh"),
    )
}

QUEUES = ("default", "ssh", "ansible", "fl")


class Sender(Protocol):
    """What the job service needs of Celery: ``Celery.send_task``."""

    def send_task(self, name: str, args: Any = ..., **options: Any) -> Any: ...


def new_job(
    kind: str,
    *,
    params: JSON | None = None,
    targets: list[str] | None = None,
    created_by: str = "",
) -> JSON:
    if kind not in JOB_KINDS:
        raise NotFound(f"unknown job kind {kind!r}")
    targets = targets or []
    return {
        "id": new_id("job"),
        "kind": kind,
        "state": "queued",
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
) -> tuple[JSON, bool]:
    """Create a job and enqueue its task. Returns (job, created); repeated keys return the first.

    With a sender that has a task publisher (EVC's Celery apps do), the job record and its task
    message are written in one MULTI/EXEC — the worker can never see the message without the job
    — or queued on *pipe*, the caller's unit of work."""
    job = new_job(kind, params=params, targets=targets, created_by=created_by)
    if idempotency_key:
        idempotency_key = f"{created_by}:{idempotency_key}"
    publisher = getattr(sender, "evc_publisher", None)
    publish = publisher.commands(*_task_of(job), countdown=countdown) if publisher else ()
    job, created = store.create_job(job, idempotency_key, publish=publish, pipe=pipe)
    if created and publisher is None:
        enqueue(store, sender, job, countdown=countdown)
    return job, created


def scoped_key(key: str, scope: str, request: bytes) -> str:
    """An idempotency key for :func:`submit`: *key* within *scope* (e.g. the endpoint), carrying
    a fingerprint of *request* (e.g. the body) that is stored next to it, so that the same key
    with another request is refused rather than answered with an unrelated job."""
    if not 0 < len(key) <= 255 or not key.isprintable():
        raise ValidationError("Idempotency-Key must be 1-255 printable characters", field="Idempotency-Key")
    return f"{scope} {key}\n{hashlib.sha256(request).hexdigest()}"


def _task_of(job: JSON) -> tuple[str, str, list[Any], str]:
    jk = JOB_KINDS[job["kind"]]
    return jk.task, f"{job['id']}-{job.get('attempt', 0)}", [job["id"]], jk.queue


def enqueue(store: Store, sender: Sender, job: JSON, countdown: float | None = None) -> None:
    """(Re-)enqueue an existing job's task."""
    name, task_id, args, queue = _task_of(job)
    opts: dict[str, Any] = {"queue": queue, "task_id": task_id}
    if countdown:
        opts["countdown"] = countdown
    sender.send_task(name, args=args, **opts)


def _record_finished(kind: str, state: str, duration_s: float | None) -> None:
    from evc import metrics

    metrics.record_job_finished(kind, state, duration_s)


def requeue_lost(store: Store, sender: Sender, job_id: str, max_attempts: int) -> str:
    """A job whose worker died mid-run goes back to the queue (a new attempt, a new task id),
    or fails when it has used its attempts. Job bodies are idempotent, keyed by job id."""
    store.release_lease(job_id)
    job = store.get_job(job_id)
    attempt = int(job.get("attempt") or 0) + 1
    if attempt >= max_attempts:
        if store.transition_job(
            job_id,
            "failed",
            ["running"],
            finished_at=now(),
            error={"code": "worker_lost", "message": f"the worker running this job died {attempt} times; giving up"},
        ):
            store.add_event(job_id, {"type": "job", "state": "failed", "message": "worker lost; attempts used up"})
        return "failed"
    if not store.transition_job(job_id, "queued", ["running"], attempt=attempt):
        return "skipped"
    store.add_event(
        job_id,
        {
            "type": "job",
            "state": "queued",
            "message": f"the worker running this job was lost; re-queued (attempt {attempt + 1})",
        },
    )
    enqueue(store, sender, {**job, "attempt": attempt})
    return "requeued"


def matcher(state: str | None = None, target: str | None = None) -> Callable[[JSON], bool] | None:
    """A job filter for listings: by state and/or target device (None when there is none)."""
    if not (state or target):
        return None

    def match(j: JSON) -> bool:
        return (not state or j["state"] == state) and (not target or target in j.get("targets", []))

    return match


def public(job: JSON, store: Store | None = None, with_results: bool = True) -> JSON:
    """A job as the API shows it."""
    out = dict(job)
    if with_results and store is not None:
        out["results"] = store.results(job["id"])
    return out


def cancel(store: Store, job_id: str, revoke: Any | None = None) -> JSON:
    """Ask a job to stop. A queued job is cancelled at once; a running one at its next check."""
    job = store.get_job(job_id)
    if job["state"] in TERMINAL_STATES:
        raise Conflict(f"job {job_id} already {job['state']}", state=job["state"])
    store.update_job(job_id, cancel_requested=True)
    if store.transition_job(job_id, "cancelled", ["queued"], finished_at=now()):
        _record_finished(job["kind"], "cancelled", None)
        store.add_event(job_id, {"type": "job", "state": "cancelled", "message": "cancelled before it started"})
        if revoke is not None:
            revoke(f"{job_id}-{job.get('attempt', 0)}")
    else:
        store.add_event(job_id, {"type": "job", "message": "cancel requested"})
    return store.get_job(job_id)


@dataclass(frozen=True)
class Partial:
    """What a job body returns when only some targets got what was asked: the job ends
    ``partial`` with *summary*; *message* says which fell short (details in the results)."""

    summary: JSON
    message: str


@dataclass
class JobRun:
    """The handle a task body reports through: state, progress, events, per-target results."""

    store: Store
    job: JSON
    done: int = 0
    _buffer: list[JSON] = field(default_factory=list)

    @property
    def id(self) -> str:
        return str(self.job["id"])

    @property
    def params(self) -> JSON:
        return dict(self.job.get("params") or {})

    @classmethod
    def start(cls, store: Store, job_id: str) -> JobRun | None:
        """Mark the job running; None when it is already final (a redelivery or a cancel)."""
        if not store.transition_job(job_id, "running", ["queued", "running"], started_at=now()):
            return None
        job = store.get_job(job_id)
        run = cls(store, job, done=int(job.get("progress", {}).get("done", 0)))
        return run

    def cancelled(self) -> bool:
        return self.store.get_job(self.id).get("cancel_requested", False) is True

    def check_cancel(self) -> None:
        if self.cancelled():
            raise JobCancelled("cancelled by request")

    def event(self, message: str = "", **fields: Any) -> int:
        return self.store.add_event(self.id, {"type": fields.pop("type", "log"), "message": message, **fields})

    def events(self, events: list[JSON]) -> int:
        return self.store.add_events(self.id, events)

    def progress(self, done: int | None = None, total: int | None = None, **extra: Any) -> None:
        if done is not None:
            self.done = done
        total = total if total is not None else int(self.job["progress"].get("total") or 1)
        percent = min(100.0, round(100.0 * self.done / max(total, 1), 1))
        prog = {"done": min(self.done, total), "total": total, "percent": percent, **extra}
        self.job["progress"] = prog
        self.store.update_job(self.id, progress=prog)

    def result(self, target: str, result: JSON, count: bool = True) -> None:
        """Record *target*'s result; it counts towards progress once, however often a retry or a
        redelivery records it again (the latest result wins)."""
        first = self.store.set_result(self.id, target, result)
        if count and first:
            self.progress(self.done + 1)

    def succeed(self, summary: JSON | None = None, message: str = "succeeded") -> bool:
        return self._finish("succeeded", summary=summary or {}, message=message)

    def partial(self, summary: JSON, message: str) -> bool:
        """End with some targets short of what was asked (their reasons are in the results)."""
        return self._finish("partial", summary=summary, message=message)

    def fail(self, error: EVCError | str, summary: JSON | None = None) -> bool:
        err = error.to_dict() if isinstance(error, EVCError) else {"code": "failed", "message": error}
        return self._finish("failed", summary=summary or {}, error=err, message=err["message"])

    def cancel(self, summary: JSON | None = None) -> bool:
        return self._finish("cancelled", summary=summary or {}, message="cancelled")

    def _finish(self, state: str, message: str, **changes: Any) -> bool:
        finished = now()
        ok = self.store.transition_job(self.id, state, ["queued", "running"], finished_at=finished, **changes)
        if ok:
            self.store.add_event(self.id, {"type": "job", "state": state, "message": message})
            started = self.job.get("started_at") or self.job.get("created_at")
            _record_finished(self.job["kind"], state, finished - started if started else None)
        return ok


__all__ = ["JOB_KINDS", "JOB_STATES", "JobKind", "JobRun", "Partial", "QUEUES", "cancel", "enqueue", "submit"]
