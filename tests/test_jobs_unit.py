"""The job model's own logic over an in-memory store: new jobs, idempotency keys, task ids,
transitions a run makes (only from queued/running, fenced by attempt), progress and results
(no Redis, no Celery)."""

from __future__ import annotations

from typing import Any

import pytest

from evc import jobs
from evc.errors import Conflict, JobCancelled, NotFound, StaleAttempt, ValidationError
from evc.jobs import JobRun, new_job
from evc.model import JobState
from tests.fixtures.fakes import FakeStore

JSON = dict[str, Any]


@pytest.fixture(autouse=True)
def no_metrics(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    finished: list[tuple[str, str]] = []
    monkeypatch.setattr(jobs, "_record_finished", lambda kind, state, duration: finished.append((kind, state)))
    return finished


def running(store: FakeStore, attempt: int | None = None, **fields: Any) -> JobRun:
    job = {**new_job("provision", targets=["a", "b"]), "state": "running", "attempt": attempt or 0, **fields}
    store.put_job(job)
    return JobRun(store, store.get_job(job["id"]), attempt=attempt)  # type: ignore[arg-type]


def test_new_jobs() -> None:
    job = new_job("noop", params={"x": 1})
    assert job["id"].startswith("job") and job["state"] == "queued" and job["params"] == {"x": 1}
    assert job["progress"] == {"done": 0, "total": 1, "percent": 0.0}
    assert new_job("provision", targets=["a", "b"])["progress"]["total"] == 2
    with pytest.raises(NotFound):
        new_job("nope")


def test_task_ids_carry_the_attempt() -> None:
    from evc.queue import JobQueue

    assert JobQueue.task_of({"id": "job_1", "kind": "provision", "attempt": 2}) == (
        "evc.provision", "job_1-2", ["job_1"], "ansible",
    )  # fmt: skip


def test_scoped_idempotency_keys() -> None:
    a = jobs.scoped_key("k1", "POST /jobs", b"{}")
    assert a.startswith("POST /jobs k1\n") and a != jobs.scoped_key("k1", "POST /jobs", b'{"x": 1}')
    for bad in ("", "x" * 256, "tab\there"):
        with pytest.raises(ValidationError):
            jobs.scoped_key(bad, "s", b"")


@pytest.mark.parametrize(
    ("end", "state"),
    [
        (lambda r: r.succeed({"n": 1}), "succeeded"),
        (lambda r: r.partial({"n": 1}, "some short"), "partial"),
        (lambda r: r.fail(Conflict("no", why="x")), "failed"),
        (lambda r: r.cancel(), "cancelled"),
    ],
)
def test_a_run_ends_once(end: Any, state: str, no_metrics: list[tuple[str, str]]) -> None:
    store = FakeStore()
    run = running(store)
    assert end(run) is True
    job = store.get_job(run.id)
    assert job["state"] == state and job["finished_at"]
    assert store.job_events[run.id][-1]["state"] == state
    assert end(run) is False  # already final: no second transition
    assert no_metrics == [("provision", state)]


def test_failures_are_recorded_as_error_dicts() -> None:
    store = FakeStore()
    run = running(store)
    run.fail(Conflict("busy", holder="job_x"), {"done": 1})
    job = store.get_job(run.id)
    assert job["error"] == {"code": "conflict", "message": "busy", "details": {"holder": "job_x"}}
    assert job["summary"] == {"done": 1}
    other = running(store)
    other.fail("plain words")
    assert store.get_job(other.id)["error"] == {"code": "failed", "message": "plain words"}


def test_progress_and_results_count_each_target_once() -> None:
    store = FakeStore()
    run = running(store)
    run.result("a", {"status": "failed"})
    run.result("a", {"status": "ok"})  # a retry: latest wins, counted once
    assert store.results(run.id) == {"a": {"status": "ok"}}
    assert store.get_job(run.id)["progress"] == {"done": 1, "total": 2, "percent": 50.0}
    run.result("b", {"status": "ok"}, count=False)
    assert run.done == 1
    run.progress(5, 2, round=3)  # never past the total
    assert store.get_job(run.id)["progress"] == {"done": 2, "total": 2, "percent": 100.0, "round": 3}


def test_cancel_requests_and_stale_attempts_stop_a_run() -> None:
    store = FakeStore()
    run = running(store, attempt=1)
    assert run.owner == f"{run.id}:1" and not run.cancelled()
    store.jobs[run.id]["cancel_requested"] = True
    with pytest.raises(JobCancelled):
        run.check_cancel()
    stale = running(store, attempt=1)
    store.jobs[stale.id]["attempt"] = 2  # another attempt took the job over
    with pytest.raises(StaleAttempt):
        stale.check_cancel()
    with pytest.raises(StaleAttempt):  # its writes are fenced off
        stale.event("late")
    # a fake store and a partial job: the owner of a run that has no attempt is the job's id
    assert JobRun(store, {"id": "job_x"}).owner == "job_x"  # type: ignore[arg-type, typeddict-item]


def test_requeue_hands_the_job_back() -> None:
    store = FakeStore()
    run = running(store, attempt=1)
    run.requeue(30, "retry later", reason="busy")
    job = store.get_job(run.id)
    assert job["state"] == "queued" and job["not_before"] == pytest.approx(job["queued_at"] + 30)
    assert store.job_events[run.id][-1] == {"type": "retry", "message": "retry later", "reason": "busy"}


def test_cancel_of_a_queued_job_is_immediate(no_metrics: list[tuple[str, str]]) -> None:
    store = FakeStore()
    job = new_job("noop")
    store.put_job(job)
    revoked: list[str] = []
    assert jobs.cancel(store, job["id"], revoke=revoked.append)["state"] == "cancelled"  # type: ignore[arg-type]
    assert revoked == [f"{job['id']}-0"] and no_metrics == [("noop", "cancelled")]
    with pytest.raises(Conflict, match="already cancelled"):
        jobs.cancel(store, job["id"])  # type: ignore[arg-type]
    run = running(store)
    assert jobs.cancel(store, run.id)["state"] == "running"  # type: ignore[arg-type]
    assert store.get_job(run.id)["cancel_requested"] is True


def test_store_fields_are_json_as_json_dumps_writes_it() -> None:
    """The store's field encoder (scalars without an encoder per call) writes what
    ``json.dumps(value, separators=(",", ":"))`` writes, for every kind of value."""
    import json

    from evc.store._base import dump_value

    values: list[Any] = [
        "", "plain", 'q"uote\\', "é€😀\n\x00", "\ud800", None, True, False, 0, -7, 10**30, 0.1, -0.0, 1e20,
        1780000000.123456, float("nan"), float("inf"), float("-inf"), {}, [], {"a": [1, 2.5, None]}, [True, "x"],
        JobState.QUEUED,
    ]  # fmt: skip
    for v in values:
        assert dump_value(v) == json.dumps(v, separators=(",", ":")), v


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "noop"}, {"kind": "noop", "params": {}}, {"kind": "noop", "params": {"sleep_s": 1}},
        {"kind": "noop", "params": {"sleep_s": 60}}, {"kind": "noop", "params": {"sleep_s": -0.0}},
        {"kind": "noop", "params": {"sleep_s": 60.5}}, {"kind": "noop", "params": {"sleep_s": True}},
        {"kind": "noop", "params": {"sleep_s": float("nan")}}, {"kind": "noop", "params": {"sleep_s": 10**400}},
        {"kind": "noop", "params": {"sleep_s": "1"}}, {"kind": "noop", "params": {"sleep_s": None}},
        {"kind": "noop", "params": None}, {"kind": "noop", "params": []}, {"kind": "noop", "params": {"x": 1}},
        {"kind": "noop", "x": 1}, {"kind": "noopx"}, {"kind": None}, {"kind": ["noop"]}, {}, {"params": {}},
    ],
)  # fmt: skip
def test_job_submission_body_loads_as_its_fields_would(body: dict[str, Any]) -> None:
    """POST /jobs' plain bodies take a shortcut: it loads exactly what the schema's fields load,
    and every other body (each invalid one) gets the fields' own errors."""
    from evc.api.schemas import JobCreateSchema
    from marshmallow import Schema
    from marshmallow import ValidationError as Invalid

    schema = JobCreateSchema()

    def load(fn: Any) -> tuple[str, Any]:
        try:
            return "ok", fn(body)
        except Invalid as exc:
            return "invalid", exc.messages

    assert repr(load(schema.load)) == repr(load(lambda b: Schema.load(schema, b)))


def test_a_job_dumps_as_its_schema_fields_would() -> None:
    from evc.api.schemas import JobSchema
    from marshmallow import Schema

    job = {**new_job("noop", params={"sleep_s": 1.0}, created_by="operator:x"), "results": {"d": {"ok": True}}}
    schema = JobSchema()
    assert list(schema.dump(job).items()) == list(Schema.dump(schema, job).items())
    assert schema.dump([job], many=True) == Schema.dump(schema, [job], many=True)
