"""The API spine against a real Redis and a real Celery worker: auth, jobs, idempotency, paging."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from evc.auth import create_enrollment
from evc.context import Caller, Context
from evc.embedded import RedisServer
from evc.model import Device
from evc.store import Store
from tests.fixtures.helpers import present

pytestmark = pytest.mark.integration


def test_ssh_key_is_public(api) -> None:
    status, body = api.call("GET", "/api/v1/ssh-key", token=None)
    assert status == 200
    assert body["public_key"].startswith("ssh-ed25519 ")
    assert "authorized_keys" in body["install_command"]
    resp = api.client.get("/api/v1/ssh-key?format=text")
    assert resp.data.decode().strip() == body["public_key"]
    key = api.settings.key_path
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_openapi_and_health(api) -> None:
    status, spec = api.call("GET", "/api/v1/openapi.json", token=None)
    assert status == 200 and spec["openapi"].startswith("3.")
    assert "/api/v1/devices" in spec["paths"]
    assert api.call("GET", "/healthz", token=None)[0] == 200
    resp = api.client.get("/metrics")
    assert resp.status_code == 200


@pytest.mark.parametrize(
    "token,status,needle",
    [(None, 401, "missing bearer"), ("evco_wrong", 401, "invalid token"), ("garbage", 401, "invalid token")],
)
def test_auth_refused(api, token, status, needle) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = api.client.get("/api/v1/devices", headers=headers)
    assert resp.status_code == status
    assert needle in resp.get_json()["message"]


def test_read_scope_cannot_mutate(api) -> None:
    assert api.call("GET", "/api/v1/jobs", token="read")[0] == 200
    status, body = api.call("POST", "/api/v1/jobs", token="read", json={"kind": "noop"})
    assert status == 403 and "admin" in body["message"]


def test_token_revocation(api, redis_raw) -> None:
    status, tok = api.call("POST", "/api/v1/tokens", json={"name": "temp", "scopes": ["read"]})
    assert status == 201 and tok["token"].startswith("evco_")
    assert api.call("GET", "/api/v1/jobs", token=tok["token"])[0] == 200
    assert api.call("DELETE", f"/api/v1/tokens/{tok['id']}")[0] == 200
    status, body = api.call("GET", "/api/v1/jobs", token=tok["token"])
    assert status == 401 and "revoked" in body["message"]
    # stored hashed: the plaintext appears nowhere in Redis
    for key in redis_raw.scan_iter(f"{api.store.prefix}:token*"):
        if redis_raw.type(key) == b"hash":
            assert tok["token"].encode() not in b"".join(redis_raw.hgetall(key).values())


def test_enrollment_token_reuse_and_expiry(api, store, settings) -> None:
    ctx = Context(store, settings, caller=Caller("t"))
    rec, token = create_enrollment(ctx, ttl_s=60, max_uses=1, labels={"site": "lab"}, allow_networks=["127.0.0.0/8"])
    body: dict[str, Any] = {"name": f"enr-{time.time_ns()}", "host": "127.0.0.1", "port": 1, "username": "nobody"}
    status, out = api.call("POST", "/api/v1/devices", token=token, json=body)
    assert status == 202, out
    assert out["device"]["labels"] == {"site": "lab"}
    status, out = api.call("POST", "/api/v1/devices", token=token, json={**body, "name": body["name"] + "b"})
    assert status == 401 and "maximum number" in out["message"]
    # an enrollment token cannot read the registry
    assert api.call("GET", "/api/v1/devices", token=token)[0] == 403
    rec2, token2 = create_enrollment(ctx, ttl_s=60, max_uses=5, labels={}, allow_networks=["127.0.0.0/8"])
    store.update_enrollment(rec2["id"], expires_at=time.time() - 1)
    status, out = api.call("POST", "/api/v1/devices", token=token2, json={**body, "name": body["name"] + "c"})
    assert status == 401 and "expired" in out["message"]


def test_validation_errors_are_4xx_with_message(api) -> None:
    status, body = api.call("POST", "/api/v1/devices", json={
        "name": "ok-name", "host": "$(touch /tmp/pwned)", "username": "root;reboot", "port": 70000,
        "labels": {"bad key!": "v"}})  # fmt: skip
    assert status == 422
    assert set(body["errors"]["json"]) == {"host", "username", "port", "labels"}
    assert "host" in body["message"]
    status, body = api.call("POST", "/api/v1/devices", data="{not json", content_type="application/json")
    assert status == 400 and body["message"]
    status, body = api.call("POST", "/api/v1/devices", json={"name": "x", "host": "h", "username": "u", "extra": 1})
    assert status == 422 and "extra" in body["errors"]["json"]


def test_noop_job_runs_on_a_real_worker(api, worker) -> None:
    status, job = api.call("POST", "/api/v1/jobs", json={"kind": "noop"})
    assert status == 202 and job["state"] == "queued"
    done = api.wait_job(job["id"])
    assert done["state"] == "succeeded"
    assert done["started_at"] and done["finished_at"] >= done["started_at"]
    status, ev = api.call("GET", f"/api/v1/jobs/{job['id']}/events")
    assert [e["seq"] for e in ev["items"]] == list(range(1, len(ev["items"]) + 1))
    assert ev["items"][-1]["state"] == "succeeded"


def test_idempotency_key_returns_same_job(api) -> None:
    key = f"idem-{time.time_ns()}"
    s1, j1 = api.call("POST", "/api/v1/jobs", json={"kind": "noop"}, headers={"Idempotency-Key": key})
    s2, j2 = api.call("POST", "/api/v1/jobs", json={"kind": "noop"}, headers={"Idempotency-Key": key})
    assert s1 == s2 == 202 and j1["id"] == j2["id"]
    s3, j3 = api.call("POST", "/api/v1/jobs", json={"kind": "noop"}, headers={"Idempotency-Key": key + "x"})
    assert j3["id"] != j1["id"]


def test_cancel_queued_job(api, store, settings) -> None:
    from evc import jobs

    class Hold:  # a sender that holds the task: the job stays queued
        def send_task(self, *a, **k):
            return None

    job, _ = jobs.submit(store, Hold(), "noop", created_by="test")
    status, out = api.call("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert status == 202 and out["state"] == "cancelled"
    status, out = api.call("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert status == 409 and "already cancelled" in out["message"]


def test_pagination_and_filters(api, store) -> None:
    from evc import jobs

    class Hold:
        def send_task(self, *a, **k):
            return None

    made = [jobs.submit(store, Hold(), "facts", created_by="pager")[0]["id"] for _ in range(7)]
    status, p1 = api.call("GET", "/api/v1/jobs?kind=facts&limit=3")
    assert status == 200 and len(p1["items"]) == 3 and p1["total"] >= 7 and p1["next_offset"] == 3
    status, p2 = api.call("GET", f"/api/v1/jobs?kind=facts&limit=3&offset={p1['next_offset']}")
    assert not {j["id"] for j in p1["items"]} & {j["id"] for j in p2["items"]}
    assert p1["items"][0]["id"] == made[-1]  # newest first
    status, q = api.call("GET", "/api/v1/jobs?state=queued&kind=facts&limit=500")
    assert all(j["state"] == "queued" for j in q["items"])
    assert api.call("GET", "/api/v1/jobs?limit=0")[0] == 422


def test_audit_log_records_mutations(api) -> None:
    api.call("POST", "/api/v1/tokens", json={"name": "audited", "scopes": ["read"]})
    status, log = api.call("GET", "/api/v1/audit?limit=5")
    assert status == 200
    entry = log["items"][0]
    assert entry["action"] == "POST /api/v1/tokens" and entry["actor"] == "operator:test-admin"
    assert "evco_" not in str(log)


def test_state_survives_redis_restart(tmp_path, settings) -> None:
    srv = RedisServer(tmp_path / "r").start()
    try:
        st = Store.from_settings(settings.replace(redis_url=srv.url))
        from evc import jobs
        from evc.auth import create_operator_token, hash_token
        from evc.context import Context

        class Hold:
            def send_task(self, *a, **k):
                return None

        job, _ = jobs.submit(st, Hold(), "noop", created_by="x")
        st.add_event(job["id"], {"message": "hello"})
        dev = st.create_device(
            cast(
                Device,  # a partial record: what this test reads back
                {
                    "id": "dev_1",
                    "name": "persist",
                    "host": "h",
                    "port": 22,
                    "username": "u",
                    "created_at": 1.0,
                    "state": "online",
                },
            ),
            "hash1",
        )
        rec, tok = create_operator_token(Context(st, settings), "persist", ["read"])
        time.sleep(1.2)  # appendfsync everysec
        srv.restart()
        st2 = Store.from_settings(settings.replace(redis_url=srv.url))
        assert st2.get_job(job["id"])["kind"] == "noop"
        assert st2.events(job["id"])[0]["message"] == "hello"
        assert st2.get_device(dev["id"])["name"] == "persist"
        assert present(st2.token_by_hash(hash_token(tok)))["id"] == rec["id"]
    finally:
        srv.stop()


def test_finished_jobs_are_counted_in_metrics(store) -> None:
    from evc import jobs
    from evc.metrics import REGISTRY

    def count() -> float:
        return REGISTRY.get_sample_value("evc_jobs_total", {"kind": "noop", "state": "succeeded"}) or 0.0

    before = count()
    job = jobs.new_job("noop")
    store.create_job(job)
    run = jobs.JobRun.start(store, job["id"])
    assert run is not None and run.succeed()
    assert count() == before + 1
    assert (REGISTRY.get_sample_value("evc_job_duration_seconds_count", {"kind": "noop"}) or 0) >= 1


def test_a_retried_target_counts_once_and_progress_never_passes_100(store) -> None:
    """A registration retried by its task (the same target's result recorded again) once showed
    `3/1`, `300%`: each target counts once, the latest result wins."""
    from evc import jobs

    job = jobs.new_job("noop", targets=["dev_a"])
    store.create_job(job)
    for attempt in range(3):
        run = jobs.JobRun.start(store, job["id"])
        assert run is not None
        run.result("dev_a", {"ok": attempt == 2, "attempt": attempt})
    prog = store.get_job(job["id"])["progress"]
    assert (prog["done"], prog["total"], prog["percent"]) == (1, 1, 100.0)
    assert store.results(job["id"])["dev_a"] == {"ok": True, "attempt": 2}
    run = jobs.JobRun.start(store, job["id"])
    assert run is not None
    run.progress(done=5)
    assert store.get_job(job["id"])["progress"]["percent"] == 100.0


def test_docs_page_works_air_gapped(api) -> None:
    """The Swagger UI page names no external host; every script and stylesheet it loads comes
    from EVC itself and answers 200."""
    import re

    page = api.client.get("/api/v1/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert len(urls) >= 3, html
    assert not re.search(r"https?://", html), "the docs page must not load anything from the internet"
    for url in urls:
        asset = api.client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.get_data()) > 1000, url
    assert api.client.get("/api/v1/docs/assets/../../app.py").status_code == 404


def test_a_cached_token_changed_elsewhere_commits_nothing(api) -> None:
    """Job submission reuses an operator token this API process resolved (``auth_cache_s``);
    what it writes commits only while the token is unchanged. Revoked or narrowed in the store
    by another process (no call through this API, whose cache keeps the old record), the next
    submission gets what the token now deserves and no job is written."""
    _, tok = api.call("POST", "/api/v1/tokens", json={"name": f"cached{time.time_ns()}", "scopes": ["admin"]})
    status, job = api.call("POST", "/api/v1/jobs", json={"kind": "noop"}, token=tok["token"])  # resolved, cached
    assert status == 202 and api.store.get_job(job["id"])["kind"] == "noop"
    status, job = api.call("POST", "/api/v1/jobs", json={"kind": "noop"}, token=tok["token"])  # from the cache
    assert status == 202 and api.store.get_job(job["id"])["created_by"].endswith(tok["name"])
    total = api.store.list_jobs(0, 1)[1]
    api.store.update_token(tok["id"], scopes=["read"])
    status, body = api.call("POST", "/api/v1/jobs", json={"kind": "noop"}, token=tok["token"])
    assert status == 403 and "admin" in body["message"]
    api.store.update_token(tok["id"], scopes=["admin"], revoked=True)
    status, body = api.call("POST", "/api/v1/jobs", json={"kind": "noop"}, token=tok["token"])
    assert status == 401 and "revoked" in body["message"]
    assert api.store.list_jobs(0, 1)[1] == total  # nothing written by either refused request
    audit = api.call("GET", "/api/v1/audit?limit=5")[1]["items"]
    assert not any(e.get("status") in (401, 403) and e.get("actor", "").endswith(tok["name"]) for e in audit)
