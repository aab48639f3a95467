"""The compose stack, run for real under podman (issue 19): deploy/compose/compose.yaml with the
podman override (host network), EVC's image built offline and cached by a hash of its sources.

Redis (password, AOF), the API, a worker per queue (two for ``default``), beat, Flower and
Prometheus come up on free ports; simulated devices run on the host, outside the containers,
and are registered, provisioned (the exporter playbook, through the ansible worker) and trained
on (a two-round FL job); Prometheus scrapes the API, the workers through /metrics/workers and
the devices' exporters; a worker container is killed mid-job and the job completes once on the
other; Redis is restarted and nothing is lost; everything is torn down and nothing is left.
Skipped, saying why, without podman, runc or podman-compose, or when not root."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from evc_sim import SimulatorThread
from tests.fixtures.compose import Stack, ensure_images, new_stack, podman_env, since, why_not
from tests.fixtures.helpers import free_port, wait_until
from tests.fixtures.prometheus import build_prometheus_client_wheel, stop_exporter

log = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(why_not() is not None, reason=str(why_not())),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("compose")
    env = podman_env(tmp)
    image = ensure_images(env)
    s = new_stack(f"evct{secrets.token_hex(3)}", {**env, "EVC_IMAGE": image}, tmp)
    try:
        s.up()
        yield s
    finally:
        left = s.down()
        assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def sim(stack: Stack) -> Iterator[SimulatorThread]:
    root = Path(tempfile.mkdtemp(prefix="evc-sim-"))
    root.chmod(0o711)
    key = stack.call("GET", "/api/v1/ssh-key")["public_key"].strip()
    try:
        with SimulatorThread(root, authorized_keys=[key]) as simulator:
            yield simulator
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_stack_registers_provisions_trains_and_survives(stack: Stack, sim: SimulatorThread) -> None:
    t0 = time.monotonic()
    devices = sim.start(2, f"cmp{os.getpid() % 10000}", privileges="root")
    try:
        ids = _register(stack, devices)
        log.warning("%s registered through the ssh worker container", since(t0))
        ports = _provision_exporters(stack, devices, ids)
        log.warning("%s exporters provisioned by the ansible worker container", since(t0))
        _train(stack, ids)
        log.warning("%s FL job done in the fl worker container", since(t0))
        _scraped(stack, ids, ports)
        log.warning("%s Prometheus scrapes the API, the workers and the devices", since(t0))
        _worker_killed_mid_job(stack)
        log.warning("%s a killed worker's job finished once on the other", since(t0))
        _redis_restarted(stack, ids)
        log.warning("%s Redis restarted, nothing lost", since(t0))
    finally:
        for d in devices:
            stop_exporter(d)
            sim.remove(d.name)


def _register(stack: Stack, devices: list) -> list[str]:
    ids, jobs = [], []
    for d in devices:
        out = stack.call(
            "POST", "/api/v1/devices", {"name": d.name, "host": d.host, "port": d.port, "username": d.username}
        )
        ids.append(out["device"]["id"])
        jobs.append(out["job"]["id"])
    for job_id in jobs:
        job = stack.wait_job(job_id)
        assert job["state"] == "succeeded", job
    return ids


def _provision_exporters(stack: Stack, devices: list, ids: list[str]) -> list[int]:
    """The exporter playbook on each device, prometheus_client from a wheel in the data volume."""
    mount = stack.podman("volume", "inspect", f"{stack.project}_evc-data", "--format", "{{.Mountpoint}}").strip()
    artifacts = Path(mount) / "artifacts"
    artifacts.mkdir(exist_ok=True)
    wheel = build_prometheus_client_wheel(artifacts)
    for p in (artifacts, wheel):
        os.chown(p, 10001, 10001)
    ports = [free_port() for _ in devices]
    jobs = []
    for dev_id, port in zip(ids, ports, strict=True):
        extra = {"exporter_port": port, "listen": "127.0.0.1", "prometheus_client_wheel": wheel.name, "mounts": ["/"]}
        body = {"playbook": "exporter", "targets": [dev_id], "extra_vars": extra}
        jobs.append(stack.call("POST", "/api/v1/provision", body)["id"])
    for job_id in jobs:
        job = stack.wait_job(job_id, 240)
        assert job["state"] == "succeeded", job
    return ports


def _train(stack: Stack, ids: list[str]) -> None:
    python = sys.executable  # the devices' Python with numpy: this venv's, on the host
    job = stack.call("POST", "/api/v1/fl/install", {"devices": ids, "python": python})
    assert stack.wait_job(job["id"])["state"] == "succeeded"
    job = stack.call("POST", "/api/v1/fl/partition", {"devices": ids, "name": "digits-iid"})
    assert stack.wait_job(job["id"])["state"] == "succeeded"
    body = {"devices": ids, "data": {"path": "~/.evc/fl/data/digits-iid/shard.npz"}, "rounds": 2, "seed": 42,
            "python": python, "test_set": "digits-iid", "round_timeout": 60}  # fmt: skip
    job = stack.call("POST", "/api/v1/fl/jobs", body)
    job = stack.wait_job(job["id"], 180)
    assert job["state"] == "succeeded", job
    rounds = stack.call("GET", f"/api/v1/fl/jobs/{job['id']}")["fl"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["num_clients"] == 2 for r in rounds)
    assert rounds[-1]["eval_accuracy"] > 0.5


def _scraped(stack: Stack, ids: list[str], ports: list[int]) -> None:
    def up(job: str) -> dict[str, str]:
        return {
            r["metric"].get("device", r["metric"]["instance"]): r["value"][1] for r in stack.query(f'up{{job="{job}"}}')
        }

    wait_until(lambda: set(up("evc-api").values()) == {"1"}, 60, "Prometheus to scrape the API")
    wait_until(lambda: set(up("flower").values()) == {"1"}, 60, "Prometheus to scrape Flower")
    names = {d["name"] for d in (stack.call("GET", f"/api/v1/devices/{i}") for i in ids)}
    wait_until(lambda: names <= {n for n, v in up("evc-edge").items() if v == "1"}, 60, "the devices' exporters")
    loads = {r["metric"]["device"] for r in stack.query("evc_edge_load1")}
    assert names <= loads
    # the workers' metrics, merged by the API from every worker container's folder
    wait_until(lambda: set(up("evc-workers").values()) == {"1"}, 60, "Prometheus to scrape /metrics/workers")
    kinds = {r["metric"]["kind"] for r in stack.query('evc_jobs_total{state="succeeded"}')}
    assert {"register", "provision", "fl"} <= kinds, kinds


def _worker_killed_mid_job(stack: Stack) -> None:
    """A no-op job of 10 s on one of the two default workers; that container is killed (SIGKILL)
    while it runs; the other runs it again once the lease (4 s) expires: one effect."""
    workers = stack.containers("worker-default")
    assert len(workers) == 2, workers
    job = stack.call("POST", "/api/v1/jobs", {"kind": "noop", "params": {"sleep_s": 10}})
    wait_until(lambda: stack.call("GET", f"/api/v1/jobs/{job['id']}")["state"] == "running", 60, "the job to run")
    (victim,) = [w for w in workers if job["id"] in stack.logs(w)]
    stack.podman("kill", "-s", "KILL", victim)
    done = stack.wait_job(job["id"], 90)
    assert done["state"] == "succeeded" and done["attempt"] >= 1, done
    survivor = next(w for w in workers if w != victim)
    assert job["id"] in stack.logs(survivor)
    r = redis.Redis(port=stack.ports["redis"], password=stack.env["REDIS_PASSWORD"])
    assert int(r.get("evc:noop-effects") or 0) == 1
    stack.podman("start", victim)  # back for what follows (restart policy aside)


def _redis_restarted(stack: Stack, ids: list[str]) -> None:
    """Redis stops (AOF on its volume) and starts again: devices, jobs and tokens are all there,
    and the workers take new jobs."""
    before = stack.call("GET", "/api/v1/jobs?limit=200")["total"]
    stack.podman("restart", "-t", "10", f"{stack.project}_redis_1")
    wait_until(stack.redis_ping, 30, "Redis to answer again")
    wait_until(lambda: stack.http("/readyz")[0] == 200, 60, "the API to be ready again")
    assert {d["id"] for d in stack.call("GET", "/api/v1/devices")["items"]} >= set(ids)
    assert stack.call("GET", "/api/v1/jobs?limit=200")["total"] == before
    job = stack.call("POST", "/api/v1/jobs", {"kind": "noop"})
    assert stack.wait_job(job["id"], 90)["state"] == "succeeded"
