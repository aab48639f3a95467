"""Rollouts without downtime, and the failure budget: three simulated devices, the middle one
faulty on version 2 (the fault switch of :mod:`tests.test_rollout`).

The edge servers switch versions with SIGHUP (no restart): a client calling the good devices
all through the rollouts sees no failed request. With ``failure_budget`` 0 the faulty device
stops the rollout and every device it updated goes back; with 1 the rollout goes on past it.
Real API, Celery worker, Redis and SSH; the CLI for one rollout.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from evc.embedded import free_port
from evc.model import Device
from evc.store import Store
from evc_sim import SimDevice, SimulatorThread
from tests.fixtures.deploy import device_records, started_devices
from tests.test_rollout import models, push, set_python

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trio(simulator: SimulatorThread) -> Iterator[list[SimDevice]]:
    with started_devices(simulator, 3, f"rl{os.getpid() % 10000}") as devices:
        yield devices


@pytest.fixture()
def records(store: Store, trio: list[SimDevice]) -> Iterator[list[Device]]:
    with device_records(store, trio) as out:
        yield out


class Hammer(threading.Thread):
    """Calls ``/v2/models/<name>/infer`` (no version: the one served) on endpoints until stopped."""

    def __init__(self, endpoints: list[str], name: str) -> None:
        super().__init__(daemon=True)
        body = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
        self.body, self.endpoints, self.model = json.dumps(body).encode(), endpoints, name
        self.ok, self.stopping = 0, threading.Event()
        self.failed: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            for ep in self.endpoints:
                req = urllib.request.Request(f"http://{ep}/v2/models/{self.model}/infer", data=self.body,
                                             headers={"Content-Type": "application/json"})  # fmt: skip
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        assert r.status == 200 and json.loads(r.read())["outputs"]
                    self.ok += 1
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    self.failed.append(f"{ep}: {exc}")

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


def _states(api: Any, dep_id: str) -> list[tuple[str, str]]:
    dep = api.call("GET", f"/api/v1/deployments/{dep_id}")[1]
    return [(t["state"], t["version"]) for t in dep["targets"]]


def test_live_switch_and_failure_budget(api: Any, worker: Any, live: str, trio: list[SimDevice],
                                        records: list[Device]) -> None:  # fmt: skip
    from tests.fixtures.cli import evc

    for i, d in enumerate(trio):
        set_python(d, faulty=i == 1)
    name = f"digits-rl-{time.time_ns() % 10**9}"
    v1, v2 = models()
    push(api, name, "1", v1)
    push(api, name, "2", v2)
    ports = {r["id"]: free_port() for r in records}
    body = {"model": name, "version": "1", "devices": [r["id"] for r in records], "python": "~/py", "ports": ports}
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    dep_id = job["params"]["deployment"]
    good = [f"127.0.0.1:{ports[r['id']]}" for r in (records[0], records[2])]
    hammer = Hammer(good, name)
    try:
        assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
        assert (
            api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "2", "failure_budget": 1.5})[0] == 422
        )
        hammer.start()

        # budget 0: the faulty device stops the rollout, the one updated before it goes back too
        status, job = api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "2", "failure_budget": 0})
        assert status == 202, job
        job = api.wait_job(job["id"], timeout=180)
        assert job["state"] == "failed" and "over the failure budget of 0" in job["error"]["message"], job
        assert _states(api, dep_id) == [("rolled-back", "1"), ("rolled-back", "1"), ("running", "1")]
        dep = api.call("GET", f"/api/v1/deployments/{dep_id}")[1]
        assert dep["version"] == "1" and dep["targets"][0]["switch"] == "reload", dep
        assert "failure budget (0) was exceeded" in dep["targets"][0]["reason"]

        # budget 1 (the CLI): past the faulty device; the others on v2
        code, _, text = evc(live, api.admin, "deployment", "update", dep_id, "--version", "2",
                            "--failure-budget", "1", "--wait")  # fmt: skip
        assert code == 1 and "partial" in text and "failure budget 1" in text, text
        assert _states(api, dep_id) == [("running", "2"), ("rolled-back", "1"), ("running", "2")]
        # and back, live too
        code, _, text = evc(live, api.admin, "deployment", "rollback", dep_id, "--wait")
        assert code == 0, text
        assert _states(api, dep_id) == [("running", "1")] * 3
    finally:
        hammer.stop()
        status, job = api.call("DELETE", f"/api/v1/deployments/{dep_id}")
        if status == 202:
            api.wait_job(job["id"], timeout=120)
    # a client on the good devices never saw a failed request, through four switches each
    assert hammer.ok > 50 and not hammer.failed, (hammer.ok, hammer.failed[:5])
