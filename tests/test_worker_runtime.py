"""The worker runtime and the job queue: every task EVC sends is registered, the per-process
state is created and closed by the worker signals, and a forked child starts its own.

Unit tests: no Redis, no worker (nothing here connects anywhere)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from celery import _state as celery_state
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown
from evc.workers.celery_app import make_celery

from evc import pool as pooling
from evc.fl import channels
from evc.jobs import JOB_KINDS
from evc.queue import JobQueue
from evc.runtime import WorkerRuntime
from evc.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = Settings(redis_url="redis://127.0.0.1:1/0", key_prefix="evc-runtime-test")


@pytest.fixture()
def runtime() -> Any:
    """A fresh runtime for the test; closed after it (the next test starts another)."""
    WorkerRuntime.stop()
    yield WorkerRuntime.current()
    WorkerRuntime.stop()


@pytest.fixture(scope="module")
def app() -> Any:
    app = make_celery(SETTINGS)
    app.loader.import_default_modules()
    return app


class FakeWorker:
    def __init__(self, app: Any) -> None:
        self.app = app


# ---------------------------------------------------------------------- task registration
def _sent_task_names() -> set[str]:
    """Every task name the code publishes by name (publish, send_task, signature calls)."""
    call = re.compile(r"""\b(?:publish|send_task|signature)\(\s*["'](evc\.\w+)["']""")
    names: set[str] = set()
    for folder in ("evc", "tasks", "workers", "api"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(call.findall(path.read_text()))
    return names


def test_every_job_kind_and_every_sent_task_is_registered(app: Any) -> None:
    registered = set(app.tasks)
    kinds = {jk.task for jk in JOB_KINDS.values()}
    scheduled = {entry["task"] for entry in app.conf.beat_schedule.values()}
    sent = _sent_task_names()
    named = {"evc.fl_round", "evc.fl_recover", "evc.fl_aggregate", "evc.fl_fit", "evc.reap_jobs",
             "evc.prune_jobs", "evc.health_tick"}  # fmt: skip
    assert named <= sent | scheduled  # the scan finds what the code sends
    missing = (kinds | scheduled | sent | named) - registered
    assert not missing, f"sent but registered by no task module: {sorted(missing)}"


def test_each_job_kind_routes_to_its_queue(app: Any) -> None:
    for jk in JOB_KINDS.values():
        assert app.conf.task_routes[jk.task] == {"queue": jk.queue}


# ---------------------------------------------------------------------- the job queue
def test_the_app_holds_one_job_queue_and_no_other_evc_attribute() -> None:
    app = make_celery(SETTINGS, include_tasks=False)
    queue = JobQueue.of(app)
    assert app.evc_queue is queue and queue.settings is SETTINGS and queue.app is app
    assert [a for a in vars(app) if a.startswith("evc_")] == ["evc_queue"]
    assert JobQueue.of(queue) is queue
    sentinel = make_celery(SETTINGS.replace(redis_sentinels="127.0.0.1:1"), include_tasks=False)
    assert JobQueue.of(sentinel).publisher is None  # kombu publishes through Sentinel


def test_a_plain_sender_gets_a_queue_without_the_fast_path(runtime: WorkerRuntime) -> None:
    sent: list[tuple[str, Any, dict[str, Any]]] = []

    class Fake:
        def send_task(self, name: str, args: Any = None, **options: Any) -> None:
            sent.append((name, args, options))

    queue = JobQueue.of(Fake())
    assert queue.settings is None and queue.publisher is None
    job = {"id": "job_x", "kind": "facts", "attempt": 2}
    assert queue.job_commands(job) == []
    queue.enqueue(job)
    queue.enqueue(job, countdown=5)
    queue.publish("evc.fl_recover", [None], queue="fl", ignore_result=True)
    assert sent == [
        ("evc.refresh_facts", ["job_x"], {"queue": "ssh", "task_id": "job_x-2"}),
        ("evc.refresh_facts", ["job_x"], {"queue": "ssh", "task_id": "job_x-2", "countdown": 5}),
        ("evc.fl_recover", [None], {"queue": "fl", "ignore_result": True}),
    ]


def test_the_publisher_is_per_process_state(runtime: WorkerRuntime) -> None:
    queue = JobQueue.of(make_celery(SETTINGS, include_tasks=False))
    first = queue.publisher
    assert first is not None and queue.publisher is first
    assert [name for name, _ in queue.job_commands({"id": "job_y", "kind": "noop"})][0] == "lpush"
    WorkerRuntime.stop()
    assert queue.publisher is not first  # a new runtime (a new process) builds its own


def test_revoke_goes_through_the_apps_control(monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_celery(SETTINGS, include_tasks=False)
    revoked: list[str] = []
    monkeypatch.setattr(app.control, "revoke", lambda tid: revoked.append(tid))
    JobQueue.of(app).revoke("job_z-0")
    assert revoked == ["job_z-0"]


# ---------------------------------------------------------------------- the runtime
def test_current_is_one_object_per_process_until_stopped(runtime: WorkerRuntime) -> None:
    assert WorkerRuntime.current() is runtime and WorkerRuntime.peek() is runtime
    assert runtime.store(SETTINGS) is runtime.store(SETTINGS)
    assert pooling.pool_for(SETTINGS) is runtime.pool(SETTINGS)
    assert pooling.process_loop() is runtime.loop()
    assert channels.registry_for(SETTINGS) is runtime.channels(SETTINGS)
    assert channels.local_registries() == [runtime.channels(SETTINGS)]
    WorkerRuntime.stop()
    assert runtime.closed and WorkerRuntime.peek() is None
    assert WorkerRuntime.current() is not runtime
    with pytest.raises(RuntimeError):
        runtime.loop()


class _Run:
    """What the lease renewer needs of a JobRun."""

    def __init__(self) -> None:
        self.id, self.attempt, self.stale = "job_lease", 1, False
        self.renewed = threading.Event()
        self.store = self

    def renew_lease(self, job_id: str, attempt: int, ttl: float) -> bool:
        self.renewed.set()
        return True


def test_worker_signals_start_and_close_the_runtime(app: Any) -> None:
    worker_init.send(sender=FakeWorker(app))
    rt = WorkerRuntime.current()
    assert rt.settings is SETTINGS  # the worker app's settings
    loop = rt.loop()
    pool = rt.pool(SETTINGS)
    run: Any = _Run()
    rt.leases.hold(run, 0.3)
    assert run.renewed.wait(5) and rt.leases.running()
    worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    assert rt.closed and WorkerRuntime.peek() is None
    assert not loop.thread.is_alive() and not rt.leases.running() and pool.size() == 0

    previous = celery_state.get_current_app()
    app.set_current()  # a prefork child: no sender, the worker's app is the current one
    try:
        worker_process_init.send(sender=None)
    finally:
        previous.set_current()
    child = WorkerRuntime.current()
    assert child is not rt and child.settings is SETTINGS
    worker_shutdown.send(sender=None)
    assert child.closed and WorkerRuntime.peek() is None


def test_pool_shutdown_stops_the_loop_and_keeps_the_runtime(runtime: WorkerRuntime) -> None:
    first = pooling.process_loop()
    pooling.shutdown()
    assert not first.thread.is_alive() and not runtime.closed
    assert pooling.call(asyncio.sleep(0, result=3)) == 3 and pooling.process_loop() is not first


def test_a_forked_child_builds_its_own_runtime(runtime: WorkerRuntime) -> None:
    parent_loop = runtime.loop()
    assert pooling.call(asyncio.sleep(0, result=1)) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        ok = False
        try:
            inherited = WorkerRuntime.peek()
            mine = WorkerRuntime.current()
            ok = (
                inherited is None
                and mine is not runtime
                and mine.pid == os.getpid()
                and pooling.process_loop() is not parent_loop
                and pooling.call(asyncio.sleep(0, result=42), 10) == 42
            )
            WorkerRuntime.stop()
            ok = ok and mine.closed
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    try:
        answer = os.read(read, 1)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert answer == b"1"
    assert WorkerRuntime.current() is runtime and runtime.loop() is parent_loop  # the parent's is untouched
