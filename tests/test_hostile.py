"""Hostile input: 4xx with a message, nothing executed, nothing stored; schemathesis over the
OpenAPI document finds no 5xx and no response that breaks its schema.

These tests use their own Redis database, so no worker ever sees what they enqueue: generated
host names must never become SSH connections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import schemathesis
import schemathesis.checks
from evc.api.app import create_app
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from schemathesis.core.result import Ok

from evc.auth import create_operator_token
from evc.context import Context
from evc.store import Store
from tests.fixtures.services import raw_redis

pytestmark = pytest.mark.integration

METACHARS = [
    "$(touch /tmp/evc-pwned)",
    "`touch /tmp/evc-pwned`",
    "a;touch /tmp/evc-pwned",
    "a|id",
    "a&&id",
    "a\nid",
    "../../etc/passwd",
    "a' OR '1'='1",
    "a\x00b",
    "${IFS}id",
]


@pytest.fixture(scope="module")
def isolated(settings, redis_url):
    """An app on a private Redis database: whatever it enqueues, no worker consumes."""
    base = redis_url.rsplit("/", 1)[0]
    s = settings.replace(redis_url=f"{base}/7", key_prefix="hostile")
    store = Store.from_settings(s)
    with raw_redis(s) as r:
        r.flushdb()
    app = create_app(s)
    _, token = create_operator_token(Context(store, s), "hostile", ["admin"])
    yield app, store, {"Authorization": f"Bearer {token}"}
    with raw_redis(s) as r:
        r.flushdb()


def _counts(store: Store) -> tuple[int, int]:
    return store.list_devices(0, 1)[1], store.list_jobs(0, 1)[1]


@pytest.mark.parametrize("field", ["name", "host", "username"])
@pytest.mark.parametrize("value", METACHARS)
def test_metacharacters_in_device_fields(isolated, field, value) -> None:
    app, store, h = isolated
    before = _counts(store)
    body = {"name": "ok-name", "host": "127.0.0.1", "port": 22, "username": "edge", field: value}
    r = app.test_client().post("/api/v1/devices", json=body, headers=h)
    assert r.status_code == 422, r.get_json()
    assert field in r.get_json()["errors"]["json"] and r.get_json()["message"]
    assert _counts(store) == before
    assert not Path("/tmp/evc-pwned").exists()


@pytest.mark.parametrize("value", METACHARS)
def test_metacharacters_in_labels_and_filters(isolated, value) -> None:
    app, store, h = isolated
    c = app.test_client()
    before = _counts(store)
    r = c.post(
        "/api/v1/devices",
        json={"name": "n1", "host": "127.0.0.1", "username": "edge", "labels": {value: "v"}},
        headers=h,
    )
    assert r.status_code == 422
    r = c.post(
        "/api/v1/devices",
        json={"name": "n1", "host": "127.0.0.1", "username": "edge", "labels": {"k": value}},
        headers=h,
    )
    assert r.status_code == 422
    r = c.get("/api/v1/devices", query_string={"label": f"k={value}"}, headers=h)
    assert r.status_code == 200 and r.get_json()["total"] == 0
    assert _counts(store) == before


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "devenv/../../x", "devenv.yml", "a b", "$(id)"])
def test_playbook_names_cannot_traverse(isolated, name) -> None:
    app, store, h = isolated
    before = _counts(store)
    r = app.test_client().post("/api/v1/provision", json={"playbook": name, "targets": ["dev_x"]}, headers=h)
    assert 400 <= r.status_code < 500 and "playbook" in r.get_json()["message"].lower()
    assert _counts(store) == before


def test_huge_deep_invalid_and_mistyped_bodies(isolated) -> None:
    app, store, h = isolated
    c = app.test_client()
    before = _counts(store)
    r = c.post(
        "/api/v1/devices",
        data=b"{" + b'"a":"' + b"x" * (2 * 1024 * 1024) + b'"}',
        content_type="application/json",
        headers=h,
    )
    assert r.status_code == 413 and "larger" in r.get_json()["message"]
    deep = "[" * 100_000 + "]" * 100_000
    r = c.post("/api/v1/devices", data=deep, content_type="application/json", headers=h)
    assert r.status_code in (400, 422) and r.get_json()["message"]
    r = c.post("/api/v1/devices", data=b'{"name": "\xff\xfe"}', content_type="application/json", headers=h)
    assert r.status_code == 400 and r.get_json()["message"]
    r = c.post("/api/v1/devices", data="name=x&host=y", content_type="application/x-www-form-urlencoded", headers=h)
    assert 400 <= r.status_code < 500 and r.get_json()["message"]
    r = c.post("/api/v1/devices", data=json.dumps({"name": "x"}), content_type="text/plain", headers=h)
    assert 400 <= r.status_code < 500 and r.get_json()["message"]
    r = c.post("/api/v1/devices", json=[1, 2, 3], headers=h)
    assert r.status_code == 422
    r = c.get("/api/v1/devices?limit=abc", headers=h)
    assert r.status_code == 422 and "limit" in r.get_json()["message"]
    assert _counts(store) == before


def test_unknown_routes_and_methods_are_json(isolated) -> None:
    app, _, h = isolated
    c = app.test_client()
    r = c.get("/api/v1/nothing-here", headers=h)
    assert r.status_code == 404 and r.get_json()["message"]
    r = c.put("/api/v1/devices", headers=h)
    assert r.status_code == 405 and r.get_json()["message"]


def _run_operations(isolated, checks, skip: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Every operation (less *skip*), a few generated cases each, under *checks*: how many ran,
    and the failures by operation."""
    from hypothesis import given

    app, _, h = isolated
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    ran, failed = 0, {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # EVC's schema describes every operation
        operation = result.ok()
        if operation.path in ("/readyz", "/metrics/workers"):  # 503 is their documented "not here" answer
            continue
        name = f"{operation.method.upper()} {operation.path}"
        if name in skip:
            continue

        @given(case=operation.as_strategy())
        @hsettings(
            max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def check(case) -> None:  # noqa: ANN001
            case.call_and_validate(headers=h, checks=checks)

        try:
            check()
        except BaseException as exc:  # noqa: BLE001 - schemathesis raises groups; reported together below
            if isinstance(exc, KeyboardInterrupt):
                raise
            failed[name] = str(exc)[:600]
        ran += 1
    return ran, failed


def test_schemathesis_no_5xx_and_schema_conformance(isolated) -> None:
    """Every operation, a few generated cases each: never a 5xx, always the documented shape."""
    checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance]
    ran, failed = _run_operations(isolated, checks, {})
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())
    assert ran >= 20


#: operations whose body holds a file whose validity JSON Schema cannot say (the reason)
CONTENT_CHECKED = {
    "POST /api/v1/devices/import": "an inventory (INI, YAML or CSV) that must parse as one",
    "POST /api/v1/models": "a model file that must be a readable ONNX graph",
    "POST /api/v1/models/{name}/versions/{version}/variants": "a model file that must be a readable ONNX graph",
}


def test_the_openapi_document_admits_only_what_the_validators_accept(isolated) -> None:
    """What the schema accepts is never refused for another reason (422): the document carries
    the validators' rules (label keys, hosts, "exactly one of", non-empty updates, profile vars),
    except for uploaded files whose content only a parser can judge (CONTENT_CHECKED)."""
    ran, failed = _run_operations(isolated, [schemathesis.checks.positive_data_acceptance], CONTENT_CHECKED)
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())
    assert ran >= 20
