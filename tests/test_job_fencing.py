"""One execution of a job at a time: attempts fence each other's writes, leases are judged on
Redis's clock, a stalled (SIGSTOP) worker's late writes are refused, and a job whose worker is
lost again and again fails with "worker lost N times" instead of looping.

Real redis-server, real Celery workers (own Redis database, so they can be stopped freely)."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
from evc.workers.celery_app import make_celery

from evc import jobs
from evc.context import Caller, Context
from evc.errors import StaleAttempt
from evc.jobs import JobRun
from evc.provisioning.inventory import job_inventory
from evc.provisioning.service import ProvisionRequest, submit_provision
from evc.store import new_id
from tests.fixtures.helpers import wait_until
from tests.fixtures.services import Worker, own_database, raw_redis

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def fence(settings, tmp_path_factory):
    s, store = own_database(settings, 10, "fence", job_lease_s=1.5)
    yield s, store, tmp_path_factory.mktemp("fence")
    with raw_redis(s) as r:
        r.flushdb()


def _until(what, timeout: float):
    return wait_until(what, timeout, "the job", interval=0.05)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


# ---------------------------------------------------------------------- store-level fencing
def test_attempts_fence_each_other_on_redis_clock(fence) -> None:
    s, store, _ = fence
    job = jobs.new_job("noop")
    store.create_job(job)
    what, run1 = JobRun.begin(store, job["id"], lease_s=0.3, max_lost=3)
    assert what == "started" and run1 is not None and run1.attempt == 1
    # a redelivery while attempt 1's lease is live does not start a second execution
    assert JobRun.begin(store, job["id"], lease_s=0.3, max_lost=3) == ("busy", None)
    run1.event("attempt 1 works")
    assert store.renew_lease(job["id"], 1, 0.3)
    time.sleep(0.45)  # the lease runs out (Redis's clock): attempt 1 is presumed lost
    with pytest.raises(StaleAttempt):
        run1.event("too late")
    assert not store.renew_lease(job["id"], 1, 0.3)  # an expired lease is never revived
    what, run2 = JobRun.begin(store, job["id"], lease_s=5, max_lost=3)
    assert what == "started" and run2 is not None and run2.attempt == 2
    for write in (
        lambda: run1.progress(1),
        lambda: run1.result("dev", {"ok": True}),
        lambda: run1.succeed({"by": 1}),
        lambda: run1.once("effect"),
    ):
        with pytest.raises(StaleAttempt):
            write()
    assert run1.cancelled() and run1.stale  # its next check point stops it
    assert run2.once("effect") and not run2.once("effect")
    assert run2.succeed({"by": 2})
    done = store.get_job(job["id"])
    assert (done["state"], done["attempt"], done["lost"], done["summary"]) == ("succeeded", 2, 1, {"by": 2})
    messages = [e["message"] for e in store.events(job["id"])]
    assert "too late" not in messages and any("was lost" in m for m in messages)
    assert store.expired_leases() == []  # a finished job holds no lease


def test_a_host_clock_ahead_does_not_expire_leases(fence, monkeypatch) -> None:
    _, store, _ = fence
    job = jobs.new_job("noop")
    store.create_job(job)
    what, run = JobRun.begin(store, job["id"], lease_s=5, max_lost=3)
    assert what == "started" and run is not None
    monkeypatch.setattr("evc.store.jobs.now", lambda: time.time() + 3600)  # this host is an hour ahead
    assert job["id"] not in store.expired_leases()
    assert store.requeue_lost_job(job["id"], 3)[0] == "skipped"
    assert JobRun.begin(store, job["id"], lease_s=5, max_lost=3) == ("busy", None)
    run.event("still the one running")
    assert run.succeed()


def test_device_locks_belong_to_the_attempt(fence) -> None:
    from evc.provisioning.locks import DeviceLocks

    _, store, _ = fence
    old = DeviceLocks(store, "job_00000000000000aa:1", ttl_s=30)
    assert old.try_acquire("dev1")
    other = DeviceLocks(store, "job_00000000000000bb:1", ttl_s=30)
    assert not other.try_acquire("dev1") and other.holder("dev1") == "job_00000000000000aa"
    new = DeviceLocks(store, "job_00000000000000aa:2", ttl_s=30)
    assert new.try_acquire("dev1")  # the next attempt of the same job takes it over
    old.release()  # the stale attempt's release does not free the new attempt's lock
    assert store.lock_owner("device:dev1") == "job_00000000000000aa:2"
    new.release()


def test_killed_runs_temp_files_are_removed(fence, tmp_path, settings) -> None:
    from evc.provisioning.inventory import remove_job_dirs

    key = tmp_path / "key"
    key.write_text("x")
    job_id = "job_0123456789abcdef"
    cm = job_inventory([], key, job_id, base_dir=tmp_path)
    inv = cm.__enter__()  # a run killed inside its inventory: its exit never happens
    (inv.root / "runner" / "artifacts").mkdir(parents=True)
    assert inv.root.is_dir()
    cm2 = job_inventory([], key, "job_fedcba9876543210", base_dir=tmp_path)  # kept: no exit either
    other = cm2.__enter__()
    assert remove_job_dirs(job_id, base_dir=tmp_path) == 1
    assert not inv.root.exists() and other.root.exists()
    cm2.__exit__(None, None, None)


# ---------------------------------------------------------------------- real workers
def test_stalled_worker_is_fenced_and_only_one_execution_counts(fence) -> None:
    s, store, tmp = fence
    sender = make_celery(s, include_tasks=False)
    w1 = Worker(s, tmp / "stall1.log", concurrency=1).start("stall1")
    w2 = None
    try:
        job, _ = jobs.submit(store, sender, "noop", params={"sleep_s": 4}, created_by="test")
        _until(lambda: store.job_state(job["id"]) == "running", 20)
        time.sleep(0.3)
        assert w1.proc is not None
        os.killpg(w1.proc.pid, signal.SIGSTOP)  # the whole worker stalls, past its lease
        w2 = Worker(s, tmp / "stall2.log", concurrency=1).start("stall2")  # reaps when it starts
        done = _until(lambda: store.get_job(job["id"])["state"] == "succeeded" and store.get_job(job["id"]), 40)
        assert (done["attempt"], done["lost"]) == (2, 1)
        os.killpg(w1.proc.pid, signal.SIGCONT)  # the stale attempt wakes up ...
        log = tmp / "stall1.log"
        _until(lambda: "'stale'" in log.read_text(), 20)  # ... and stops at its next check point
        assert int(raw_redis(s).get(store.k("noop-effects")) or 0) == 1  # one set of effects
        assert store.get_job(job["id"])["summary"] == {"noop": True}
        with pytest.raises(StaleAttempt):
            store.add_event(job["id"], {"message": "late"}, fence=1)
        states = [e.get("state") for e in store.events(job["id"])]
        assert states.count("succeeded") == 1
    finally:
        if w1.proc and w1.proc.poll() is None:
            os.killpg(w1.proc.pid, signal.SIGCONT)
        w1.stop()
        if w2 is not None:
            w2.stop()


def test_worker_lost_repeatedly_fails_the_job(fence) -> None:
    s, store, tmp = fence
    sender = make_celery(s, include_tasks=False)
    w = Worker(s, tmp / "lost.log", concurrency=1).start("lost")
    try:
        job, _ = jobs.submit(store, sender, "noop", params={"sleep_s": 30}, created_by="test")
        assert w.proc is not None
        for attempt in (1, 2, 3):

            def running(a: int = attempt) -> bool:
                j = store.get_job(job["id"])
                return bool(j["state"] == "running" and j["attempt"] == a)

            _until(running, 30)
            time.sleep(0.2)
            for child in _children(w.proc.pid):  # the pool process dies mid-job (OOM, segfault ...)
                os.kill(child, signal.SIGKILL)
        done = _until(lambda: store.get_job(job["id"])["state"] == "failed" and store.get_job(job["id"]), 40)
        assert done["error"]["code"] == "worker_lost"
        assert "worker lost 3 times" in done["error"]["message"]
        assert (done["attempt"], done["lost"]) == (3, 3)
        assert any("worker lost 3 times" in e["message"] for e in store.events(job["id"]))
    finally:
        w.stop()


# ---------------------------------------------------------------------- killed provisioning runs
@pytest.fixture
def killable(settings, evc_key_path, tmp_path):
    """Settings on a database of its own: a short lease, and a job fails once its worker was
    lost twice. The workers share this process's temp dir (job directories are named by job)."""
    s, store = own_database(settings, 13, "killtmp", job_lease_s=1.5, job_max_attempts=2)
    yield s, store, Path(tempfile.gettempdir()), tmp_path
    with raw_redis(s) as r:
        r.flushdb()


def _online_record(store, dev) -> str:
    rec = {
        "id": new_id("dev"), "name": dev.name, "host": dev.host, "port": dev.port, "username": dev.username,
        "host_key": dev.host_key_public, "state": "online", "privilege": "user", "level": 0, "labels": {},
        "jump_host": None, "cluster_id": None, "facts": {}, "created_at": time.time(),
    }  # fmt: skip
    return str(store.create_device(rec, token_hash="h-" + rec["id"])["id"])


def _processes_naming(text: str) -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if p.name.isdigit() and text in cmd:
            out.append(f"{p.name}: {cmd}")
    return out


def _kill_mid_run(store, w: Worker, tmpdir: Path, job_id: str, attempt: int) -> None:
    """Once attempt *attempt* runs with its inventory on disk, SIGKILL the worker's pool process."""
    _until(lambda: store.get_job(job_id)["attempt"] == attempt and list(tmpdir.glob(f"evc-{job_id}*")), 60)
    assert w.proc is not None
    for child in _children(w.proc.pid):
        os.kill(child, signal.SIGKILL)


def test_a_killed_provisioning_run_leaves_no_inventory_behind(killable, simulator, sim_devices) -> None:
    """Issue 10.4, end to end: a real provisioning run whose worker process is SIGKILLed mid-run
    leaves its private inventory in $TMPDIR; the next attempt removes it (and succeeds), and
    a job that fails for good ("worker lost N times") removes it too."""
    s, store, tmpdir, tmp = killable
    (dev,) = sim_devices(1, privilege="user")
    dev_id = _online_record(store, dev)
    simulator.set_fault(dev.name, "slow", slow_s=1.0)  # every command waits 1 s: a run to kill
    ctx = Context(store, s, make_celery(s, include_tasks=False), Caller("test"))
    w = Worker(s, tmp / "killtmp.log", concurrency=1).start("killtmp")
    try:
        req = {"playbook": "devenv", "targets": [dev_id], "extra_vars": {"workspace": "evc/killed", "packages": []}}
        job, _ = submit_provision(ctx, ProvisionRequest.from_dict(req))
        _kill_mid_run(store, w, tmpdir, job["id"], 1)
        simulator.set_fault(dev.name, "ok")  # attempt 2 may run at full speed
        done = _until(lambda: (j := store.get_job(job["id"]))["state"] in ("succeeded", "failed") and j, 90)
        assert (done["state"], done["attempt"], done["lost"]) == ("succeeded", 2, 1), (
            store.results(job["id"]),
            [e.get("message") for e in store.events(job["id"])],
        )
        assert list(tmpdir.glob(f"evc-{job['id']}*")) == []  # attempt 2's own went at its end too
        _until(lambda: not _processes_naming(f"evc-{job['id']}"), 10)  # no ssh master or playbook left

        # killed as often as the settings allow: the job fails, and its inventory goes with it
        simulator.set_fault(dev.name, "slow", slow_s=1.0)
        job, _ = submit_provision(ctx, ProvisionRequest.from_dict(req))
        for attempt in (1, 2):
            _kill_mid_run(store, w, tmpdir, job["id"], attempt)
        done = _until(lambda: (j := store.get_job(job["id"]))["state"] in ("succeeded", "failed") and j, 60)
        assert done["state"] == "failed" and done["error"]["code"] == "worker_lost", done
        _until(lambda: list(tmpdir.glob(f"evc-{job['id']}*")) == [], 10)
        _until(lambda: not _processes_naming(f"evc-{job['id']}"), 10)  # its ssh masters are gone too
    finally:
        simulator.set_fault(dev.name, "ok")
        w.stop()


def test_a_run_slower_than_its_lease_is_one_execution(killable, simulator, sim_devices) -> None:
    """Issue 10.4, a slow network: every command on the device waits longer than a whole job
    lease, with a second worker reaping all along. The lease is renewed by the worker, not by
    the device's answers: one attempt, never presumed lost, one playbook run."""
    s, store, _, tmp = killable
    (dev,) = sim_devices(1, privilege="user")
    dev_id = _online_record(store, dev)
    simulator.set_fault(dev.name, "slow", slow_s=3.5)  # > 2 x job_lease_s (1.5 s): each command outlasts two
    ctx = Context(store, s, make_celery(s, include_tasks=False), Caller("test"))
    workers = [Worker(s, tmp / f"slow{i}.log", concurrency=1) for i in (1, 2)]
    try:
        workers[0].start("slow1")
        req = {"playbook": "facts", "targets": [dev_id]}
        job, _ = submit_provision(ctx, ProvisionRequest.from_dict(req))
        _until(lambda: store.job_state(job["id"]) == "running", 30)
        workers[1].start("slow2")  # reaps when it starts, and again once a lease could expire
        done = _until(lambda: (j := store.get_job(job["id"]))["state"] in ("succeeded", "failed") and j, 90)
        took = done["finished_at"] - done["started_at"]
        assert took > 2 * s.job_lease_s, took  # it did outlast its lease, more than once
        assert (done["state"], done["attempt"], done["lost"]) == ("succeeded", 1, 0), done
        events = store.events(job["id"], 0, 10_000)
        assert [e.get("event") for e in events].count("playbook_on_start") == 1
        assert not any("was lost" in (e.get("message") or "") for e in events)
    finally:
        simulator.set_fault(dev.name, "ok")
        for w in workers:
            w.stop()
