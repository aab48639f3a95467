"""EVC's pipelined task publisher writes what kombu's Redis transport writes."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from evc.workers.celery_app import make_celery

from evc.queue import JobQueue
from tests.fixtures.helpers import present

pytestmark = pytest.mark.integration


def test_task_message_matches_kombu(settings, store, redis_raw) -> None:
    app = make_celery(settings, include_tasks=False)
    q = f"cmp-{store.prefix}"
    app.send_task("evc.noop", args=["job_a"], queue=q, task_id="job_a-0")
    pipe = redis_raw.pipeline()
    for name, args in present(JobQueue.of(app).publisher).commands("evc.noop", "job_b-0", ["job_b"], q):
        if name == "lpush":
            getattr(pipe, name)(*args)
    pipe.execute()
    theirs, ours = (json.loads(redis_raw.rpop(q)) for _ in range(2))
    assert set(ours) == set(theirs)
    assert set(ours["properties"]) == set(theirs["properties"])
    assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
    assert set(ours["headers"]) == set(theirs["headers"])
    for k in ("lang", "task", "retries", "timelimit", "ignore_result", "eta", "expires"):
        assert ours["headers"][k] == theirs["headers"][k]
    body = json.loads(base64.b64decode(ours["body"]))
    assert body == [["job_b"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    assert json.loads(base64.b64decode(theirs["body"]))[1:] == body[1:]


def test_sent_event_reaches_event_receivers(settings, store, redis_raw) -> None:
    """Flower listens to task-sent events: ours must arrive through Celery's own receiver."""
    app = make_celery(settings, include_tasks=False)
    got: list[dict] = []
    ready = threading.Event()

    def listen() -> None:
        with app.connection_for_read() as conn:

            def on_event(event: dict) -> None:
                if event.get("type") == "task-sent" and event.get("uuid") == "job_c-0":
                    got.append(event)
                    recv.should_stop = True

            recv = app.events.Receiver(conn, handlers={"*": on_event})
            ready.set()
            try:
                recv.capture(limit=None, timeout=10, wakeup=False)
            except Exception:  # noqa: BLE001 - timeout ends the capture
                pass

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    ready.wait(5)
    import time

    time.sleep(0.5)
    pipe = redis_raw.pipeline()
    for name, args in present(JobQueue.of(app).publisher).commands(
        "evc.noop", "job_c-0", ["job_c"], f"ev-{store.prefix}"
    ):
        getattr(pipe, name)(*args)
    pipe.execute()
    t.join(12)
    assert got and got[0]["uuid"] == "job_c-0" and got[0]["name"] == "evc.noop"
    redis_raw.delete(f"ev-{store.prefix}")
