"""The API against a hostile caller: the last admin, heartbeats of unregistered devices, rate
limits that never lock out valid tokens, enrollment limits, scoped idempotency keys, secrets at
rest. Real Redis, the real Flask app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from evc.api.app import create_app

from evc import auth
from evc.context import Context
from evc.model import Device
from evc.settings import Settings
from evc.store import Store, new_id
from tests.fixtures.helpers import own_address, present
from tests.fixtures.services import raw_redis

pytestmark = pytest.mark.integration


class Client:
    """A private app on its own key prefix (nothing shared with the session's API fixture)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.raw = raw_redis(settings)  # the test's own view of Redis
        self.app = create_app(settings)
        self.client = self.app.test_client()
        _, self.admin = auth.create_operator_token(Context(self.store, settings), "admin", ["admin"])

    def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}) or {})
        tok = self.admin if token is None else token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        resp = self.client.open(path, method=method, headers=headers, **kw)
        return resp.status_code, resp.get_json(silent=True)

    def wipe(self) -> None:
        for key in self.raw.scan_iter(f"{self.store.prefix}:*", count=1000):
            self.raw.delete(key)


@pytest.fixture()
def private(settings: Settings, redis_url: str) -> Iterator[Client]:
    """An app whose Redis database no worker reads: what it enqueues never runs."""
    base = redis_url.rsplit("/", 1)[0]
    c = Client(settings.replace(redis_url=f"{base}/6", key_prefix=new_id("sec")))
    yield c
    c.wipe()


# ---------------------------------------------------------------------- 13: the last admin
def test_the_last_admin_token_cannot_be_revoked(private: Client) -> None:
    first = auth.hash_token(private.admin)
    first_id = private.store.token_by_hash(first)["id"]  # type: ignore[index]
    status, body = private.call("DELETE", f"/api/v1/tokens/{first_id}")
    assert status == 409 and "last admin" in body["message"], body
    assert private.call("GET", "/api/v1/tokens")[0] == 200  # still works

    status, second = private.call("POST", "/api/v1/tokens", json={"name": "second", "scopes": ["admin"]})
    assert status == 201
    reader = auth.create_operator_token(Context(private.store, private.settings), "r", ["read"])[0]
    assert private.call("DELETE", f"/api/v1/tokens/{reader['id']}")[0] == 200  # not an admin: fine
    assert private.call("DELETE", f"/api/v1/tokens/{first_id}")[0] == 200  # another admin is left
    status, body = private.call("DELETE", f"/api/v1/tokens/{second['id']}", token=second["token"])
    assert status == 409 and "last admin" in body["message"]
    assert private.call("GET", "/api/v1/tokens", token=second["token"])[0] == 200


def test_an_expired_admin_does_not_count_as_another_admin(private: Client) -> None:
    first_id = private.store.token_by_hash(auth.hash_token(private.admin))["id"]  # type: ignore[index]
    rec, _ = auth.create_operator_token(
        Context(private.store, private.settings), "old", ["admin"], expires_at=time.time() - 10
    )
    status, body = private.call("DELETE", f"/api/v1/tokens/{first_id}")
    assert status == 409, body
    assert private.call("DELETE", "/api/v1/tokens/tok_0000000000000000")[0] == 404


# ---------------------------------------------------------------------- 12: heartbeats
def test_heartbeat_from_a_device_evc_never_reached_is_refused(private: Client) -> None:
    token = auth.make_token(auth.PREFIX_DEVICE)
    dev = cast(Device, {
        "id": new_id("dev"), "name": "never-reached", "host": "192.0.2.10", "port": 22, "username": "edge",
        "host_key": None, "state": "unreachable", "health": None, "last_seen": None, "cluster_id": None,
        "labels": {}, "created_at": time.time(), "registered_at": None,
    })  # fmt: skip
    private.store.create_device(dev, auth.hash_token(token))
    status, body = private.call("POST", "/api/v1/devices/self/heartbeat", token=token, json={"load1": 0.1})
    assert status == 409 and "registration" in body["message"], body
    after = private.store.get_device(dev["id"])
    assert after["state"] == "unreachable" and after["last_seen"] is None

    private.store.update_device(dev["id"], host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEKEYEXAMPLEKEY")
    status, body = private.call("POST", "/api/v1/devices/self/heartbeat", token=token, json={"load1": 0.1})
    assert status == 200 and body["state"] == "online", body


# ---------------------------------------------------------------------- 5: rate limits
@pytest.fixture()
def limited(settings: Settings, redis_url: str) -> Iterator[Client]:
    base = redis_url.rsplit("/", 1)[0]
    c = Client(settings.replace(redis_url=f"{base}/6", key_prefix=new_id("rl"), auth_fail_limit=3))
    yield c
    c.wipe()


def _bad() -> str:
    return auth.make_token(auth.PREFIX_OPERATOR)


def test_failed_authentications_never_lock_out_a_valid_token(limited: Client) -> None:
    for _ in range(3):
        assert limited.call("GET", "/api/v1/jobs", token=_bad())[0] == 401
    status, body = limited.call("GET", "/api/v1/jobs", token=_bad())
    assert status == 429 and "valid tokens still work" in body["message"], body
    # the same source, past its limit: a valid token is served
    assert limited.call("GET", "/api/v1/jobs")[0] == 200
    status, _ = limited.call("GET", "/api/v1/jobs", token=_bad())
    assert status == 429


def test_x_forwarded_for_counts_only_from_a_trusted_proxy(limited: Client) -> None:
    spoofed = [{"X-Forwarded-For": f"10.9.0.{i}"} for i in range(6)]
    # no trusted proxy (the default): the header is ignored; every failure counts against the peer
    for h in spoofed[:3]:
        assert limited.call("GET", "/api/v1/jobs", token=_bad(), headers=h)[0] == 401
    assert limited.call("GET", "/api/v1/jobs", token=_bad(), headers=spoofed[3])[0] == 429
    limited.wipe()

    proxied = Client(limited.settings.replace(trusted_proxies="127.0.0.1/32"))
    for _ in range(4):
        proxied.call("GET", "/api/v1/jobs", token=_bad(), headers={"X-Forwarded-For": "10.9.0.1"})
    assert proxied.call("GET", "/api/v1/jobs", token=_bad(), headers={"X-Forwarded-For": "10.9.0.1"})[0] == 429
    # another client behind the same proxy is not punished for 10.9.0.1's failures
    assert proxied.call("GET", "/api/v1/jobs", token=_bad(), headers={"X-Forwarded-For": "10.9.0.2"})[0] == 401
    # ... and the limited client's valid token still works
    assert proxied.call("GET", "/api/v1/jobs", headers={"X-Forwarded-For": "10.9.0.1"})[0] == 200
    h = {"X-Forwarded-For": "10.9.0.3"}
    assert proxied.call("POST", "/api/v1/tokens", json={"name": "x", "scopes": ["read"]}, headers=h)[0] == 201
    assert proxied.call("GET", "/api/v1/audit")[1]["items"][0]["ip"] == "10.9.0.3"


def test_failures_are_also_limited_per_token_prefix(limited: Client) -> None:
    proxied = Client(limited.settings.replace(trusted_proxies="127.0.0.1"))
    stem = _bad()[:10]
    codes = [
        proxied.call(
            "GET", "/api/v1/jobs", token=stem + auth.make_token("")[:30], headers={"X-Forwarded-For": f"10.8.0.{i}"}
        )[0]
        for i in range(5)
    ]
    assert codes[:3] == [401, 401, 401] and codes[-1] == 429, codes  # many sources, one prefix


def test_client_address_from_forwarded_for() -> None:
    trusted = "10.0.0.0/24, 127.0.0.1"
    assert auth.client_address("192.0.2.5", "1.2.3.4", trusted) == "192.0.2.5"  # untrusted peer
    assert auth.client_address("127.0.0.1", "1.2.3.4", "") == "127.0.0.1"  # none trusted
    assert auth.client_address("127.0.0.1", "6.6.6.6, 1.2.3.4", trusted) == "1.2.3.4"  # nearest hop
    assert auth.client_address("127.0.0.1", "1.2.3.4, 10.0.0.7", trusted) == "1.2.3.4"  # skip our proxies
    assert auth.client_address("127.0.0.1", "nonsense", trusted) == "127.0.0.1"


# ---------------------------------------------------------------------- 6: enrollment tokens
def _enroll(c: Client, **body: Any) -> str:
    status, out = c.call("POST", "/api/v1/enrollments", json=body)
    assert status == 201, out
    return str(out["token"])


def _register(c: Client, token: str, host: str, **extra: Any) -> tuple[int, Any]:
    body = {"name": new_id("d").replace("_", "-"), "host": host, "username": "edge", **extra}
    return c.call("POST", "/api/v1/devices", token=token, json=body)


def test_enrollment_labels_cannot_be_overridden(private: Client) -> None:
    token = _enroll(private, labels={"site": "lab"}, max_uses=2)
    status, body = _register(private, token, "192.0.2.10", labels={"site": "prod"})
    assert status == 403 and "site" in body["message"], body
    status, body = _register(private, token, "192.0.2.10", labels={"room": "1", "site": "lab"})
    assert status == 202, body
    assert body["device"]["labels"] == {"site": "lab", "room": "1"}


def test_enrollment_may_not_target_loopback_link_local_or_the_controller(private: Client) -> None:
    token = _enroll(private, max_uses=1)
    bad = ["127.0.0.1", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::ffff:127.0.0.1"]
    own = own_address()
    if own:
        bad.append(own)
    for host in bad:
        status, body = _register(private, token, host)
        assert status == 403 and host.split(":")[-1] in body["message"], (host, body)
    status, body = _register(private, token, "192.0.2.10", jump_host={"host": "127.0.0.1", "username": "j"})
    assert status == 403 and "jump_host" in body["message"], body
    # refusals spend no use: the one use is still there
    assert _register(private, token, "192.0.2.10")[0] == 202
    # an operator may still register the simulator on loopback
    assert _register(private, private.admin, "127.0.0.1")[0] == 202


def test_enrollment_networks_are_an_allow_list_with_explicit_opt_in(private: Client) -> None:
    token = _enroll(private, allow_networks=["10.20.0.0/16"], max_uses=5)
    status, body = _register(private, token, "192.0.2.10")
    assert status == 403 and "outside" in body["message"], body
    assert _register(private, token, "10.20.3.4")[0] == 202
    wide = _enroll(private, allow_networks=["0.0.0.0/0"])
    assert _register(private, wide, "127.0.0.1")[0] == 403  # "anything" does not opt in to loopback
    lo = _enroll(private, allow_networks=["127.0.0.0/8"])
    assert _register(private, lo, "127.0.0.1")[0] == 202
    status, body = private.call("POST", "/api/v1/enrollments", json={"allow_networks": ["not-a-net"]})
    assert status == 422 and "allow_networks" in body["errors"]["json"], body
    shown = private.call("GET", "/api/v1/enrollments")[1]["items"]
    assert ["127.0.0.0/8"] in [e["allow_networks"] for e in shown]


# ---------------------------------------------------------------------- 2: secrets at rest
SECRET_PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.debug: {msg: "never run here"}
"""
SECRET_META = """\
description: a playbook with a secret parameter
min_privilege: user
params:
  type: object
  additionalProperties: false
  required: [password]
  properties:
    password: {type: string, secret: true, pattern: "^[A-Za-z0-9]{8,64}$"}
    note: {type: string, default: ""}
"""


def _dump(r: Any) -> bytes:
    """Every value of every key, as a leaked dump would show it (Celery bodies base64-decoded)."""
    import base64
    import json

    out: list[bytes] = []
    for key in r.scan_iter(count=1000):
        t = r.type(key).decode()
        vals: list[bytes] = [key]
        if t == "string":
            vals.append(r.get(key))
        elif t == "hash":
            vals += [x for kv in r.hgetall(key).items() for x in kv]
        elif t == "list":
            vals += r.lrange(key, 0, -1)
        elif t == "set":
            vals += list(r.smembers(key))
        elif t == "zset":
            vals += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif t == "stream":
            vals += [x for _, f in r.xrange(key) for kv in f.items() for x in kv]
        for v in vals:
            out.append(v)
            try:
                body = json.loads(v).get("body")
                out.append(base64.b64decode(body))
            except (ValueError, TypeError, AttributeError):
                pass
    return b"\n".join(out)


def test_secrets_are_sealed_at_rest_write_only_and_no_token_is_stored_in_clear(
    settings: Settings, redis_url: str, tmp_path: Any
) -> None:
    from evc import levels
    from evc.provisioning import service
    from evc.vault import MASK, key_path

    (tmp_path / "secretive.yml").write_text(SECRET_PLAYBOOK)
    (tmp_path / "secretive.meta.yml").write_text(SECRET_META)
    base = redis_url.rsplit("/", 1)[0]
    s = settings.replace(redis_url=f"{base}/5", key_prefix=new_id("vault"), playbook_dirs=str(tmp_path))
    with raw_redis(s) as r:
        r.flushdb()
    c = Client(s)
    try:
        k3s_secret, k3s_new, password = "K10abcSECRETjoin", "K10otherSECRETjoin", "Pa55w0rdSECRET"
        _, reader = auth.create_operator_token(Context(c.store, c.settings), "reader", ["read"])
        enroll = _enroll(c, allow_networks=["192.0.2.0/24"])
        status, cl = c.call("POST", "/api/v1/clusters", json={
            "name": "k", "profile": "k3s",
            "vars": {"k3s-agent": {"token": k3s_secret, "server_url": "https://10.0.0.5:6443"}},
        })  # fmt: skip
        assert status == 201, cl
        assert cl["vars"]["k3s-agent"] == {"token": MASK, "server_url": "https://10.0.0.5:6443"}
        for tok in (c.admin, reader):
            shown = c.call("GET", f"/api/v1/clusters/{cl['id']}", token=tok)[1]
            assert shown["vars"]["k3s-agent"]["token"] == MASK and "join_token" not in shown
        # the masked value sent back keeps the secret; a new value replaces it
        status, out = c.call("PATCH", f"/api/v1/clusters/{cl['id']}", json={"vars": cl["vars"]})
        assert status == 200 and out["vars"]["k3s-agent"]["token"] == MASK
        stored = c.store.get_cluster(cl["id"])
        assert levels.cluster_vars(c.store, c.settings, stored, "k3s-agent", {})["token"] == k3s_secret
        c.call("PATCH", f"/api/v1/clusters/{cl['id']}", json={"vars": {"k3s-agent": {"token": k3s_new}}})
        stored = c.store.get_cluster(cl["id"])
        assert levels.cluster_vars(c.store, c.settings, stored, "k3s-agent", {})["token"] == k3s_new
        # the join token EVC generates for the k3s server is sealed too
        join = levels.cluster_vars(c.store, c.settings, stored, "k3s-server", {})["token"]
        assert join and join not in str(c.store.get_cluster(cl["id"]))

        status, reg = _register(c, c.admin, "192.0.2.20")
        assert status == 202, reg
        dev_token, dev_id = reg["token"], reg["device"]["id"]
        assert _register(c, enroll, "192.0.2.21")[0] == 202
        c.store.update_device(dev_id, state="online", privilege="user", host_key="ssh-ed25519 AAAA")
        body = {"playbook": "secretive", "targets": [dev_id], "extra_vars": {"password": password}}
        status, job = c.call("POST", "/api/v1/provision", json=body)
        assert status == 202, job
        assert job["params"]["extra_vars"]["password"] == MASK
        assert c.call("GET", f"/api/v1/jobs/{job['id']}", token=reader)[1]["params"]["extra_vars"]["password"] == MASK
        # a retry re-uses the sealed secrets without opening them; a worker opens them
        c.store.transition_job(job["id"], "failed", ["queued"])
        c.store.set_result(job["id"], dev_id, {"status": "failed"})
        status, again = c.call("POST", f"/api/v1/jobs/{job['id']}/retry")
        assert status == 202, again
        assert again["params"]["extra_vars"]["password"] == MASK
        assert service._secrets(c.store, c.settings, again["params"]) == {"password": password}

        dump = _dump(c.raw)
        for clear in (k3s_secret, k3s_new, join, password, c.admin, reader, enroll, dev_token):
            assert clear.encode() not in dump, f"{clear[:6]}... found in clear in Redis"
        assert key_path(c.settings).stat().st_mode & 0o777 == 0o600
    finally:
        c.raw.flushdb()


# ---------------------------------------------------------------------- 11: idempotency keys
def test_idempotency_key_is_scoped_to_caller_endpoint_and_body(private: Client) -> None:
    key = {"Idempotency-Key": "same-key"}
    status, first = private.call("POST", "/api/v1/jobs", json={"kind": "noop"}, headers=key)
    assert status == 202
    # the same request (even spelled differently) answers the same job
    again = private.call(
        "POST", "/api/v1/jobs", data='{ "kind" : "noop" }', content_type="application/json", headers=key
    )
    assert again[0] == 202 and again[1]["id"] == first["id"]
    # the same key with another body is refused, never answered with the first job
    status, body = private.call("POST", "/api/v1/jobs", json={"kind": "noop", "params": {"sleep_s": 1}}, headers=key)
    assert status == 409 and "different request" in body["message"], body
    # another caller has its own keys
    other = auth.create_operator_token(Context(private.store, private.settings), "other", ["admin"])[1]
    status, theirs = private.call("POST", "/api/v1/jobs", json={"kind": "noop"}, headers=key, token=other)
    assert status == 202 and theirs["id"] != first["id"]
    # another endpoint has its own keys: a registration is not answered with the noop job
    dev = {"name": "idem-dev", "host": "192.0.2.30", "username": "edge"}
    status, reg = private.call("POST", "/api/v1/devices", json=dev, headers=key)
    assert status == 202 and reg["job"]["id"] != first["id"]
    assert private.call("POST", "/api/v1/devices", json=dev, headers=key)[1]["device"]["id"] == reg["device"]["id"]
    status, body = private.call("POST", "/api/v1/devices", json={**dev, "name": "idem-dev2"}, headers=key)
    assert status == 409 and "Idempotency-Key" in body["message"], body
    assert private.call("POST", "/api/v1/jobs", json={"kind": "noop"}, headers={"Idempotency-Key": "x" * 300})[0] == 422


# ---------------------------------------------------------------------- 15: ids in paths
def test_ids_outside_the_id_alphabet_are_4xx_on_every_id_route(private: Client) -> None:
    """``job_x:events`` would name a list in Redis (a WRONGTYPE 500 before): every route with an
    id answers 4xx for ids with ':' and other characters, and the OpenAPI schema says so."""
    status, job = private.call("POST", "/api/v1/jobs", json={"kind": "noop"})
    status, cl = private.call("POST", "/api/v1/clusters", json={"name": "ids", "profile": "direct"})
    assert status == 201
    hostile = [f"{job['id']}:events", f"{job['id']}:results", f"{cl['id']}:members", "a:b", "..", "a.b", "x" * 65]
    rules = [r for r in private.app.url_map.iter_rules() if "id" in str(r.rule) and "<id:" in r.rule]
    assert len(rules) >= 15
    for rule in rules:
        for bad in hostile:
            path = rule.rule
            for arg in rule.arguments:
                path = path.replace(f"<id:{arg}>", bad)
            for method in sorted(present(rule.methods) - {"HEAD", "OPTIONS"}):
                status, body = private.call(method, path, json={})
                assert 400 <= status < 500 and body["message"], (method, path, status, body)
    # ids in bodies and stores' own lookups: not found, never a 500
    status, body = private.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": "d:x"})
    assert 400 <= status < 500, body
    status, body = private.call("POST", "/api/v1/provision", json={"playbook": "facts", "targets": [f"{job['id']}:x"]})
    assert 400 <= status < 500, body
    spec = private.call("GET", "/api/v1/openapi.json")[1]
    for path, ops in spec["paths"].items():
        for param in ops.get("parameters", []):
            if param["in"] == "path" and param["name"].endswith("_id"):
                assert param["schema"]["pattern"] and param["schema"]["maxLength"] == 64, (path, param)
