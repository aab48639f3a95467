"""Reliability: a worker killed mid-job, the API under load while workers restart, a dropped SSH
connection, and the security promises (rate limits, CORS, no secrets in task messages).

These tests run their own workers on their own Redis database, so they can kill them freely."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from evc.api.app import create_app
from evc.workers.celery_app import make_celery
from werkzeug.serving import make_server

from evc import jobs
from evc.auth import create_operator_token
from evc.context import Context
from evc.model import Job
from evc.store import Store
from tests.fixtures.services import Worker, own_database, raw_redis

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def rel(settings, tmp_path_factory):
    s, store = own_database(settings, 9, "rel", job_lease_s=2.0)
    yield s, store, tmp_path_factory.mktemp("rel")
    with raw_redis(s) as r:
        r.flushdb()


def _wait(store: Store, job_id: str, timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.job_state(job_id) in ("succeeded", "failed", "cancelled"):
            return store.get_job(job_id)
        time.sleep(0.1)
    raise AssertionError(f"{job_id} still {store.job_state(job_id)}")


def test_worker_killed_mid_job_completes_elsewhere_once(rel) -> None:
    s, store, tmp = rel
    sender = make_celery(s, include_tasks=False)
    w1 = Worker(s, tmp / "w1.log", concurrency=1).start("kill1")
    job, _ = jobs.submit(store, sender, "noop", params={"sleep_s": 4}, created_by="test")
    deadline = time.monotonic() + 20
    while store.job_state(job["id"]) != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    time.sleep(0.5)
    w1.stop(signal.SIGKILL)  # the whole worker, pool and all, mid-job
    assert store.job_state(job["id"]) == "running"
    w2 = Worker(s, tmp / "w2.log", concurrency=1).start("kill2")
    try:
        done = _wait(store, job["id"], 60)
        assert done["state"] == "succeeded", done
        assert (done["attempt"], done["lost"]) == (2, 1)  # attempt 1 was lost, attempt 2 finished
        assert int(raw_redis(s).get(store.k("noop-effects")) or 0) == 1  # the effect happened once
        messages = [e["message"] for e in store.events(job["id"], 0, 100)]
        assert any("re-queued" in m for m in messages)
    finally:
        w2.stop()


def test_api_under_load_while_workers_restart(rel) -> None:
    s, store, tmp = rel
    app = create_app(s)
    _, token = create_operator_token(Context(store, s), "load", ["admin"])
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{srv.server_port}/api/v1/jobs"
    accepted: list[str] = []
    statuses: list[int] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        sess = requests.Session()
        sess.headers["Authorization"] = f"Bearer {token}"
        n = 0
        while not stop.is_set() and n < 400:  # bounded in count and time
            n += 1
            r = sess.post(url, json={"kind": "noop"}, timeout=10)
            with lock:
                statuses.append(r.status_code)
                if r.status_code == 202:
                    accepted.append(r.json()["id"])

    workers = [Worker(s, tmp / "lw1.log", concurrency=2).start("load1")]
    threads = [threading.Thread(target=client) for _ in range(4)]
    for th in threads:
        th.start()
    try:
        for i in range(2):  # restart the workers twice under load
            time.sleep(1.5)
            workers[-1].stop(signal.SIGTERM)
            workers.append(Worker(s, tmp / f"lw{i + 2}.log", concurrency=2).start(f"load{i + 2}"))
        time.sleep(1.0)
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    try:
        assert statuses and all(code < 500 for code in statuses), sorted(set(statuses))
        assert len(accepted) == statuses.count(202) > 50
        finished = [_wait(store, j, 90)["state"] for j in accepted]
        assert finished.count("succeeded") == len(accepted)
    finally:
        workers[-1].stop()
        srv.shutdown()


def test_ssh_dropped_mid_command_fails_with_reason_others_unaffected(api, worker, simulator, sim_devices) -> None:
    devs = sim_devices(3, privilege="user")
    simulator.set_fault(devs[0].name, "drop")
    out = []
    for d in devs:
        status, body = api.call("POST", "/api/v1/devices", json={
            "name": d.name, "host": d.host, "port": d.port, "username": d.username})  # fmt: skip
        assert status == 202
        out.append(body["job"]["id"])
    results = [api.wait_job(j, timeout=60) for j in out]
    assert results[0]["state"] == "failed" and results[0]["error"]["reason"] == "connection_dropped"
    events = api.call("GET", f"/api/v1/jobs/{out[0]}/events")[1]["items"]
    assert any(e.get("type") == "retry" for e in events)  # transient: retried before failing
    assert [r["state"] for r in results[1:]] == ["succeeded", "succeeded"]


def test_failed_authentications_are_rate_limited(rel) -> None:
    s, store, _ = rel
    app = create_app(s.replace(auth_fail_limit=5))
    c = app.test_client()
    codes = [
        c.get(
            "/api/v1/devices", headers={"Authorization": "Bearer evco_wrong"}, environ_base={"REMOTE_ADDR": "10.9.9.9"}
        ).status_code
        for _ in range(7)
    ]
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
    r = c.get(
        "/api/v1/devices", headers={"Authorization": "Bearer evco_wrong"}, environ_base={"REMOTE_ADDR": "10.9.9.9"}
    )
    assert r.headers.get("Retry-After") and "too many" in r.get_json()["message"]
    # another client (with another token: failures are limited per token prefix too) is not affected
    assert (
        c.get(
            "/api/v1/devices", headers={"Authorization": "Bearer evco_other"}, environ_base={"REMOTE_ADDR": "10.9.9.8"}
        ).status_code
        == 401
    )


def test_cors_off_by_default_and_on_when_configured(rel) -> None:
    s, _, _ = rel
    r = create_app(s).test_client().get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = (
        create_app(s.replace(cors_origins="https://ops.example"))
        .test_client()
        .get("/healthz", headers={"Origin": "https://ops.example"})
    )
    assert r.headers["Access-Control-Allow-Origin"] == "https://ops.example"


def test_task_messages_carry_ids_not_secrets(rel) -> None:
    s, store, _ = rel
    app = create_app(s)
    _, token = create_operator_token(Context(store, s), "sec", ["admin"])
    raw = raw_redis(s)
    raw.delete("default")
    r = app.test_client().post("/api/v1/jobs", json={"kind": "noop"}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 202
    messages = raw.lrange("default", 0, -1)
    assert messages
    import base64

    for m in messages:
        msg = json.loads(m)
        body = json.loads(base64.b64decode(msg["body"]))
        assert body[0] == [r.get_json()["id"]] and body[1] == {}
        assert token not in m.decode()
    raw.delete("default")
    # the private key never leaves the data directory: no endpoint serves it
    key = Path(s.key_path).read_text() if Path(s.key_path).exists() else None
    spec = app.test_client().get("/api/v1/ssh-key").get_data(as_text=True)
    assert "PRIVATE KEY" not in spec and (key is None or key not in spec)


def test_redis_password_is_supported(tmp_path, settings) -> None:
    from evc.embedded import RedisServer
    from evc.errors import StoreUnavailable

    srv = RedisServer(tmp_path / "pw", password="s3cret-pw").start()
    try:
        ok = Store.from_settings(settings.replace(redis_url=srv.url))
        assert ok.ping()
        bad = Store.from_settings(settings.replace(redis_url=srv.url.replace("s3cret-pw", "wrong")))
        with pytest.raises(StoreUnavailable):
            bad.ping()
    finally:
        srv.stop()
