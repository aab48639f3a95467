"""Onboarding a fleet from an inventory, for real: API -> Celery worker -> simulated devices.
And retrying a failed registration without removing the device."""

from __future__ import annotations

import socket
import threading

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


class _Relay:
    """A TCP relay from a new port to a device's SSH port: the device now answers there."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the device behind it is gone (a later test's sweep): refuse, as it would
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def test_reimport_updates_changed_devices_in_place(api, worker, sim_devices) -> None:
    """An applied re-import (not a dry run) changes the existing records: new labels, and a new
    port (registered again there, the same host key pinned); the same ids, no duplicates."""
    moved, stays = sim_devices(2, privilege="user")
    first = _import(api, _ini([moved, stays]))
    assert api.wait_job(first["job"]["id"], timeout=60)["state"] == "succeeded"
    ids = {d["name"]: d["device_id"] for d in first["devices"]}
    relay = _Relay(moved.port)
    try:
        inventory = _ini([moved, stays], group="cams").replace(
            f"ansible_port={moved.port}", f"ansible_port={relay.port}"
        )
        out = _import(api, inventory)
        assert {d["name"]: d["action"] for d in out["devices"]} == {moved.name: "update", stays.name: "update"}
        assert out["tokens"] == {} and {d["device_id"] for d in out["devices"]} == set(ids.values())
        job = api.wait_job(out["job"]["id"], timeout=60)  # only the moved device is registered again
        assert job["state"] == "succeeded" and job["targets"] == [ids[moved.name]], job
        _, m = api.call("GET", f"/api/v1/devices/{ids[moved.name]}")
        assert m["port"] == relay.port and m["state"] == "online" and m["host_key"] == moved.host_key_public, m
        assert m["labels"] == {"edge": "true", "cams": "true"}, m
        _, s = api.call("GET", f"/api/v1/devices/{ids[stays.name]}")
        assert s["port"] == stays.port and s["state"] == "online" and s["labels"] == {"edge": "true", "cams": "true"}
        for dev in (moved, stays):
            assert api.call("GET", f"/api/v1/devices?name={dev.name}")[1]["total"] == 1  # never duplicated
        again = _import(api, inventory)  # applied once: the same file changes nothing now
        assert again["job"] is None and [d["action"] for d in again["devices"]] == ["unchanged"] * 2
    finally:
        relay.close()
