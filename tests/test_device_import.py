"""Onboarding a fleet from an inventory, for real: API -> Celery worker -> simulated devices.
And retrying a failed registration without removing the device."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def _ini(devices, group: str = "edge", extra: str = "") -> str:
    lines = [f"[{group}]"]
    lines += [f"{d.name} ansible_host={d.host} ansible_port={d.port} ansible_user={d.username}" for d in devices]
    return "\n".join(lines) + "\n" + extra


def _import(api, content: str, **kw):
    status, out = api.call("POST", "/api/v1/devices/import", json={"content": content, **kw})
    assert status == 200, out
    return out


def test_import_three_devices_then_reimport_changes_nothing(api, worker, sim_devices) -> None:
    devices = sim_devices(3, privilege="user")
    inventory = _ini(devices)

    dry = _import(api, inventory, dry_run=True)
    assert dry["job"] is None and [d["action"] for d in dry["devices"]] == ["create"] * 3
    assert api.call("GET", f"/api/v1/devices?name={devices[0].name}")[1]["total"] == 0

    out = _import(api, inventory)
    assert sorted(out["tokens"]) == sorted(d.name for d in devices)
    job = api.wait_job(out["job"]["id"], timeout=60)
    assert job["kind"] == "import" and job["state"] == "succeeded", job
    assert job["progress"]["done"] == job["progress"]["total"] == 3
    ids = {d["name"]: d["device_id"] for d in out["devices"]}
    for dev in devices:
        assert job["results"][ids[dev.name]]["ok"] is True
        _, d = api.call("GET", f"/api/v1/devices/{ids[dev.name]}")
        assert d["state"] == "online" and d["labels"] == {"edge": "true"} and d["host_key"] == dev.host_key_public

    again = _import(api, inventory)
    assert again["job"] is None and [d["action"] for d in again["devices"]] == ["unchanged"] * 3
    assert {d["device_id"] for d in again["devices"]} == set(ids.values())
    for dev in devices:
        assert api.call("GET", f"/api/v1/devices?name={dev.name}")[1]["total"] == 1  # never duplicated

    relabelled = _import(api, inventory.replace("[edge]", "[cams]"), dry_run=True)
    assert [d["action"] for d in relabelled["devices"]] == ["update"] * 3
    assert relabelled["devices"][0]["changes"]["labels"][1] == {"edge": "true", "cams": "true"}


def test_import_reports_each_device_that_fails_and_why(api, worker, simulator, sim_devices) -> None:
    good, locked = sim_devices(2, privilege="user")
    simulator.set_fault(locked.name, "refuse_auth")
    out = _import(api, _ini([good, locked], extra="bad-host ansible_host=-nope ansible_user=pi\n"))
    actions = {d["name"]: d for d in out["devices"]}
    assert actions["bad-host"]["action"] == "invalid" and "host" in actions["bad-host"]["reason"]
    job = api.wait_job(out["job"]["id"], timeout=60)
    assert job["state"] == "failed" and locked.name in job["error"]["message"], job
    assert job["results"][actions[good.name]["device_id"]]["ok"] is True
    failed = job["results"][actions[locked.name]["device_id"]]
    assert failed["ok"] is False and failed["error"]["reason"] == "auth_refused"

    # the key is installed now: retry the one registration, no remove-and-add
    simulator.set_fault(locked.name, "ok")
    dev_id = actions[locked.name]["device_id"]
    status, retry = api.call("POST", f"/api/v1/devices/{dev_id}/register")
    assert status == 202, retry
    assert api.wait_job(retry["id"], timeout=60)["state"] == "succeeded"
    assert api.call("GET", f"/api/v1/devices/{dev_id}")[1]["state"] == "online"
    status, err = api.call("POST", f"/api/v1/devices/{dev_id}/register")
    assert status == 409 and "online" in err["message"]


def test_import_refuses_unreadable_files_with_a_message(api) -> None:
    status, out = api.call("POST", "/api/v1/devices/import", json={"content": "just,a\n1,2\n", "format": "csv"})
    assert status == 422 and "header" in out["message"]
    status, out = api.call("POST", "/api/v1/devices/import", json={"content": "x"}, token="read")
    assert status == 403
