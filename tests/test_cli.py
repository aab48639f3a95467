"""The CLI over real HTTP: register a simulated device, follow jobs, provision, errors as text."""

from __future__ import annotations

import json
import time

import pytest

from tests.fixtures.cli import run

pytestmark = pytest.mark.integration


def test_device_add_list_show_and_job_commands(live, api, worker, sim_devices) -> None:
    (dev,) = sim_devices(1, privilege="user")
    code, out = run(
        live,
        api.admin,
        "device",
        "add",
        dev.name,
        "--host",
        dev.host,
        "--port",
        str(dev.port),
        "--user",
        dev.username,
        "--label",
        "site=cli",
    )
    assert code == 0, out
    assert "evcd_" in out and "privilege: user" in out and "succeeded" in out
    code, out = run(live, api.admin, "--json", "device", "list", "--label", "site=cli")
    data = json.loads(out)
    assert code == 0 and data["total"] >= 1
    dev_id = next(d["id"] for d in data["items"] if d["name"] == dev.name)
    code, out = run(live, api.reader, "device", "show", dev_id)
    assert code == 0 and dev.name in out and "user-space" in out
    code, out = run(live, api.admin, "--json", "job", "list", "--kind", "register", "--limit", "5")
    assert code == 0 and json.loads(out)["items"][0]["kind"] == "register"
    code, out = run(live, api.admin, "provision", "facts", "--device", dev_id)
    assert code == 0, out
    assert dev_id in out and "ok" in out


def test_errors_print_the_api_message(live, api) -> None:
    code, out = run(live, "evco_nope", "device", "list")
    assert code == 2 and "invalid token" in out and "Traceback" not in out
    code, out = run(live, api.reader, "job", "cancel", "job_missing")
    assert code == 2 and "admin" in out
    code, out = run(live, api.admin, "device", "show", "dev_missing")
    assert code == 2 and "404" in out and "not found" in out
    code, out = run("http://127.0.0.1:9", api.admin, "device", "list")
    assert code == 2 and "cannot reach EVC" in out


def test_token_and_cluster_commands(live, api) -> None:
    code, out = run(live, api.admin, "--json", "token", "create", f"cli{time.time_ns()}", "--scope", "read")
    tok = json.loads(out)
    assert code == 0 and tok["token"].startswith("evco_")
    code, out = run(live, tok["token"], "device", "list")
    assert code == 0
    code, out = run(live, api.admin, "token", "revoke", tok["id"])
    assert code == 0 and "revoked" in out
    code, out = run(live, api.admin, "--json", "cluster", "create", f"cli{time.time_ns()}", "--profile", "direct")
    cl = json.loads(out)
    assert code == 0 and cl["profile"] == "direct"
    code, out = run(live, api.admin, "cluster", "profiles")
    assert code == 0 and "k3s" in out and "L4 application" in out
    code, out = run(live, api.admin, "cluster", "rm", cl["id"])
    assert code == 0
