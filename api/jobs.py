"""The one job model over HTTP: list, show, events after a cursor, cancel, submit a no-op."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_sender, get_store, require, unit_of_work
from evc.api.schemas import (
    EventArgs,
    EventPageSchema,
    JobCreateSchema,
    JobListArgs,
    JobPageSchema,
    JobSchema,
    page,
)
from flask_smorest import Blueprint

from evc import jobs
from evc.model import Scope
from evc.queue import JobQueue

blp = Blueprint("jobs", __name__, url_prefix="/api/v1", description="Asynchronous jobs")


@blp.route("/jobs", methods=["POST"])
@require(Scope.ADMIN, deferrable=True)
@blp.arguments(JobCreateSchema())  # an instance: webargs would build one per request from the class
@blp.response(202, JobSchema)
def submit(data: dict[str, Any]) -> Any:
    """Submit a generic job (kind `noop`: checks the pipeline end to end)."""
    job, _ = context(idempotent=True).submit(data["kind"], params=data["params"] or None, pipe=unit_of_work())
    return job


@blp.route("/jobs", methods=["GET"])
@require(Scope.READ)
@blp.arguments(JobListArgs, location="query")
@blp.response(200, JobPageSchema)
def list_jobs(args: dict[str, Any]) -> Any:
    """Jobs, newest first; filter by kind, state and target device."""
    items, total = get_store().list_jobs(
        args["offset"], args["limit"], kind=args.get("kind"), state=args.get("state"), target=args.get("target")
    )
    return page(items, total, args)


@blp.route("/jobs/<id:job_id>", methods=["GET"])
@require(Scope.READ)
@blp.response(200, JobSchema)
def show(job_id: str) -> Any:
    """A job: state, progress, per-target results, error, timestamps."""
    store = get_store()
    return jobs.public(jobs.get(store, job_id), store)


@blp.route("/jobs/<id:job_id>/events", methods=["GET"])
@require(Scope.READ)
@blp.arguments(EventArgs, location="query")
@blp.response(200, EventPageSchema)
def events(args: dict[str, Any], job_id: str) -> Any:
    """A job's events in order, after the cursor `after` (the last `seq` you saw)."""
    store = get_store()
    state = store.job_state(job_id)
    if state is None:
        store.get_job(job_id)  # raises 404
    items = store.events(job_id, args["after"], args["limit"])
    return {"items": items, "next_after": items[-1]["seq"] if items else args["after"], "state": state}


@blp.route("/jobs/<id:job_id>/cancel", methods=["POST"])
@require(Scope.ADMIN)
@blp.response(202, JobSchema)
def cancel(job_id: str) -> Any:
    """Cancel a job: a queued job stops at once, a running one at its next check point."""
    return jobs.cancel(get_store(), job_id, revoke=JobQueue.of(get_sender()).revoke)
