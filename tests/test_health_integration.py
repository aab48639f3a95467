"""Health sweeps against simulated devices: real SSH servers, a real Redis, a real worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import HTTPServer
from typing import Any, ClassVar, cast

import asyncssh
import pytest

from evc import auth, health
from evc import pool as pooling
from evc.errors import DeviceOffline
from evc.model import Device
from evc.pool import SSHPool
from evc.settings import Settings
from evc.store import JSON, Store, new_id
from evc_sim import SimDevice, SimulatorThread
from tests.fixtures.helpers import WebhookReceiver, present, webhook_receiver

pytestmark = pytest.mark.integration


@pytest.fixture()
def hs(settings: Settings) -> Settings:
    """Settings for quick, deterministic sweeps: short timeouts and backoff, lax load limit
    (the host's real load average is what simulated devices report)."""
    return settings.replace(
        health_degraded_after=1,
        health_offline_after=3,
        health_recover_after=2,
        health_timeout_s=1.0,
        health_load_per_cpu_threshold=10_000.0,
        ssh_backoff_s=0.05,
        ssh_backoff_max_s=0.1,
    )


@pytest.fixture()
def pool(hs: Settings) -> Iterator[SSHPool]:
    """A private pool on the process loop, closed after the test."""
    p = SSHPool(hs)
    yield p
    pooling.call(p.close_all())


Register = Callable[..., list[Device]]


@pytest.fixture()
def register(store: Store) -> Iterator[Register]:
    """Device records for simulated devices, as a successful registration leaves them; removed
    after the test (the API fixture's tokens live in the same Redis, so no flush)."""
    made: list[str] = []

    def make(devices: list[SimDevice], state: str = "online") -> list[Device]:
        out = []
        for d in devices:
            dev_id = new_id("dev")
            rec = cast(Device, {  # the fields a registration sets that sweeps read
                "id": dev_id, "name": d.name, "host": d.host, "port": d.port,
                "username": d.username, "host_key": d.host_key_public, "state": state,
                "health": None, "last_seen": None, "cluster_id": None, "labels": {},
                "created_at": time.time(),
            })  # fmt: skip
            out.append(store.create_device(rec, token_hash="h-" + dev_id))
            made.append(dev_id)
        return out

    yield make
    for dev_id in made:
        store.delete_device(dev_id)


def sweep_states(store: Store, hs: Settings, pool: SSHPool, dev_id: str, n: int) -> list[str]:
    states = []
    for _ in range(n):
        health.sweep(store, hs, [dev_id], pool=pool)
        states.append(store.get_device(dev_id)["state"])
    return states


# ---------------------------------------------------------------------- sweeping
def test_sweep_records_health_and_skips_unregistered(
    store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, register: Register
) -> None:
    devs = register(sim_devices(3))
    pending = register(sim_devices(1), state="pending")[0]
    before = time.time()
    res = health.sweep(store, hs, pool=pool)  # the whole fleet (other tests' devices are gone)
    mine = {d["id"] for d in devs}
    assert mine <= set(res.results) and not mine & set(res.failures)
    assert res.skipped[pending["id"]] == "state pending"
    assert res.summary()["ok"] >= 3 and res.summary()["checked"] == len(res.results) + len(res.failures)
    for d in devs:
        rec = store.get_device(d["id"])
        h = present(rec["health"])
        assert rec["state"] == "online" and present(rec["last_seen"]) >= before
        assert h["misses"] == 0 and h["error"] is None and h["checked_at"] >= before
        assert present(h["load1"]) >= 0
        assert 0 < present(h["mem_used_ratio"]) < 1 and 0 < present(h["disk_used_ratio"]) < 1
        assert present(h["uptime_s"]) > 0 and "temperature_c" in h
    assert store.get_device(pending["id"])["health"] is None


def test_pool_reuses_connections_and_reconnects_after_restart(
    store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, simulator: SimulatorThread,
    register: Register,
) -> None:  # fmt: skip
    sims = sim_devices(3)
    devs = register(sims)
    ids = [d["id"] for d in devs]
    health.sweep(store, hs, ids, pool=pool)
    assert pool.stats().opened == 3 and pool.size() == 3
    res = health.sweep(store, hs, ids, pool=pool)
    assert len(res.results) == 3
    assert pool.stats().opened == 3  # the second sweep opened no connection

    simulator.set_fault(sims[0].name, "down")  # a restart: connections cut...
    simulator.set_fault(sims[0].name, "ok")  # ...and the device listens again
    res = health.sweep(store, hs, ids, pool=pool)
    assert len(res.results) == 3 and not res.failures  # no missed check
    assert pool.stats().opened == 4 and pool.size() == 3


def test_load_threshold_is_per_cpu_of_the_device(
    store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, register: Register
) -> None:
    """The simulated devices report this machine's real load average: judged per CPU of the
    device's facts, a busy many-core device is online; the same load on one CPU is not."""
    many, one = register(sim_devices(2))
    store.update_device(many["id"], facts={"cpus": 100_000})
    store.update_device(one["id"], facts={"cpus": 1})
    per_cpu = hs.replace(health_load_per_cpu_threshold=0.01)
    res = health.sweep(store, per_cpu, [many["id"], one["id"]], pool=pool)
    assert res.states[many["id"]] == "online", res.results  # load < 1,000: < 0.01 per CPU
    load = res.results[one["id"]]["load1"]
    if load > 0.01:  # an idle machine's load can read 0.00
        assert res.states[one["id"]] == "degraded"
        assert present(store.get_device(one["id"])["health"])["breaches"] == [f"load {load:g} on 1 CPU > 0.01 per CPU"]


def test_changed_record_reconnects(
    store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, register: Register
) -> None:
    a, b = sim_devices(2)
    dev = register([a])[0]
    health.sweep(store, hs, [dev["id"]], pool=pool)
    # the record now points at another device (say, re-addressed and re-pinned)
    store.update_device(dev["id"], port=b.port, host_key=b.host_key_public)
    res = health.sweep(store, hs, [dev["id"]], pool=pool)
    assert dev["id"] in res.results and pool.stats().opened == 2 and pool.size() == 1


def test_wrong_host_key_is_a_miss_not_a_crash(
    store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, register: Register
) -> None:
    a, b = sim_devices(2)
    dev, good = register([a, b])
    store.update_device(dev["id"], host_key=b.host_key_public)  # pinned key of another device
    res = health.sweep(store, hs, [dev["id"], good["id"]], pool=pool)
    assert res.failures[dev["id"]]["reason"] == "host_key_mismatch"
    assert good["id"] in res.results
    assert store.get_device(dev["id"])["state"] == "degraded"


def test_backoff_spares_a_down_device(
    store: Store, hs: Settings, sim_devices: Any, simulator: SimulatorThread, register: Register
) -> None:
    sim = sim_devices(1)[0]
    dev = register([sim])[0]
    p = SSHPool(hs.replace(ssh_backoff_s=30.0, ssh_backoff_max_s=60.0))
    simulator.set_fault(sim.name, "down")
    try:
        res = health.sweep(store, hs, [dev["id"]], pool=p)
        assert res.failures[dev["id"]]["reason"] == "unreachable"
        assert 25 < p.backing_off(dev["id"]) <= 30
        simulator.set_fault(sim.name, "ok")  # back, but the pool does not try again yet
        res = health.sweep(store, hs, [dev["id"]], pool=p)
        err = res.failures[dev["id"]]
        assert err["reason"] == "unreachable" and "not retrying" in err["message"]
        assert p.stats().opened == 0 and present(store.get_device(dev["id"])["health"])["misses"] == 2
        pooling.call(p.forget(dev["id"]))  # an operator's retry clears the backoff
        assert dev["id"] in health.sweep(store, hs, [dev["id"]], pool=p).results
    finally:
        simulator.set_fault(sim.name, "ok")
        pooling.call(p.close_all())


@pytest.mark.parametrize(
    "fault, params, reason",
    [
        ("down", {}, "unreachable"),
        ("slow", {"slow_s": 3.0}, "timeout"),
        ("drop", {"drop_after_s": 0.0}, "connection_dropped"),
    ],
)
def test_faults_drive_states_with_hysteresis(
    store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, simulator: SimulatorThread,
    register: Register, api: Any, fault: str, params: dict[str, float], reason: str,
) -> None:  # fmt: skip
    sim, other = sim_devices(2)
    dev, ok_dev = register([sim, other])
    ids = [dev["id"], ok_dev["id"]]
    health.sweep(store, hs, ids, pool=pool)

    simulator.set_fault(sim.name, fault, **params)  # type: ignore[arg-type]
    states = []
    for _ in range(4):
        res = health.sweep(store, hs, ids, pool=pool)
        assert ok_dev["id"] in res.results  # one bad device never fails the sweep
        assert res.failures[dev["id"]]["reason"] == reason
        states.append(store.get_device(dev["id"])["state"])
        time.sleep(0.15)  # past the reconnect backoff
    assert states == ["degraded", "degraded", "offline", "offline"]
    assert present(store.get_device(dev["id"])["health"])["misses"] == 4

    simulator.set_fault(sim.name, "ok")
    time.sleep(0.15)
    # hysteresis: two good checks to leave offline
    assert sweep_states(store, hs, pool, dev["id"], 2) == ["offline", "online"]
    h = present(store.get_device(dev["id"])["health"])
    assert h["misses"] == 0 and h["error"] is None

    status, page = api.call("GET", f"/api/v1/events?device={dev['id']}&type=device.state", token="read")
    assert status == 200
    moves = [(e["from"], e["to"]) for e in reversed(page["items"])]
    assert moves == [("online", "degraded"), ("degraded", "offline"), ("offline", "online")]
    assert page["items"][-1]["reason"] == f"{reason}: 1 consecutive missed check"
    assert store.get_device(ok_dev["id"])["state"] == "online"


def test_thresholds_degrade(store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, register: Register) -> None:
    dev = register(sim_devices(1))[0]
    strict = hs.replace(health_disk_threshold=0.0)  # any used disk is too much
    res = health.sweep(store, strict, [dev["id"]], pool=pool)
    assert res.states[dev["id"]] == "degraded"
    assert res.changes[0]["reason"].startswith("disk ")
    health.sweep(store, hs, [dev["id"]], pool=pool)
    assert store.get_device(dev["id"])["state"] == "online"


def test_record_health_never_recreates_a_removed_device(store: Store, redis_raw: Any) -> None:
    assert store.record_health({"dev_gone": {"health": {"misses": 1}}}) == 0
    assert not redis_raw.exists(store.k("device", "dev_gone"))


# ---------------------------------------------------------------------- heartbeats
def test_heartbeat_brings_an_offline_device_back(
    store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, simulator: SimulatorThread,
    register: Register, api: Any, redis_raw: Any,
) -> None:  # fmt: skip
    sim = sim_devices(1)[0]
    dev = register([sim])[0]
    token = auth.make_token(auth.PREFIX_DEVICE)
    redis_raw.set(store.k("device-token", auth.hash_token(token)), dev["id"])
    store.update_device(dev["id"], token_hash=auth.hash_token(token))
    simulator.set_fault(sim.name, "down")
    assert sweep_states(store, hs, pool, dev["id"], 3)[-1] == "offline"

    status, body = api.call(
        "POST", "/api/v1/devices/self/heartbeat", token=token, json={"load1": 0.25, "uptime_s": 99.0}
    )
    assert status == 200, body
    assert body["state"] == "online" and body["health"]["misses"] == 0
    assert body["health"]["load1"] == 0.25 and body["health"]["source"] == "heartbeat"
    last = store.fleet_events(1)[0]
    assert (last["device"], last["from"], last["to"]) == (dev["id"], "offline", "online")
    assert last["reason"] == "heartbeat: recovered"
    simulator.set_fault(sim.name, "ok")


def test_heartbeat_of_a_pending_device_does_not_change_state(
    store: Store, sim_devices: Any, register: Register, settings: Settings
) -> None:
    dev = register(sim_devices(1), state="pending")[0]
    rec = health.record_heartbeat(store, settings, dev["id"], {"load1": 1.0})
    assert rec["state"] == "pending" and rec["last_seen"] and present(rec["health"])["load1"] == 1.0


# ---------------------------------------------------------------------- state changes go out
_Hook = webhook_receiver()  # what the webhook was sent: _Hook.received


def test_webhook_is_called_on_state_change(
    store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, simulator: SimulatorThread,
    register: Register,
) -> None:  # fmt: skip
    _Hook.received.clear()
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sim = sim_devices(1)[0]
        dev = register([sim])[0]
        s = hs.replace(webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
        health.sweep(store, s, [dev["id"]], pool=pool)  # no change: no call
        simulator.set_fault(sim.name, "down")
        health.sweep(store, s, [dev["id"]], pool=pool)
        deadline = time.monotonic() + 5
        while not _Hook.received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(_Hook.received) == 1
        body = _Hook.received[0]
        assert body["events"][0]["device"] == dev["id"] and body["events"][0]["to"] == "degraded"
        assert body["text"].startswith(f"{sim.name}: online → degraded")
    finally:
        server.shutdown()
        server.server_close()
        simulator.set_fault(sim.name, "ok")


class _SlowHook(WebhookReceiver):
    received: ClassVar[list[Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        time.sleep(3.0)
        super().do_POST()


def test_slow_webhook_never_blocks_the_sweep(
    store: Store, hs: Settings, pool: SSHPool, sim_devices: Any, simulator: SimulatorThread,
    register: Register,
) -> None:  # fmt: skip
    server = HTTPServer(("127.0.0.1", 0), _SlowHook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sim = sim_devices(1)[0]
    dev = register([sim])[0]
    s = hs.replace(webhook_url=f"http://127.0.0.1:{server.server_port}/hook", webhook_timeout_s=1.0)
    simulator.set_fault(sim.name, "down")
    try:
        t = time.monotonic()
        res = health.sweep(store, s, [dev["id"]], pool=pool)
        assert res.changes and time.monotonic() - t < 1.0
    finally:
        server.shutdown()
        server.server_close()
        simulator.set_fault(sim.name, "ok")


# ---------------------------------------------------------------------- no work to offline devices
def test_ensure_online_refuses_or_waits(store: Store, sim_devices: Any, register: Register) -> None:
    a, b = register(sim_devices(2))
    assert [d["id"] for d in health.ensure_online(store, [a["id"], b["id"]])] == [a["id"], b["id"]]
    store.update_device(b["id"], state="offline")
    with pytest.raises(DeviceOffline) as err:
        health.ensure_online(store, [a["id"], b["id"]], "fail")
    assert err.value.details["devices"] == [b["id"]] and b["name"] in err.value.message
    assert err.value.to_dict()["reason"] == "offline" and err.value.status == 409

    t = time.monotonic()
    with pytest.raises(DeviceOffline, match="after waiting"):
        health.ensure_online(store, [b["id"]], "wait", ttl_s=0.3, poll_s=0.05)
    assert 0.3 <= time.monotonic() - t < 2.0

    threading.Timer(0.3, lambda: store.update_device(b["id"], state="online")).start()
    back = health.ensure_online(store, [a["id"], b["id"]], "wait", ttl_s=10, poll_s=0.05)
    assert [d["state"] for d in back] == ["online", "online"]


def test_sweep_lock_excludes_overlapping_sweeps(store: Store, settings: Settings) -> None:
    with health.sweep_lock(store, settings, "one") as first:
        assert first
        with health.sweep_lock(store, settings, "two", wait_s=0.2) as second:
            assert not second
    with health.sweep_lock(store, settings, "two") as again:
        assert again


# ---------------------------------------------------------------------- through the API and a worker
def test_health_job_through_worker(store: Store, sim_devices: Any, register: Register, api: Any, worker: Any) -> None:
    devs = register(sim_devices(2))
    ids = [d["id"] for d in devs]
    status, job = api.call("POST", "/api/v1/health/sweep", json={"devices": ids + ["dev_missing"]})
    assert status == 202 and job["kind"] == "health"
    job = api.wait_job(job["id"])
    assert job["state"] == "succeeded", job
    assert job["summary"]["ok"] == 2 and job["summary"]["skipped"] == 1
    assert job["results"]["dev_missing"] == {"ok": False, "skipped": "not found"}
    for d in ids:
        assert job["results"][d]["ok"] is True and job["results"][d]["health"]["uptime_s"] > 0
        assert present(store.get_device(d)["health"])["checked_at"] >= job["started_at"]
    assert job["progress"]["done"] == 3


def test_beat_tick_sweeps_through_worker(
    store: Store, settings: Settings, sim_devices: Any, register: Register, worker: Any
) -> None:
    dev = register(sim_devices(1))[0]
    from evc.workers.celery_app import make_celery

    sent = time.time()
    make_celery(settings, include_tasks=False).send_task("evc.health_tick", queue="ssh")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = store.get_device(dev["id"])["health"]
        if h and h["checked_at"] >= sent:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the beat tick did not sweep the device")
    assert h["error"] is None and present(h["uptime_s"]) > 0
    assert present(store.get_device(dev["id"])["last_seen"]) >= sent


def test_events_api_filters_and_pages(store: Store, api: Any) -> None:
    a, b = new_id("dev"), new_id("dev")  # the event log is shared with other tests: filter on these
    t0 = time.time()
    store.log_event({"type": "device.removed", "device": a})
    time.sleep(0.01)
    mid = time.time()
    for i in range(5):
        store.log_event({"type": "device.state", "device": b, "from": "online", "to": "degraded", "i": i})
    store.log_event({"type": "cluster.member", "device": b})

    def get(query: str) -> JSON:
        status, body = api.call("GET", f"/api/v1/events?{query}", token="read")
        assert status == 200, body
        return body

    body = get(f"type=device.state&device={b}&limit=2")
    assert body["total"] == 5 and [e["i"] for e in body["items"]] == [4, 3] and body["next_offset"] == 2
    body = get(f"type=device.state&device={b}&offset=4&limit=2")
    assert [e["i"] for e in body["items"]] == [0] and body["next_offset"] is None
    body = get(f"type=device&device={b}")  # a dotted prefix
    assert body["total"] == 5
    assert get(f"type=device&device={a}")["items"][0]["type"] == "device.removed"
    body = get(f"device={b}&since={mid}")
    assert body["total"] == 6 and all(e["ts"] >= mid for e in body["items"])
    assert get(f"device={a}&since={mid}")["total"] == 0
    assert get(f"device={a}&since={t0}")["total"] == 1
    body = get("limit=1")
    assert body["items"][0]["type"] == "cluster.member" and body["total"] >= 7
    assert api.call("GET", "/api/v1/events", token=None)[0] == 401
    assert api.call("GET", "/api/v1/events?limit=0", token="read")[0] == 422
    assert api.call("POST", "/api/v1/health/sweep", token="read", json={})[0] == 403


def test_repin_does_not_flap_the_device_back_to_offline(api, worker, hs, pool, simulator, sim_devices) -> None:
    """After a successful re-pin the device is online with its misses over: one later miss
    makes it degraded, not offline again; a device degraded for a threshold stays degraded."""
    (sim,) = sim_devices(1)
    body = {"name": f"{sim.name}-rp", "host": sim.host, "port": sim.port, "username": sim.username}
    status, out = api.call("POST", "/api/v1/devices", json=body)
    assert status == 202 and api.wait_job(out["job"]["id"])["state"] == "succeeded"
    dev_id, store = out["device"]["id"], api.store
    wrong = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[:2]
    store.update_device(dev_id, host_key=" ".join(wrong))  # as if the device was reinstalled
    assert sweep_states(store, hs, pool, dev_id, 3) == ["degraded", "degraded", "offline"]

    status, job = api.call("POST", f"/api/v1/devices/{dev_id}/host-key", json={})
    assert status == 202 and api.wait_job(job["id"])["state"] == "succeeded"
    rec = store.get_device(dev_id)
    assert rec["state"] == "online" and rec["health"]["misses"] == 0 and rec["health"]["error"] is None
    assert any(e.get("device") == dev_id and e.get("to") == "online" for e in store.fleet_events(50))
    simulator.set_fault(sim.name, "down")
    try:
        assert sweep_states(store, hs, pool, dev_id, 1) == ["degraded"]  # one miss, not offline again
    finally:
        simulator.set_fault(sim.name, "ok")
    deadline = time.monotonic() + 10
    while sweep_states(store, hs, pool, dev_id, 1) != ["online"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the device listens again, the pool's backoff ends
    assert store.get_device(dev_id)["state"] == "online"

    full = hs.replace(health_disk_threshold=0.0)  # any used disk is too much: degraded
    assert sweep_states(store, full, pool, dev_id, 1) == ["degraded"]
    status, job = api.call("POST", f"/api/v1/devices/{dev_id}/host-key", json={"host_key": sim.host_key_public})
    assert status == 202 and api.wait_job(job["id"])["state"] == "succeeded"
    assert store.get_device(dev_id)["state"] == "degraded"  # kept: the disk is still full
