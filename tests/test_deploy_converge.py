"""Re-convergence of deployments end to end: a deployment on a cluster follows its devices.

Three simulated devices, a real API, Celery worker, Redis and SSH. Health is swept in this
process (its own pool; one miss makes a device offline, one good check brings it back) and the
sweep's changes go through the health task's own hook (``_reconverge``), so that the test does not
wait for the worker pools' reconnect backoff. The simulated devices share this host's network,
hence the per-device ports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from evc import health
from evc import pool as pooling
from evc.context import Context
from evc.embedded import free_port
from evc.model import Device
from evc.store import Store
from evc_sim import SimDevice, SimulatorThread
from tests.fixtures.deploy import device_records, started_devices
from tests.fixtures.fleet import create_cluster
from tests.fixtures.helpers import wait_until
from tests.test_deployments import _port_closed, _port_open, _push_model, _python

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trio(simulator: SimulatorThread) -> Iterator[list[SimDevice]]:
    with started_devices(simulator, 3, f"cv{os.getpid() % 10000}") as devices:
        yield devices


@pytest.fixture()
def records(store: Store, trio: list[SimDevice]) -> Iterator[list[Device]]:
    with device_records(store, trio) as out:
        yield out


def _sender(api: Any) -> Any:
    from evc.workers.celery_app import make_celery

    return make_celery(api.settings, include_tasks=False)


def _targets(api: Any, dep_id: str) -> dict[str, dict[str, Any]]:
    status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
    assert status == 200, dep
    return {t["device"]: t for t in dep["targets"]}


def _sweep(store: Store, api: Any, pool: pooling.SSHPool, device_id: str) -> list[dict[str, Any]]:
    """One health sweep of *device_id* here, its changes handed to the health task's hook."""
    from evc.tasks.health import _reconverge

    hs = api.settings.replace(health_offline_after=1, health_recover_after=1, health_timeout_s=2.0,
                              health_load_per_cpu_threshold=10_000.0)  # fmt: skip
    res = health.sweep(store, hs, [device_id], pool=pool)
    _reconverge(Context(store, api.settings, _sender(api)), res.changes)
    return res.changes


def _jobs_of(store: Store, dep_id: str, kind: str, since: set[str]) -> list[str]:
    """The jobs of *kind* of deployment *dep_id* not in *since* (the ids seen before)."""
    jobs = store.list_jobs(kind=kind, limit=20)[0]
    return [j["id"] for j in jobs if j["params"].get("deployment") == dep_id and j["id"] not in since]


def _seen(store: Store) -> set[str]:
    return {j["id"] for kind in ("deploy", "deploy-remove") for j in store.list_jobs(kind=kind, limit=20)[0]}


def test_cluster_deployment_follows_health_and_membership(
    api: Any, worker: Any, store: Store, simulator: SimulatorThread, trio: list[SimDevice], records: list[Device]
) -> None:
    for d in trio:
        _python(d, sys.executable)
    a, b, c = records
    cl = create_cluster(api, f"cv{time.time_ns() % 10**9}", "direct")
    for dev in (a, b):
        status, out = api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": dev["id"]})
        assert status == 202 and out["job"] is None, out
    name = f"digits-cv-{time.time_ns() % 10**9}"
    _push_model(api, name)
    ports = {r["id"]: free_port() for r in records}  # c's too: it joins later
    body = {"model": name, "version": "1", "cluster": cl["id"], "python": "~/py", "ports": ports}
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    dep_id = job["params"]["deployment"]
    assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
    pool = pooling.SSHPool(api.settings.replace(ssh_backoff_s=0.0, ssh_backoff_max_s=0.0))
    try:
        # a fails: unreachable in the deployment (partial); its server dies with it
        simulator.set_fault(a["name"], "down")
        assert [ch["to"] for ch in _sweep(store, api, pool, a["id"])] == ["offline"]
        t = _targets(api, dep_id)
        assert t[a["id"]]["state"] == "unreachable" and "offline" in t[a["id"]]["reason"], t
        assert t[b["id"]]["state"] == "running" and api.call("GET", f"/api/v1/deployments/{dep_id}")[1]["state"] == (
            "partial"
        )
        script = trio[0].home / ".evc" / "deploy" / dep_id / "supervise.sh"
        subprocess.run(["sh", str(script), "stop"], check=True, timeout=30)
        wait_until(lambda: _port_closed(ports[a["id"]]), timeout=10, what="a's server stopped")

        # a recovers: re-converged (a deploy job); the model is there (not re-sent), the server restarted
        since = _seen(store)
        simulator.set_fault(a["name"], "ok")
        assert [ch["to"] for ch in _sweep(store, api, pool, a["id"])] == ["online"]
        (conv,) = _jobs_of(store, dep_id, "deploy", since)
        done = api.wait_job(conv, timeout=120)
        assert done["state"] == "succeeded", done
        assert done["summary"]["restarted"] == 1 and done["summary"]["shipped"] == 0, done["summary"]
        t = _targets(api, dep_id)
        assert t[a["id"]]["state"] == "running" and t[a["id"]]["restarted"] is True
        assert t[a["id"]]["shipped"] is False and _port_open(ports[a["id"]])
        assert api.call("GET", f"/api/v1/deployments/{dep_id}")[1]["state"] == "running"

        # converging again changes nothing: every server runs its digest
        status, out = api.call("POST", f"/api/v1/deployments/{dep_id}/converge")
        assert status == 202 and len(out["items"]) == 1, out
        done = api.wait_job(out["items"][0]["id"], timeout=120)
        assert done["state"] == "succeeded" and done["summary"]["restarted"] == 0 and done["summary"]["shipped"] == 0

        # c joins the cluster: deployed to; b leaves: its server stopped and its folder removed
        since = _seen(store)
        api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": c["id"]})
        (join,) = _jobs_of(store, dep_id, "deploy", since)
        done = api.wait_job(join, timeout=120)
        assert done["state"] == "succeeded" and done["summary"]["shipped"] == 1, done
        assert _targets(api, dep_id)[c["id"]]["state"] == "running" and _port_open(ports[c["id"]])
        status, _ = api.call("DELETE", f"/api/v1/clusters/{cl['id']}/devices/{b['id']}")
        assert status == 202
        (leave,) = _jobs_of(store, dep_id, "deploy-remove", since)
        assert api.wait_job(leave, timeout=120)["state"] == "succeeded"
        status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
        assert dep["devices"] == [a["id"], c["id"]] and dep["state"] == "running", dep
        assert _port_closed(ports[b["id"]]) and not (trio[1].home / ".evc" / "deploy" / dep_id).exists()
    finally:
        simulator.set_fault(a["name"], "ok")
        pooling.call(pool.close_all())
        status, job = api.call("DELETE", f"/api/v1/deployments/{dep_id}")
        if status == 202:
            api.wait_job(job["id"], timeout=120)
        for dev in records:
            api.call("DELETE", f"/api/v1/clusters/{cl['id']}/devices/{dev['id']}")


def test_selector_deployment_follows_labels(
    api: Any, worker: Any, live: str, store: Store, trio: list[SimDevice], records: list[Device]
) -> None:
    from tests.fixtures.cli import evc

    for d in trio:
        _python(d, sys.executable)
    a, b, c = records
    tag = f"s{time.time_ns() % 10**9}"
    for dev in (a, b):
        assert api.call("PATCH", f"/api/v1/devices/{dev['id']}", json={"labels": {"role": tag}})[0] == 200
    name = f"digits-sel-{time.time_ns() % 10**9}"
    _push_model(api, name)
    ports = {r["id"]: free_port() for r in records}
    body = {"model": name, "version": "1", "selector": {"labels": {"role": tag}}, "python": "~/py", "ports": ports}
    status, err = api.call("POST", "/api/v1/deployments", json={**body, "devices": [a["id"]]})
    assert status == 422, err
    # the CLI: --label, and --ports by device name
    pairs = ",".join(f"{r['name']}={ports[r['id']]}" for r in records)
    code, out, text = evc(live, api.admin, "--json", "deploy", f"{name}:1", "--label", f"role={tag}", "--ports",
                          pairs, "--python", "~/py")  # fmt: skip
    assert code == 0, text
    job = json.loads(out)
    dep_id = job["params"]["deployment"]
    try:
        assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
        status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
        assert dep["ports"] == ports, dep
        assert dep["selector"] == {"labels": {"role": tag}} and sorted(dep["devices"]) == sorted([a["id"], b["id"]])
        # relabelled: c matches now, b no longer
        since = _seen(store)
        assert api.call("PATCH", f"/api/v1/devices/{c['id']}", json={"labels": {"role": tag}})[0] == 200
        assert api.call("PATCH", f"/api/v1/devices/{b['id']}", json={"labels": {}})[0] == 200
        for job_id in _jobs_of(store, dep_id, "deploy", since) + _jobs_of(store, dep_id, "deploy-remove", since):
            assert api.wait_job(job_id, timeout=120)["state"] == "succeeded"
        status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
        assert dep["devices"] == [a["id"], c["id"]] and dep["state"] == "running", dep
        assert _port_open(ports[c["id"]]) and _port_closed(ports[b["id"]])
    finally:
        status, job = api.call("DELETE", f"/api/v1/deployments/{dep_id}")
        if status == 202:
            api.wait_job(job["id"], timeout=120)


def test_ensure_level_refuses_or_raises_the_cluster(api: Any, store: Store, records: list[Device]) -> None:
    """No worker: the jobs stay queued; what is checked is what the API records and enqueues."""
    a = records[0]
    cl = create_cluster(api, f"lv{time.time_ns() % 10**9}", "direct")
    api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": a["id"]})
    name = f"digits-lv-{time.time_ns() % 10**9}"
    _push_model(api, name)
    jobs: list[str] = []
    try:
        body = {"model": name, "version": "1", "cluster": cl["id"], "ensure_level": False}
        status, err = api.call("POST", "/api/v1/deployments", json=body)
        assert status == 409 and err["error"] == "precondition", err
        assert "below L1" in err["message"] and f"evc cluster level {cl['name']} 1" in err["message"], err
        # a device in no cluster cannot be raised: refused whatever ensure_level says
        status, err = api.call("POST", "/api/v1/deployments", json={"model": name, "version": "1",
                                                                     "devices": [records[1]["id"]]})  # fmt: skip
        assert status == 409 and "in no cluster" in err["message"], err
        # ensure_level (the default): the cluster's level job first, the deploy job waits for it
        key = {"Idempotency-Key": f"lv-{time.time_ns()}"}
        status, job = api.call("POST", "/api/v1/deployments", json={**body, "ensure_level": True}, headers=key)
        assert status == 202, job
        (level,) = job["params"]["after"]
        jobs += [job["id"], level]
        again = api.call("POST", "/api/v1/deployments", json={**body, "ensure_level": True}, headers=key)[1]
        assert again["id"] == job["id"] and again["params"]["after"] == [level]  # one level job, not two
        status, lj = api.call("GET", f"/api/v1/jobs/{level}")
        assert lj["kind"] == "level" and lj["params"]["target"] == 1 and lj["targets"] == [a["id"]], lj
        dep = store.get_deployment(job["params"]["deployment"])
        assert dep["level_jobs"] == [level] and dep["python"].endswith("/bin/python"), dep
        assert store.get_cluster(cl["id"])["target_level"] == 1
    finally:
        for job_id in jobs:
            api.call("POST", f"/api/v1/jobs/{job_id}/cancel")
        api.call("DELETE", f"/api/v1/clusters/{cl['id']}/devices/{a['id']}")
