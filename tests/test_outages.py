"""Outages are reported, not hidden: Redis down answers 503 on every route, /readyz means "this
API can serve", workers retry store errors, and a queued job whose task message was lost is
re-published. Also: out-of-range cursors answer 4xx. Real redis-server and Celery workers."""

from __future__ import annotations

import time

import pytest
import redis
from evc.api.app import create_app
from evc.workers.celery_app import make_celery

from evc import jobs
from evc.auth import create_operator_token
from evc.context import Context
from evc.embedded import RedisServer
from evc.errors import TRANSIENT_ERRORS, StoreUnavailable
from evc.store import Store
from tests.fixtures.services import Worker, own_database, raw_redis

pytestmark = [pytest.mark.integration]


def test_redis_down_answers_503_on_every_route(tmp_path, settings) -> None:
    srv = RedisServer(tmp_path / "r").start()
    s = settings.replace(redis_url=srv.url, key_prefix="outage")
    store = Store.from_settings(s)
    _, admin = create_operator_token(Context(store, s), "admin", ["admin"])
    app = create_app(s)
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200  # Redis answers: this API can serve, with or without workers
    assert ready.get_json()["redis"] is True and "workers" in ready.get_json()
    srv.stop()
    auth = {"Authorization": f"Bearer {admin}"}
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", "x").replace(f"<path:{arg}>", "x")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            resp = client.open(path, method=method, headers=auth, json={})
            body = resp.get_json(silent=True) or {}
            assert resp.status_code != 500, (method, path, resp.status_code, body)
            if resp.status_code == 503 and path.startswith("/api/"):
                assert body.get("message"), (method, path, body)
            checked += 1
    assert checked > 30
    for method, path in (("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/api/v1/devices")):
        resp = client.open(path, method=method, headers=auth, json={"kind": "noop"})
        assert resp.status_code == 503, (method, path)
        assert resp.get_json()["error"] == "store_unavailable"
        assert "unavailable" in resp.get_json()["message"]
    resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.get_json()["redis"] is False and resp.get_json()["error"]


def test_store_errors_are_transient_for_workers(store, redis_raw) -> None:
    assert issubclass(StoreUnavailable, TRANSIENT_ERRORS)
    # a command Redis refuses is a bug, not an outage: never retried as one
    redis_raw.set(store.k("job", "job_0000000000000bad"), "not a hash")
    try:
        with pytest.raises(redis.ResponseError):
            store.get_job("job_0000000000000bad")
    finally:
        redis_raw.delete(store.k("job", "job_0000000000000bad"))


def test_queued_job_whose_message_was_lost_is_republished(settings, tmp_path) -> None:
    s, store = own_database(settings, 11, "repub", job_lease_s=2.0, job_republish_after_s=0.5)
    sender = make_celery(s, include_tasks=False)
    raw = raw_redis(s)
    try:
        lost, _ = jobs.submit(store, sender, "noop", created_by="test")  # acknowledged to its caller ...
        raw.delete("default")  # ... and its message gone with a Redis crash (no worker ran yet)
        kept, _ = jobs.submit(store, sender, "noop", created_by="test")
        assert jobs.republish_missing(store, sender, 0.5) == 0  # not waiting long enough yet
        time.sleep(0.6)
        assert store.jobs_in_queue("default") == {kept["id"]}
        assert jobs.republish_missing(store, sender, 0.5) == 1  # only the one with no message
        assert store.jobs_in_queue("default") == {kept["id"], lost["id"]}
        # and the reaper does it by itself: lose the message again, start a worker (it reaps)
        third, _ = jobs.submit(store, sender, "noop", created_by="test")
        raw.lrem("default", 1, raw.lrange("default", 0, 0)[0])  # newest message: the third's
        assert third["id"] not in (store.jobs_in_queue("default") or set())
        w = Worker(s, tmp_path / "repub.log", concurrency=2).start("repub")
        try:
            for job in (lost, kept, third):
                deadline = time.monotonic() + 30
                while store.job_state(job["id"]) != "succeeded":
                    assert time.monotonic() < deadline, store.get_job(job["id"])
                    time.sleep(0.1)
        finally:
            w.stop()
        messages = [e["message"] for e in store.events(third["id"])]
        assert any("missing from the broker" in m for m in messages)
        assert store.get_job(kept["id"])["attempt"] == 1  # a job whose message was there ran once
    finally:
        raw.flushdb()


@pytest.mark.parametrize(
    "query",
    ["after=9223372036854775808", "after=99999999999999999999999", "after=-1", "limit=0", "limit=100000"],
)
def test_event_cursor_out_of_range_is_4xx(api, flush, query) -> None:
    status, body = api.call("POST", "/api/v1/jobs", json={"kind": "noop"})
    assert status == 202
    status, err = api.call("GET", f"/api/v1/jobs/{body['id']}/events?{query}", token="read")
    assert status == 422, (status, err)
    assert err["message"].startswith("invalid input")


def test_a_task_is_retried_across_a_short_redis_outage(settings, tmp_path) -> None:
    """Issue 10.10: a running job's Redis goes away for a moment (its server stopped, then started
    again on the same port and data): the task's store error is transient, the task is retried
    and the job completes, its one effect counted once."""
    srv = RedisServer(tmp_path / "r").start()
    s = settings.replace(redis_url=srv.url, key_prefix="blip", job_lease_s=30.0)
    store = Store.from_settings(s)
    w = Worker(s, tmp_path / "blip.log", concurrency=1).start("blip")
    try:
        job, _ = jobs.submit(store, make_celery(s, include_tasks=False), "noop", params={"sleep_s": 3},
                             created_by="test")  # fmt: skip
        deadline = time.monotonic() + 30
        while store.job_state(job["id"]) != "running":
            assert time.monotonic() < deadline, store.get_job(job["id"])
            time.sleep(0.05)
        srv.stop()  # mid-run: the body's next check point cannot reach Redis
        time.sleep(1.0)
        srv = RedisServer(tmp_path / "r", port=srv.port).start()
        deadline = time.monotonic() + 60
        while (state := _state_or_none(store, job["id"])) not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, (state, (tmp_path / "blip.log").read_text()[-3000:])
            time.sleep(0.2)
        done = store.get_job(job["id"])
        log = (tmp_path / "blip.log").read_text()
        assert done["state"] == "succeeded", (done, log[-3000:])
        messages = [e.get("message") or "" for e in store.events(job["id"])]
        # retried (Celery's retry, and the job's own retry event), not presumed lost
        assert "Retry in" in log and any("retrying in" in m for m in messages), (messages, log[-3000:])
        assert done["lost"] == 0, done
        assert int(raw_redis(s).get(store.k("noop-effects")) or 0) == 1
    finally:
        w.stop()
        srv.stop()


def _state_or_none(store: Store, job_id: str) -> str | None:
    try:
        return store.job_state(job_id)
    except StoreUnavailable:
        return None
