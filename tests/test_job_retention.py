"""Bounded growth and indexed reads: job listings filtered by kind, state and target read their
indexes (kept in the same step as each transition), and the beat-scheduled retention cleanup
deletes finished jobs with everything they own. Real redis-server."""

from __future__ import annotations

import pytest
from evc.workers.celery_app import make_celery

from evc import jobs
from evc.jobs import JobRun
from evc.store import Store
from tests.fixtures.services import own_database, raw_redis

pytestmark = [pytest.mark.integration]


@pytest.fixture()
def kept(settings):
    s, store = own_database(settings, 12, "keep")
    raw = raw_redis(s)
    yield s, store, raw
    raw.flushdb()
    raw.close()


def _make(store: Store, kind: str, state: str, targets: list[str]) -> str:
    job = jobs.new_job(kind, targets=targets)
    store.create_job(job)
    if state != "queued":
        what, run = JobRun.begin(store, job["id"], lease_s=30, max_lost=3)
        assert what == "started" and run is not None
        run.result(targets[0] if targets else "-", {"ok": True})
        {"succeeded": run.succeed, "failed": lambda: run.fail("boom"), "cancelled": run.cancel}.get(
            state, lambda: True
        )()
    return str(job["id"])


def test_filtered_listings_read_indexes_not_records(kept) -> None:
    _, store, raw = kept
    made: dict[str, tuple[str, str, list[str]]] = {}
    for i in range(60):
        kind = ("noop", "provision", "health")[i % 3]
        state = ("succeeded", "failed", "running", "queued")[i % 4]
        targets = [f"dev_{i % 5}"] if kind != "noop" else []
        made[_make(store, kind, state, targets)] = (kind, state, targets)

    def expect(kind=None, state=None, target=None) -> list[str]:
        ids = [
            j
            for j, (k, s, t) in made.items()
            if (kind is None or k == kind) and (state is None or s == state) and (target is None or target in t)
        ]
        return sorted(ids)

    for filters in (
        {"kind": "provision"},
        {"state": "failed"},
        {"kind": "health", "state": "succeeded"},
        {"target": "dev_2"},
        {"target": "dev_2", "state": "running"},
        {"target": "dev_1", "kind": "health", "state": "failed"},
        {},
    ):
        items, total = store.list_jobs(0, 500, **filters)
        assert sorted(j["id"] for j in items) == expect(**filters), filters
        assert total == len(items)
        times = [j["created_at"] for j in items]
        assert times == sorted(times, reverse=True)  # newest first
    items, total = store.list_jobs(2, 3, state="failed")
    assert total == len(expect(state="failed")) and len(items) == 3

    # a filtered page reads only the records it returns: no scan of every job
    for _ in range(500):
        _make(store, "noop", "succeeded", [])
    raw.config_resetstat()
    items, total = store.list_jobs(0, 10, kind="health", state="failed")
    stats = raw.info("commandstats")
    assert len(items) == min(10, total) and total == len(expect(kind="health", state="failed"))
    assert stats.get("cmdstat_hgetall", {}).get("calls", 0) <= 10
    assert "cmdstat_hmget" not in stats and "cmdstat_scan" not in stats


def test_api_filters_by_kind_state_and_target(api, flush) -> None:
    ids = [api.call("POST", "/api/v1/jobs", json={"kind": "noop"})[1]["id"] for _ in range(2)]
    status, page = api.call("GET", "/api/v1/jobs?kind=noop&limit=500", token="read")
    assert status == 200 and {j["id"] for j in page["items"]} >= set(ids)
    # a worker (when the session runs one) may move a job on between the two reads: a state
    # read just before the listing is right unless the job changed state in between
    for job_id in ids:
        for _ in range(50):
            state = api.call("GET", f"/api/v1/jobs/{job_id}", token="read")[1]["state"]
            status, page = api.call("GET", f"/api/v1/jobs?kind=noop&state={state}&limit=500", token="read")
            assert status == 200
            if job_id in {j["id"] for j in page["items"]}:
                break
            assert api.call("GET", f"/api/v1/jobs/{job_id}", token="read")[1]["state"] != state
        else:
            raise AssertionError(f"{job_id} never listed under its own state")
    status, page = api.call("GET", "/api/v1/jobs?kind=provision", token="read")
    assert status == 200 and not set(ids) & {j["id"] for j in page["items"]}


def test_retention_deletes_finished_jobs_with_what_they_own(kept) -> None:
    s, store, raw = kept
    old = [_make(store, "provision", st, ["dev_a", "dev_b"]) for st in ("succeeded", "failed", "cancelled")]
    live = [_make(store, "provision", st, ["dev_a"]) for st in ("queued", "running")]
    raw.hset(store.k("fl", old[0]), "phase", '"closed"')
    raw.hset(store.k("fl", old[0], "rounds"), "1", "{}")
    assert jobs.prune(store, 3600.0) == 0  # nothing is old enough yet
    assert jobs.prune(store, 0.0) == 3
    for job_id in old:
        with pytest.raises(Exception, match="not found"):
            store.get_job(job_id)
    leftover = [k.decode() for k in raw.scan_iter(f"{store.prefix}:*") if any(j in k.decode() for j in old)]
    assert leftover == []
    indexes = [k for k in raw.scan_iter(f"{store.prefix}:jobs*")]
    for key in indexes:
        members = {m.decode() for m in raw.zrange(key, 0, -1)}
        assert not members & set(old), key
    items, total = store.list_jobs(0, 50, target="dev_a")
    assert sorted(j["id"] for j in items) == sorted(live) and total == 2
    # beat runs the cleanup on its own
    schedule = make_celery(s, include_tasks=False).conf.beat_schedule
    assert schedule["prune-jobs"]["task"] == "evc.prune_jobs"
    assert s.job_retention_s == 7 * 86400


def test_jobs_stored_before_the_indexes_are_indexed_then_pruned(kept) -> None:
    _, store, raw = kept
    old = _make(store, "provision", "succeeded", ["dev_z"])
    for key in raw.scan_iter(f"{store.prefix}:jobs-*"):  # as an older EVC left them
        raw.delete(key)
    assert store.list_jobs(0, 10, state="succeeded") == ([], 0)
    assert jobs.prune(store, 3600.0) == 0  # indexes them first; not old enough yet
    items, total = store.list_jobs(0, 10, target="dev_z", state="succeeded")
    assert [j["id"] for j in items] == [old] and total == 1
    assert jobs.prune(store, 0.0) == 1
