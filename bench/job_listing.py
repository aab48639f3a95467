"""Benchmark: filtered job listings over the API with N finished jobs stored, the Redis memory
each finished job costs, and how long the retention cleanup takes to delete them all.

    .venv/bin/python bench/job_listing.py [--jobs 100000] [--requests 200]

Target (issue 10, point 9): with 100,000 finished jobs, a filtered listing p99 <= 20 ms (kind,
state, target and their combinations go through indexes, never a scan)."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Figure, emit, pct, private_stack

from evc import jobs
from evc.api.app import create_app
from evc.auth import create_operator_token
from evc.store import Store

KINDS = ("noop", "register", "provision", "health", "level")
DEVICES = 1000


def populate(store: Store, n: int, seed: int = 7) -> None:
    """*n* finished jobs as a fleet leaves them: a mix of kinds and outcomes, 1-3 target
    devices, a few events and a result per target."""
    rnd = random.Random(seed)
    batch = 1000
    for start in range(0, n, batch):
        pipe = store.r.pipeline(transaction=False)
        made = []
        for _ in range(start, min(n, start + batch)):
            kind = rnd.choice(KINDS)
            targets = [f"dev_{rnd.randrange(DEVICES):05d}" for _ in range(rnd.randint(1, 3))]
            job = jobs.new_job(kind, params={"playbook": "ping"} if kind == "provision" else {}, targets=targets)
            job["queued_at"] = job["created_at"]
            store.create_job(job, pipe=pipe)
            made.append(job)
        pipe.execute()
        pipe = store.r.pipeline(transaction=False)
        for job in made:
            r = rnd.random()
            state = "succeeded" if r < 0.9 else "failed" if r < 0.98 else "cancelled"
            for t in job["targets"]:
                pipe.hset(store.k("job", job["id"], "results"), t, '{"status":"ok","changed":false}')
            pipe.rpush(
                store.k("job", job["id"], "events"),
                '{"ts":1.0,"type":"job","state":"running","message":"attempt 1 started"}',
                '{"ts":2.0,"type":"log","message":"done on every device"}',
            )
            store._transition(
                keys=[store.k("job", job["id"])],
                args=[json.dumps(state), '["queued"]', store.prefix, job["id"], "", "", "summary", '{"ok":1}'],
                client=pipe,
            )
        pipe.execute()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=200)
    a = ap.parse_args()
    srv, settings = private_stack()
    try:
        store = Store.from_settings(settings)
        _, reader = create_operator_token(store, settings, "bench-reader", ["read"])
        before = int(store.r.info("memory")["used_memory"])
        t0 = time.perf_counter()
        populate(store, a.jobs)
        fill_s = time.perf_counter() - t0
        after = int(store.r.info("memory")["used_memory"])
        per_job = (after - before) / max(a.jobs, 1)
        print(f"stored {a.jobs} finished jobs in {fill_s:.1f}s; Redis memory {after / 2**20:.1f} MiB")

        client = create_app(settings).test_client()
        headers = {"Authorization": f"Bearer {reader}"}
        queries = [
            "state=failed",
            "state=succeeded&offset=10000",
            "kind=provision",
            "kind=provision&state=failed",
            "target=dev_00042",
            "target=dev_00042&state=succeeded",
            "kind=health&state=cancelled&limit=200",
        ]
        for q in queries:  # warm up (first requests build schemas, load scripts)
            assert client.get(f"/api/v1/jobs?{q}", headers=headers).status_code == 200
        times: dict[str, list[float]] = {q: [] for q in queries}
        for _ in range(a.requests):
            for q in queries:
                t = time.perf_counter()
                r = client.get(f"/api/v1/jobs?{q}", headers=headers)
                times[q].append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.get_json()
        for q in queries:
            total = client.get(f"/api/v1/jobs?{q}", headers=headers).get_json()["total"]
            print(f"  {q:<40} total {total:>6}  p50 {pct(times[q], 50):6.2f} ms  p99 {pct(times[q], 99):6.2f} ms")
        every = [x for v in times.values() for x in v]
        p99 = pct(every, 99)

        t0 = time.perf_counter()
        deleted = store.prune_jobs(0.0)
        prune_s = time.perf_counter() - t0
        left = int(store.r.info("memory")["used_memory"])
        print(f"pruned {deleted} jobs in {prune_s:.1f}s; Redis memory back to {left / 2**20:.1f} MiB")
        emit(
            [
                Figure(f"filtered job listing p99 ({a.jobs} finished)", "<= 20 ms", p99, "ms", p99 <= 20.0, p99 / 20.0),
                Figure("filtered job listing p50", "-", pct(every, 50), "ms", True),
                Figure("Redis memory per finished job", "-", per_job, "bytes", True),
                Figure(f"retention cleanup of {a.jobs} jobs", "-", prune_s, "s", deleted == a.jobs),
            ]
        )
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
