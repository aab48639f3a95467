"""Device registration end to end: API -> real Celery worker -> asyncssh -> simulated devices and
a real OpenSSH sshd. Every failure reason a person can act on is exercised."""

from __future__ import annotations

import socket
import threading
import time

import asyncssh
import pytest

from evc.registration import parse_facts

pytestmark = pytest.mark.integration


def _register(api, dev, name=None, **extra):
    body = {"name": name or dev.name, "host": dev.host, "port": dev.port, "username": dev.username, **extra}
    status, out = api.call("POST", "/api/v1/devices", json=body)
    assert status == 202, out
    return out


@pytest.mark.parametrize("privilege", ["user", "sudo", "root"])
def test_registration_detects_privilege(api, worker, sim_devices, privilege) -> None:
    (dev,) = sim_devices(1, privilege=privilege)
    out = _register(api, dev)
    assert out["device"]["state"] == "pending" and out["token"].startswith("evcd_")
    job = api.wait_job(out["job"]["id"])
    assert job["state"] == "succeeded", job
    status, d = api.call("GET", f"/api/v1/devices/{out['device']['id']}")
    assert d["state"] == "online"
    assert d["privilege"] == privilege
    assert d["host_key"] == dev.host_key_public
    assert d["facts"]["arch"] and d["facts"]["kernel"] and d["facts"]["cpus"] >= 1
    assert d["facts"]["python3"]
    assert any("root" in c or "user-space" in c for c in d["capabilities"])
    assert job["results"][d["id"]]["ok"] is True
    # the device's own token identifies it
    status, me = api.call("GET", "/api/v1/devices/self", token=out["token"])
    assert status == 200 and me["id"] == d["id"]
    # and can never reach operator endpoints
    assert api.call("GET", "/api/v1/devices", token=out["token"])[0] == 403
    assert api.call("POST", "/api/v1/jobs", token=out["token"], json={"kind": "noop"})[0] == 403


def test_registration_against_real_openssh(api, worker, sshd) -> None:
    out = _register(api, sshd, name=f"openssh-{time.time_ns()}")
    job = api.wait_job(out["job"]["id"])
    assert job["state"] == "succeeded", job
    _, d = api.call("GET", f"/api/v1/devices/{out['device']['id']}")
    assert d["state"] == "online" and d["host_key"] == sshd.host_key_public
    assert d["privilege"] == ("root" if d["facts"]["uid"] == 0 else d["privilege"])


def test_unreachable(api, worker) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = api.call("POST", "/api/v1/devices", json={
        "name": f"gone-{time.time_ns()}", "host": "127.0.0.1", "port": port, "username": "edge"})[1]  # fmt: skip
    job = api.wait_job(out["job"]["id"], timeout=30)
    assert job["state"] == "failed"
    assert job["error"]["reason"] == "unreachable"
    assert "refused the connection" in job["error"]["message"]
    _, d = api.call("GET", f"/api/v1/devices/{out['device']['id']}")
    assert d["state"] == "unreachable" and d["error"]["reason"] == "unreachable"
    _, ev = api.call("GET", f"/api/v1/jobs/{job['id']}/events")
    assert any(e.get("type") == "retry" for e in ev["items"])  # transient: retried, bounded


def test_auth_refused_says_what_to_run(api, worker, simulator, sim_devices) -> None:
    (dev,) = sim_devices(1)
    simulator.set_fault(dev.name, "refuse_auth")
    out = _register(api, dev)
    job = api.wait_job(out["job"]["id"])
    assert job["state"] == "failed"
    assert job["error"]["reason"] == "auth_refused"
    assert "ssh-key" in job["error"]["message"] and dev.username in job["error"]["message"]


def test_timeout(api, worker) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accepts and never says a word: no SSH banner
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        out = api.call("POST", "/api/v1/devices", json={
            "name": f"mute-{time.time_ns()}", "host": "127.0.0.1", "port": srv.getsockname()[1],
            "username": "edge"})[1]  # fmt: skip
        job = api.wait_job(out["job"]["id"], timeout=40)
        assert job["state"] == "failed" and job["error"]["reason"] == "timeout"
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


def test_host_key_pinning_and_repin(api, worker, sim_devices) -> None:
    (dev,) = sim_devices(1)
    out = _register(api, dev)
    assert api.wait_job(out["job"]["id"])["state"] == "succeeded"
    dev_id = out["device"]["id"]
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
    api.store.update_device(dev_id, host_key=" ".join(other[:2]))  # as if the device changed key
    status, job = api.call("POST", f"/api/v1/devices/{dev_id}/facts")
    assert status == 202
    job = api.wait_job(job["id"])
    assert job["state"] == "failed"
    assert job["results"][dev_id]["error"]["reason"] == "host_key_mismatch"
    assert "re-pin" in job["results"][dev_id]["error"]["message"]
    # an admin re-pins to the key the device presents now
    status, job = api.call("POST", f"/api/v1/devices/{dev_id}/host-key", json={})
    assert status == 202
    assert api.wait_job(job["id"])["state"] == "succeeded"
    _, d = api.call("GET", f"/api/v1/devices/{dev_id}")
    assert d["host_key"] == dev.host_key_public


def test_duplicate_name_conflicts(api, worker, sim_devices) -> None:
    (dev,) = sim_devices(1)
    _register(api, dev)
    status, body = api.call("POST", "/api/v1/devices", json={
        "name": dev.name, "host": dev.host, "port": dev.port, "username": dev.username})  # fmt: skip
    assert status == 409 and "already registered" in body["message"]


def test_device_list_filters_and_paging(api, worker, sim_devices) -> None:
    devs = sim_devices(3)
    tag = f"t{time.time_ns()}"
    for d in devs:
        _register(api, d, labels={"batch": tag})
    status, p = api.call("GET", f"/api/v1/devices?label=batch={tag}&limit=2")
    assert status == 200 and p["total"] == 3 and len(p["items"]) == 2 and p["next_offset"] == 2
    status, p2 = api.call("GET", f"/api/v1/devices?label=batch={tag}&limit=2&offset=2")
    assert len(p2["items"]) == 1
    assert api.call("GET", "/api/v1/devices?label=novalue")[0] == 422
    status, patched = api.call(
        "PATCH", f"/api/v1/devices/{p2['items'][0]['id']}", json={"labels": {"batch": tag, "x": "y"}}
    )
    assert status == 200 and patched["labels"]["x"] == "y"
    status, gone = api.call("DELETE", f"/api/v1/devices/{patched['id']}")
    assert status == 200
    assert api.call("GET", f"/api/v1/devices/{patched['id']}")[0] == 404


def test_idempotent_registration(api, worker, sim_devices) -> None:
    (dev,) = sim_devices(1)
    body = {"name": dev.name, "host": dev.host, "port": dev.port, "username": dev.username}
    key = {"Idempotency-Key": f"reg-{time.time_ns()}"}
    s1, a = api.call("POST", "/api/v1/devices", json=body, headers=key)
    s2, b = api.call("POST", "/api/v1/devices", json=body, headers=key)
    assert s1 == s2 == 202
    assert a["device"]["id"] == b["device"]["id"] and a["job"]["id"] == b["job"]["id"]
    assert "token" in a and "token" not in b  # the token is shown once


def test_parse_facts_pure() -> None:
    text = (
        "id=uid=1000(edge) gid=1000(edge) groups=1000(edge),27(sudo)\n"
        'uname=jetson-01 5.10.120-tegra aarch64\nos="Ubuntu 20.04.6 LTS"\ncpus=6\nmem_kb=8000000\n'
        "df=100 50\npython3=Python 3.8.10\ndocker=1\npodman=1\ngpu=Orin (nvgpu), 30536\n"
        "jetson=# R35 (release), REVISION: 4.1\nsudo=1\n"
    )
    f = parse_facts(text)
    assert f["arch"] == "aarch64" and f["kernel"] == "5.10.120-tegra" and f["hostname"] == "jetson-01"
    assert f["uid"] == 1000 and f["user"] == "edge" and f["os"] == "Ubuntu 20.04.6 LTS"
    assert f["cpus"] == 6 and f["memory_bytes"] == 8000000 * 1024 and f["disk_bytes"] == 100 * 1024
    assert f["python3"] == "3.8.10"
    assert f["docker"] is True and f["containerd"] is False and f["podman"] is True
    assert f["gpus"] == [{"name": "Orin (nvgpu)", "memory_mb": 30536}]
    assert f["privilege"] == "sudo" and f["jetson"].startswith("# R35")
    assert parse_facts("id=uid=0(root) gid=0(root)\nsudo=1")["privilege"] == "root"
    assert parse_facts("garbage\nid=nonsense")["privilege"] == "user"
