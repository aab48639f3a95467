"""Clusters end to end: API -> real worker -> level jobs running real playbooks on simulated
devices; membership, gating with reasons, the k3s server role, offline devices, re-convergence."""

from __future__ import annotations

import time

import pytest

from evc import clusters, jobs
from evc.context import Context
from evc.levels import raise_level
from evc.provisioning.service import step_runner
from tests.fixtures.fleet import DIRECT_VARS, create_cluster, register_devices
from tests.fixtures.helpers import present

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_cluster_crud_and_validation(api) -> None:
    name = f"c{time.time_ns()}"
    cl = create_cluster(api, name, "direct", vars=DIRECT_VARS)
    assert cl["profile"] == "direct" and cl["size"] == 0 and cl["members"] == []
    assert api.call("POST", "/api/v1/clusters", json={"name": name, "profile": "direct"})[0] == 409
    status, body = api.call("POST", "/api/v1/clusters", json={"name": name + "x", "profile": "swarm"})
    assert status == 422 and "profile" in body["errors"]["json"]
    status, body = api.call(
        "POST", "/api/v1/clusters", json={"name": name + "y", "profile": "direct", "vars": {"k3s-server": {}}}
    )
    assert status == 422 and "k3s-server" in body["message"]
    status, page = api.call("GET", "/api/v1/clusters?limit=500")
    assert any(c["id"] == cl["id"] for c in page["items"])
    status, profiles = api.call("GET", "/api/v1/profiles", token="read")
    assert status == 200 and {p["name"] for p in profiles["profiles"]} == {"direct", "container", "k3s", "k8s"}
    status, renamed = api.call("PATCH", f"/api/v1/clusters/{cl['id']}", json={"name": name + "-r"})
    assert status == 200 and renamed["name"] == name + "-r"
    assert api.call("DELETE", f"/api/v1/clusters/{cl['id']}")[0] == 200
    assert api.call("GET", f"/api/v1/clusters/{cl['id']}")[0] == 404


def test_join_converges_leave_resets_and_gating(api, worker, sim_devices) -> None:
    sims = sim_devices(2, privilege="user")
    a, b = register_devices(api, sims)
    cl = create_cluster(api, f"direct{time.time_ns()}", "direct", target=1, vars=DIRECT_VARS)
    # joining brings the device to the cluster's level with a job
    status, out = api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": a})
    assert status == 202 and out["job"]["kind"] == "level"
    job = api.wait_job(out["job"]["id"], timeout=180)
    assert job["state"] == "succeeded", job
    assert job["results"][a]["level"] == 1 and job["results"][a]["level_name"] == "provisioned"
    _, dev = api.call("GET", f"/api/v1/devices/{a}")
    assert dev["level"] == 1 and dev["cluster_id"] == cl["id"]
    assert (sims[0].home / "ws").is_dir()
    # a device belongs to at most one cluster
    other = create_cluster(api, f"other{time.time_ns()}", "direct")
    status, body = api.call("POST", f"/api/v1/clusters/{other['id']}/devices", json={"device_id": a})
    assert status == 409 and cl["id"] in body["message"]
    # a k8s cluster refuses an unprivileged account, saying why
    k8s = create_cluster(api, f"k8s{time.time_ns()}", "k8s")
    status, body = api.call("POST", f"/api/v1/clusters/{k8s['id']}/devices", json={"device_id": b})
    assert status == 409 and "privilege is 'user'" in body["message"]
    # operations state the level they need
    from evc import profiles

    with pytest.raises(Exception) as e:
        profiles.require_level("fl", [dev])
    assert "L4" in str(e.value)
    # dry run of a higher level: what would change, nothing recorded
    status, job = api.call("POST", f"/api/v1/clusters/{cl['id']}/level", json={"target": 1, "check": True})
    assert status == 202
    job = api.wait_job(job["id"], timeout=120)
    assert job["state"] == "succeeded" and job["summary"]["check"] is True
    assert job["results"][a]["would_change"] == []  # already provisioned: in sync
    # leaving resets the level and the membership
    status, out = api.call("DELETE", f"/api/v1/clusters/{cl['id']}/devices/{a}")
    assert status == 202 and out["job"] is None and a not in out["cluster"]["members"]
    _, dev = api.call("GET", f"/api/v1/devices/{a}")
    assert dev["cluster_id"] is None and dev["level"] == 0


def test_offline_devices_get_no_work(api, worker, sim_devices) -> None:
    (sim,) = sim_devices(1, privilege="user")
    (dev_id,) = register_devices(api, [sim])
    cl = create_cluster(api, f"off{time.time_ns()}", "direct", vars=DIRECT_VARS)
    api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": dev_id})
    api.store.update_device(dev_id, state="offline")
    status, job = api.call("POST", f"/api/v1/clusters/{cl['id']}/level", json={"target": 1})
    job = api.wait_job(job["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "level_not_reached", job  # nobody reached L1
    assert "offline" in job["results"][dev_id]["stopped"] and job["results"][dev_id]["level"] == 0
    assert "offline" in job["error"]["details"]["stopped"][dev_id]
    status, job = api.call("POST", f"/api/v1/clusters/{cl['id']}/level", json={"target": 1, "offline": "fail"})
    job = api.wait_job(job["id"])
    assert job["state"] == "failed" and job["error"]["reason"] == "offline"
    # wait: the device comes back within the TTL, and the job goes on
    status, job = api.call(
        "POST", f"/api/v1/clusters/{cl['id']}/level", json={"target": 1, "offline": "wait", "offline_ttl_s": 60}
    )
    time.sleep(1.0)
    assert api.call("GET", f"/api/v1/jobs/{job['id']}")[1]["state"] == "running"
    api.store.update_device(dev_id, state="online")
    job = api.wait_job(job["id"], timeout=120)
    assert job["state"] == "succeeded" and job["results"][dev_id]["level"] == 1


def test_k3s_server_role_and_plan_in_check_mode(api, store, settings, sim_devices, tmp_path) -> None:
    sims = sim_devices(2, privilege="root")
    ids = register_devices(api, sims)
    art = settings.data_dir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    (art / "k3s-stub").write_bytes(b"#!/bin/sh\necho k3s stub\n")
    cl = create_cluster(api, f"k3s{time.time_ns()}", "k3s", vars={
        "k3s-server": {"artifact": "k3s-stub"}, "k3s-agent": {"artifact": "k3s-stub"},
        "devenv": {"build_tools": False}})  # fmt: skip
    for i in ids:  # target level 0: joining runs nothing
        status, out = api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": i})
        assert status == 202 and out["job"] is None
    _, shown = api.call("GET", f"/api/v1/clusters/{cl['id']}")
    assert shown["server_id"] == ids[0] and "join_token" not in shown
    # the server cannot leave while agents depend on it ...
    status, body = api.call("DELETE", f"/api/v1/clusters/{cl['id']}/devices/{ids[0]}")
    assert status == 409 and "server node" in body["message"]
    # ... the level-3 plan runs k3s-server on it and k3s-agent on the other (check mode, staged)
    job = jobs.new_job("level", targets=ids, params={"cluster_id": cl["id"], "target": 3, "check": True})
    store.create_job(job)
    run = present(jobs.JobRun.start(store, job["id"]))
    summary = raise_level(store, settings, run, step_runner(store, settings, {"evc_sysroot": str(tmp_path)}))
    events = [e for e in store.events(job["id"], 0, 2000) if e.get("type") == "level"]
    plan = [(e["level"], e["playbook"]) for e in events]
    assert (3, "k3s-server") in plan and (3, "k3s-agent") in plan
    assert isinstance(summary, dict) and summary["check"] is True
    res = store.results(job["id"])
    assert set(res) == set(ids) and all("level_name" in r for r in res.values())
    # hand the server role over, then the old server may leave
    status, _ = api.call("PATCH", f"/api/v1/clusters/{cl['id']}", json={"server_id": ids[1]})
    assert status == 200
    status, out = api.call("DELETE", f"/api/v1/clusters/{cl['id']}/devices/{ids[0]}")
    assert status == 202


def test_recovered_device_reconverges(api, store, worker, sim_devices) -> None:
    (sim,) = sim_devices(1, privilege="user")
    (dev_id,) = register_devices(api, [sim])
    cl = create_cluster(api, f"rc{time.time_ns()}", "direct", target=1, vars=DIRECT_VARS)
    _, out = api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": dev_id})
    assert api.wait_job(out["job"]["id"], timeout=180)["state"] == "succeeded"
    # drift while away: the workspace disappears; the sweep sees the device come back
    import shutil

    shutil.rmtree(sim.home / "ws")
    ctx = Context(store, api.settings, api.app.extensions["evc"].get("celery") or _sender(api))
    made = clusters.reconverge_recovered(ctx, [{"device": dev_id, "from": "offline", "to": "online"}])
    assert len(made) == 1 and made[0]["params"]["converge"] is True
    job = api.wait_job(made[0]["id"], timeout=180)
    assert job["state"] == "succeeded", job
    assert job["results"][dev_id]["reapplied"] == ["devenv"]
    assert (sim.home / "ws").is_dir()


def _sender(api):
    from evc.workers.celery_app import make_celery

    return make_celery(api.settings, include_tasks=False)
