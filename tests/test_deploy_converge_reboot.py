"""A device that reboots between two health sweeps (it never looks offline) comes back serving:
the sweep's server check (:mod:`evc.deployments.servers`) sees the deployment's port closed,
marks the device ``failed`` with the reason and re-converges it, without an operator. The pids
the supervisor had recorded belong to another process after the reboot: that one is neither
taken for the server nor killed.

A real API, Celery worker, Redis and a simulated device; the "reboot" kills the device's
supervisor and edge server (what a reboot does to them). The sweep runs here and its outcome
goes through the health task's own hooks (``_reconverge``, ``_revive``), as in
tests/test_deploy_converge.py. The container runtime's reboot is in tests/test_deploy_container_layers.py.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from evc import health, ssh
from evc import pool as pooling
from evc.context import Context
from evc.deployments import servers
from evc.embedded import free_port
from evc.model import Device
from evc.store import Store
from evc_sim import SimDevice, SimulatorThread
from tests.fixtures.deploy import device_records, kill_servers, started_devices
from tests.fixtures.helpers import wait_until
from tests.test_deploy_converge import _jobs_of, _seen, _sender, _targets
from tests.test_deployments import _deploy, _port_closed, _port_open, _push_model, _python

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def solo(simulator: SimulatorThread) -> Iterator[list[SimDevice]]:
    with started_devices(simulator, 1, f"rb{os.getpid() % 10000}") as devices:
        yield devices


def sweep_and_revive(store: Store, api: Any, pool: pooling.SSHPool, device_ids: list[str]) -> health.SweepResult:
    """One health sweep here, its outcome through the health task's hooks (as the tick does)."""
    from evc.tasks.health import _reconverge, _revive

    hs = api.settings.replace(health_offline_after=1, health_recover_after=1, health_timeout_s=5.0,
                              health_load_per_cpu_threshold=10_000.0)  # fmt: skip
    res = health.sweep(store, hs, device_ids, pool=pool)
    ctx = Context(store, api.settings, _sender(api))
    _reconverge(ctx, res.changes)
    _revive(ctx, res)
    return res


def _on_device(api: Any, pool: pooling.SSHPool, dev: Device, cmd: str) -> str:
    async def op(conn: Any, target: ssh.Target) -> str:
        return str((await ssh.run(conn, cmd, target, api.settings, check=False)).stdout or "").strip()

    return pooling.call(pool.use(dev, op))


def test_a_device_rebooted_between_sweeps_serves_again_after_the_next_sweep(
    api: Any, worker: Any, store: Store, solo: list[SimDevice]
) -> None:
    (sim,) = solo
    _python(sim, sys.executable)
    with device_records(store, solo) as (dev,):
        name = f"digits-rb-{time.time_ns() % 10**9}"
        _push_model(api, name)
        port = free_port()
        job, dep_id = _deploy(api, name, [dev], [port])
        assert job["state"] == "succeeded", job
        assert job["results"][dev["id"]]["on_boot"].startswith("none: no systemd"), job["results"]  # no systemd here
        pool = pooling.SSHPool(api.settings.replace(ssh_backoff_s=0.0, ssh_backoff_max_s=0.0))
        try:
            # serving: the sweep's check finds the port listening, submits nothing
            since = _seen(store)
            res = sweep_and_revive(store, api, pool, [dev["id"]])
            assert res.changes == [] and _jobs_of(store, dep_id, "deploy", since) == []
            assert servers.serving(store, [dev["id"]]) == {dev["id"]: {dep_id: port}}

            # the device "reboots" between two sweeps: its server and supervisor are gone, SSH answers;
            # their pids now belong to another process of the account (pids are reused after a boot)
            assert kill_servers(sim) == 2
            wait_until(lambda: _port_closed(port), timeout=10, what="the server gone")
            d = f"~/.evc/deploy/{dep_id}"
            reuse = f"echo $p > {d}/supervisor.pid; echo $p > {d}/server.pid; echo $p"
            other = _on_device(api, pool, dev, f"setsid nohup sleep 600 </dev/null >/dev/null 2>&1 & p=$!; {reuse}")
            res = sweep_and_revive(store, api, pool, [dev["id"]])
            assert res.changes == [], "the device never looked offline"
            t = _targets(api, dep_id)[dev["id"]]
            assert t["state"] in ("failed", "running"), t  # failed until the re-convergence ran
            (conv,) = _jobs_of(store, dep_id, "deploy", since)
            done = api.wait_job(conv, timeout=120)
            assert done["state"] == "succeeded", done
            assert done["params"]["reason"] == "server down" and done["params"]["converge"] is True
            assert done["summary"]["restarted"] == 1 and done["summary"]["shipped"] == 0, done["summary"]
            events = [e.get("message") or e.get("text") or "" for e in store.events(conv)]
            assert any("server down" in str(m) for m in events), events
            audit = [a for a in store.audit_log(limit=200)[0] if a["action"] == "deployment.server_down"]
            assert audit and audit[0]["target"] == dep_id, audit
            assert _port_open(port)
            assert _on_device(api, pool, dev, f"kill -0 {other} && echo alive; kill {other}") == "alive"
            t = _targets(api, dep_id)[dev["id"]]
            assert t["state"] == "running" and t["restarted"] is True, t
            assert api.call("GET", f"/api/v1/deployments/{dep_id}")[1]["state"] == "running"

            # the next sweep finds it serving: nothing more
            since = _seen(store)
            sweep_and_revive(store, api, pool, [dev["id"]])
            assert _jobs_of(store, dep_id, "deploy", since) == []
        finally:
            pooling.call(pool.close_all())
            status, job = api.call("DELETE", f"/api/v1/deployments/{dep_id}")
            if status == 202:
                api.wait_job(job["id"], timeout=120)
