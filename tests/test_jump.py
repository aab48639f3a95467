"""Devices behind a jump host (a real OpenSSH sshd), simulated devices on loopback behind it:
the jump host's key is pinned at registration and checked on every connection, a changed one
fails naming the jump host, and reconnections leave no hop open."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import asyncssh
import pytest

from evc import health
from evc import pool as pooling
from evc.pool import SSHPool
from evc.settings import Settings
from evc_sim.sshd import OpenSSHServer
from tests.fixtures.helpers import free_port, poll

pytestmark = pytest.mark.integration


def other_key() -> str:
    return " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[:2])


def jump_of(sshd: OpenSSHServer, **extra: Any) -> dict[str, Any]:
    return {"host": sshd.host, "port": sshd.port, "username": sshd.username, **extra}


def register_behind(api: Any, dev: Any, jump: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    body = {"name": f"{dev.name}-{time.time_ns()}", "host": dev.host, "port": dev.port,
            "username": dev.username, "jump_host": jump}  # fmt: skip
    status, out = api.call("POST", "/api/v1/devices", json=body)
    assert status == 202, out
    return out["device"], api.wait_job(out["job"]["id"])


def wait_for(cond: Any, timeout: float = 10.0) -> Any:
    return poll(cond, timeout, interval=0.05)  # the last value: the tests assert with their own message


@pytest.fixture()
def hs(settings: Settings) -> Settings:
    """Quick sweeps; a lax load limit (the simulated devices report this busy machine's load)."""
    return settings.replace(
        health_timeout_s=3.0, ssh_backoff_s=0.01, ssh_backoff_max_s=0.01, health_load_per_cpu_threshold=10_000.0
    )


@pytest.fixture()
def pool(hs: Settings) -> Iterator[SSHPool]:
    p = SSHPool(hs)
    yield p
    pooling.call(p.close_all())


def test_jump_host_key_pinned_at_registration_and_checked(api, worker, sshd, sim_devices, hs, pool) -> None:
    (sim,) = sim_devices(1)
    dev, job = register_behind(api, sim, jump_of(sshd))
    assert job["state"] == "succeeded", job
    assert job["results"][dev["id"]]["jump_host_key"] == sshd.host_key_public  # shown to the operator
    _, d = api.call("GET", f"/api/v1/devices/{dev['id']}")
    assert d["jump_host"]["host_key"] == sshd.host_key_public and d["host_key"] == sim.host_key_public
    assert health.sweep(api.store, hs, [dev["id"]], pool=pool).results.get(dev["id"])

    # the jump host changes its key: facts, health sweeps (the pool that FL channels use too) refuse
    api.store.update_device(dev["id"], jump_host={**d["jump_host"], "host_key": other_key()})
    status, job = api.call("POST", f"/api/v1/devices/{dev['id']}/facts")
    job = api.wait_job(job["id"])
    err = job["results"][dev["id"]]["error"]
    assert job["state"] == "failed" and err["reason"] == "jump_host_key_mismatch", job
    assert f"jump host {sshd.username}@{sshd.host}:{sshd.port} changed" in err["message"]
    res = health.sweep(api.store, hs, [dev["id"]], pool=pool)
    assert res.failures[dev["id"]]["reason"] == "jump_host_key_mismatch"

    # an admin re-pins the jump host to the key it presents now
    status, job = api.call("POST", f"/api/v1/devices/{dev['id']}/host-key", json={"jump_host_key": None})
    assert status == 202 and api.wait_job(job["id"])["state"] == "succeeded"
    _, d = api.call("GET", f"/api/v1/devices/{dev['id']}")
    assert d["jump_host"]["host_key"] == sshd.host_key_public and d["host_key"] == sim.host_key_public


def test_wrong_jump_key_at_registration_names_the_jump_host(api, worker, sshd, sim_devices) -> None:
    (sim,) = sim_devices(1)
    dev, job = register_behind(api, sim, jump_of(sshd, host_key=other_key()))
    assert job["state"] == "failed" and job["error"]["reason"] == "jump_host_key_mismatch", job
    assert "jump host" in job["error"]["message"]
    _, d = api.call("GET", f"/api/v1/devices/{dev['id']}")
    assert d["state"] == "unreachable" and d["error"]["reason"] == "jump_host_key_mismatch"


def test_unpinned_jump_host_is_refused_outside_registration(api, sshd, sim_devices, hs, pool) -> None:
    """A record whose jump host has no pinned key (e.g. from before pinning) is not trusted by a
    sweep: it asks for a re-pin."""
    (sim,) = sim_devices(1)
    rec = {"id": f"dev_{time.time_ns()}", "name": f"{sim.name}-old", "host": sim.host, "port": sim.port,
           "username": sim.username, "host_key": sim.host_key_public, "state": "online",
           "jump_host": jump_of(sshd), "labels": {}, "created_at": time.time()}  # fmt: skip
    api.store.create_device(rec, token_hash="h-" + rec["id"])
    try:
        res = health.sweep(api.store, hs, [rec["id"]], pool=pool)
        assert res.failures[rec["id"]]["reason"] == "jump_host_key_mismatch"
        assert "no pinned host key" in res.failures[rec["id"]]["message"]
    finally:
        api.store.delete_device(rec["id"])


def test_reconnecting_through_a_jump_host_leaves_no_connection_open(api, worker, sshd, sim_devices, hs, pool) -> None:
    (sim,) = sim_devices(1)
    before = sshd.connection_count()
    dev, job = register_behind(api, sim, jump_of(sshd))
    assert job["state"] == "succeeded", job
    for _ in range(3):  # fact refreshes: a connection each, closed with its hop
        status, job = api.call("POST", f"/api/v1/devices/{dev['id']}/facts")
        assert api.wait_job(job["id"])["state"] == "succeeded"
    assert wait_for(lambda: sshd.connection_count() <= before), (before, sshd.connection_count())
    for _ in range(4):  # health sweeps over the pool, reconnecting each time
        assert health.sweep(api.store, hs, [dev["id"]], pool=pool).results.get(dev["id"])
        pooling.call(pool.forget(dev["id"]))
    assert health.sweep(api.store, hs, [dev["id"]], pool=pool).results.get(dev["id"])
    assert wait_for(lambda: sshd.connection_count() <= before + 1), (before, sshd.connection_count())
    pooling.call(pool.close_all())
    assert wait_for(lambda: sshd.connection_count() <= before), (before, sshd.connection_count())


@pytest.mark.slow
def test_ansible_checks_the_jump_key_pinned_at_registration(api, worker, sshd, sim_devices, settings) -> None:
    """The per-job known_hosts holds the jump host's key recorded at registration
    (StrictHostKeyChecking=yes for the ProxyJump hop too): a playbook runs through it, and a
    changed pin refuses the hop."""
    from tests.test_provision_integration import provision_now

    (sim,) = sim_devices(1)
    dev, job = register_behind(api, sim, jump_of(sshd))
    assert job["state"] == "succeeded", job
    ran, results = provision_now(api.store, settings, "facts", [dev["id"]])
    assert ran["state"] == "succeeded", results
    d = api.store.get_device(dev["id"])
    api.store.update_device(dev["id"], jump_host={**d["jump_host"], "host_key": other_key()})
    _, results = provision_now(api.store, settings, "facts", [dev["id"]])
    res = results[dev["id"]]
    assert res["status"] == "unreachable" and res["reason"] == "jump_host_key_mismatch", res
    assert f"jump host {sshd.username}@{sshd.host}:{sshd.port} changed" in res["message"]


def test_connection_details_change_through_the_api(api, worker, sshd, sim_devices, hs, pool) -> None:
    """PATCH {connection} re-verifies the new details in a job; the device keeps its id, token,
    labels, cluster and history; details that do not answer leave the old ones in place."""
    a, b = sim_devices(2)
    body = {"name": f"{a.name}-mv", "host": a.host, "port": a.port, "username": a.username, "labels": {"site": "lab"}}
    status, out = api.call("POST", "/api/v1/devices", json=body)
    assert status == 202 and api.wait_job(out["job"]["id"])["state"] == "succeeded"
    dev_id, token, first_job = out["device"]["id"], out["token"], out["job"]["id"]
    api.store.update_device(dev_id, cluster_id="cl_kept")
    assert health.sweep(api.store, hs, [dev_id], pool=pool).results.get(dev_id)

    # bad input is refused up front
    assert api.call("PATCH", f"/api/v1/devices/{dev_id}", json={"connection": {}})[0] == 422
    assert api.call("PATCH", f"/api/v1/devices/{dev_id}", json={"connection": {"host": "a;rm -rf /"}})[0] == 422

    # the device now sits behind a jump host: the job probes it there and pins the jump key
    status, out = api.call("PATCH", f"/api/v1/devices/{dev_id}", json={"connection": {"jump_host": jump_of(sshd)}})
    assert status == 202, out
    assert api.wait_job(out["job"]["id"])["state"] == "succeeded"
    _, d = api.call("GET", f"/api/v1/devices/{dev_id}")
    assert d["jump_host"]["host_key"] == sshd.host_key_public and d["host_key"] == a.host_key_public

    # details where nothing answers: the job fails and the old details stay
    status, out = api.call("PATCH", f"/api/v1/devices/{dev_id}", json={"connection": {"port": free_port()}})
    job = api.wait_job(out["job"]["id"], timeout=60)
    assert job["state"] == "failed", job
    _, d = api.call("GET", f"/api/v1/devices/{dev_id}")
    assert (d["port"], d["jump_host"]["host"], d["state"]) == (a.port, sshd.host, "online")

    # moved to another machine (new address, new key), directly: re-pinned to the key it presents
    status, out = api.call("PATCH", f"/api/v1/devices/{dev_id}",
                           json={"connection": {"port": b.port, "jump_host": None}})  # fmt: skip
    assert status == 202 and api.wait_job(out["job"]["id"])["state"] == "succeeded"
    _, d = api.call("GET", f"/api/v1/devices/{dev_id}")
    assert (d["id"], d["port"], d["host_key"], d["jump_host"]) == (dev_id, b.port, b.host_key_public, None)
    assert d["labels"] == {"site": "lab"} and d["cluster_id"] == "cl_kept" and d["state"] == "online"
    assert api.call("GET", "/api/v1/devices/self", token=token)[1]["id"] == dev_id  # same token
    assert api.call("GET", f"/api/v1/jobs/{first_job}")[0] == 200  # history kept
    # the pool notices the new details and reconnects there
    assert health.sweep(api.store, hs, [dev_id], pool=pool).results.get(dev_id)


def test_fl_channels_check_the_jump_key(sshd, sim_devices, hs) -> None:
    """FL's file pushes and client channels go through the pool: a device behind a jump host
    is reached with the pinned jump key, and refused when it changed."""
    from evc.errors import JumpHostKeyMismatch
    from evc.fl import channels

    (sim,) = sim_devices(1)
    dev = {"id": f"dev_{time.time_ns()}", "host": sim.host, "port": sim.port, "username": sim.username,
           "host_key": sim.host_key_public, "jump_host": jump_of(sshd, host_key=sshd.host_key_public)}  # fmt: skip
    try:
        assert pooling.call(channels.push(hs, dev, "~/evc-jump-test.txt", b"through the jump host"), 30)
        changed = {**dev, "id": dev["id"] + "b", "jump_host": {**dev["jump_host"], "host_key": other_key()}}
        with pytest.raises(JumpHostKeyMismatch, match="jump host"):
            pooling.call(channels.push(hs, changed, "~/evc-jump-test.txt", b"x"), 30)
    finally:
        pooling.call(pooling.pool_for(hs).close_all())
