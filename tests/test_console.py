"""The web console at /ui over Flask's test client and a real Redis: sign-in exchanges a token
for a server-side session (HttpOnly, SameSite=Strict cookie), every form needs its CSRF token,
a read token's console is read-only, a revoked token ends its sessions, console actions are
audited like API calls, every page renders. (tests/test_console_browser.py drives it in a real
headless Chromium against a real fleet.)"""

from __future__ import annotations

import re
from typing import Any, cast

import pytest
from evc.api.ui.session import COOKIE

from evc.model import Device
from evc.store import new_id

pytestmark = pytest.mark.integration


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:2000]
    return m.group(1)


def sign_in(client: Any, token: str) -> str:
    """Sign in on *client*; the session's CSRF token."""
    page = client.get("/ui/sign-in").get_data(as_text=True)
    resp = client.post("/ui/sign-in", data={"token": token, "csrf": _csrf(page), "next": "/ui/jobs"})
    assert resp.status_code == 303, resp.get_data(as_text=True)[:2000]
    assert resp.headers["Location"].endswith("/ui/jobs")
    cookie = next(c for c in resp.headers.getlist("Set-Cookie") if c.startswith(COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    return _csrf(client.get("/ui/fleet").get_data(as_text=True))


def test_sign_in_sessions_csrf_and_read_only(api: Any, flush: None) -> None:
    client = api.app.test_client()
    assert client.get("/ui/fleet").status_code == 302  # to the sign-in page
    page = client.get("/ui/sign-in").get_data(as_text=True)
    assert '<html lang="en">' in page
    bad = client.post("/ui/sign-in", data={"token": "evco_nope", "csrf": _csrf(page)})
    assert bad.status_code == 401 and "invalid token" in bad.get_data(as_text=True)
    page = client.get("/ui/sign-in").get_data(as_text=True)
    assert client.post("/ui/sign-in", data={"token": api.admin, "csrf": "forged"}).status_code == 403
    csrf = sign_in(client, api.admin)
    _, job = api.call("POST", "/api/v1/jobs", json={"kind": "noop"})  # queued: no worker here
    assert client.post(f"/ui/jobs/{job['id']}/cancel", data={}).status_code == 403  # no CSRF token
    assert client.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf": "x" + csrf}).status_code == 403
    assert client.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf": csrf}).status_code == 303
    assert api.call("GET", f"/api/v1/jobs/{job['id']}")[1]["state"] == "cancelled"
    audit = api.store.audit_log(0, 5)[0]
    assert any(a["action"] == f"POST /ui/jobs/{job['id']}/cancel" and a["actor"] == "operator:test-admin"
               for a in audit)  # fmt: skip
    # a read token: pages yes, actions no, no admin pages
    reader = api.app.test_client()
    rcsrf = sign_in(reader, api.reader)
    assert "(read-only)" in reader.get("/ui/fleet").get_data(as_text=True)
    _, job2 = api.call("POST", "/api/v1/jobs", json={"kind": "noop"})
    assert reader.post(f"/ui/jobs/{job2['id']}/cancel", data={"csrf": rcsrf}).status_code == 403
    assert reader.get("/ui/tokens").status_code == 403
    assert api.call("GET", f"/api/v1/jobs/{job2['id']}")[1]["state"] == "queued"
    # sign out ends the session; so does revoking the token behind one
    assert client.post("/ui/sign-out", data={"csrf": csrf}).status_code == 303
    assert client.get("/ui/fleet").status_code == 302
    _, tok = api.call("POST", "/api/v1/tokens", json={"name": "ui-reader", "scopes": ["read"]})
    other = api.app.test_client()
    sign_in(other, tok["token"])
    api.call("DELETE", f"/api/v1/tokens/{tok['id']}")
    assert other.get("/ui/fleet").status_code == 302


def test_every_page_renders_and_actions_go_through_the_services(api: Any, flush: None) -> None:
    client = api.app.test_client()
    csrf = sign_in(client, api.admin)
    _, job = api.call("POST", "/api/v1/jobs", json={"kind": "noop"})
    _, cl = api.call("POST", "/api/v1/clusters", json={"name": "ui-lab", "profile": "direct", "target_level": 0})
    for path in ("/ui/fleet", "/ui/fleet?state=online&label=site%3Dlab", "/ui/jobs", "/ui/jobs?kind=noop&state=queued",
                 f"/ui/jobs/{job['id']}", "/ui/clusters", f"/ui/clusters/{cl['id']}", "/ui/fl", "/ui/deployments",
                 "/ui/tokens", "/ui/static/console.css", "/ui/static/console.js"):  # fmt: skip
        resp = client.get(path)
        assert resp.status_code == 200, (path, resp.get_data(as_text=True)[:3000])
        assert 'name="csrf" value=""' not in resp.get_data(as_text=True), path  # every form carries its token
    assert client.get("/ui/devices/dev_nope").status_code == 404
    page = client.get(f"/ui/jobs/{job['id']}").get_data(as_text=True)
    assert "data-stream=" in page  # a queued job streams its events live
    created = client.post("/ui/tokens", data={"csrf": csrf, "name": "from-ui", "scopes": ["read"]})
    assert created.status_code == 201 or created.status_code == 200
    assert re.search(r'value="evco_[\w-]+"', created.get_data(as_text=True))
    bad = client.post("/ui/tokens", data={"csrf": csrf, "name": "", "scopes": ["nope"]})
    assert bad.status_code == 422 and "invalid input" in bad.get_data(as_text=True)
    enr = client.post("/ui/enrollments", data={"csrf": csrf, "max_uses": "2", "ttl_s": "600", "labels": "site=lab"})
    assert re.search(r'value="evce_[\w-]+"', enr.get_data(as_text=True))
    # the event stream of a finished job: its events, then the end
    client.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf": csrf})
    body = client.get(f"/ui/jobs/{job['id']}/stream").get_data(as_text=True)
    assert "event: job-event" in body and body.rstrip().endswith('data: {"state": "cancelled"}')
    resumed = client.get(f"/ui/jobs/{job['id']}/stream", headers={"Last-Event-ID": "1000"}).get_data(as_text=True)
    assert "job-event" not in resumed and "event: end" in resumed


def test_a_dry_run_shows_each_hosts_drift_and_its_diff(api: Any, flush: None) -> None:
    client = api.app.test_client()
    sign_in(client, api.admin)
    _, job = api.call("POST", "/api/v1/jobs", json={"kind": "noop"})
    drift = [{"task": "write the motd", "action": "copy", "diff": "--- before\n+++ after\n-old <b>\n+new"}]
    api.store.set_result(job["id"], "dev_a", {"status": "ok", "ok": 3, "changed": 1, "failed": 0, "unreachable": 0,
                                              "drift": drift, "in_sync": False})  # fmt: skip
    api.store.set_result(job["id"], "dev_b", {"status": "ok", "drift": [], "in_sync": True})
    page = client.get(f"/ui/jobs/{job['id']}").get_data(as_text=True)
    assert "drift: write the motd" in page and "-old &lt;b&gt;\n+new" in page  # the diff, escaped
    assert "in sync" in page and "ok 3 · changed 1 · failed 0" in page


def test_raise_level_and_retry_go_through_the_services(api: Any, flush: None) -> None:
    client = api.app.test_client()
    csrf = sign_in(client, api.admin)
    _, cl = api.call("POST", "/api/v1/clusters", json={"name": "ui-levels", "profile": "direct", "target_level": 0})
    empty = client.post(f"/ui/clusters/{cl['id']}/level", data={"csrf": csrf, "target": "2"})
    assert empty.status_code == 409 and "has no members" in empty.get_data(as_text=True)  # the service's refusal
    dev = api.store.create_device(cast(Device, {
        "id": new_id("dev"), "name": "ui-member", "host": "127.0.0.1", "port": 1, "username": "edge", "host_key": "k",
        "state": "online", "privilege": "root", "level": 0, "labels": {}, "cluster_id": None, "health": None,
        "created_at": 0.0}), token_hash="h-ui-member")  # fmt: skip
    assert api.store.claim_membership(cl["id"], dev["id"]) is None
    page = client.get(f"/ui/clusters/{cl['id']}").get_data(as_text=True)
    assert "ui-member" in page and "at target" in page  # the level it reached, and why not higher
    resp = client.post(f"/ui/clusters/{cl['id']}/level", data={"csrf": csrf, "target": "2", "check": "on"})
    assert resp.status_code == 303, resp.get_data(as_text=True)[:2000]
    job_id = resp.headers["Location"].rsplit("/", 1)[1]
    _, job = api.call("GET", f"/api/v1/jobs/{job_id}")
    assert job["kind"] == "level" and job["params"]["target"] == 2 and job["params"]["check"] is True
    assert job["created_by"] == "operator:test-admin"
    bad = client.post(f"/ui/clusters/{cl['id']}/level", data={"csrf": csrf, "target": "9"})
    assert bad.status_code == 422 and "target" in bad.get_data(as_text=True)
    _, noop = api.call("POST", "/api/v1/jobs", json={"kind": "noop"})
    refused = client.post(f"/ui/jobs/{noop['id']}/retry", data={"csrf": csrf})  # not a provision job
    assert refused.status_code >= 400 and "<h1>Error" in refused.get_data(as_text=True)
