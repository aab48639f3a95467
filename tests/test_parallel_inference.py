"""Parallel inference and cluster serving end to end: the API, a real Celery worker, real Redis,
simulated devices over SSH with real CPU quotas (cgroup v1, when this machine allows them),
EVC's edge inference server deployed on them; one device's server stopped mid-job.

The model is a heavier digits classifier (random ReLU features, ~1.1 M multiply-adds per item)
so that the devices' CPU quotas show in their rates.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evc.embedded import free_port
from evc.fl.data import load_reference_digits
from evc.model import Device
from evc.store import Store
from evc_sim import SimDevice, SimulatorThread, cpuquota
from tests.fixtures.cli import evc
from tests.fixtures.deploy import device_records, kill_servers, started_devices
from tests.fixtures.helpers import wait_until
from tests.fixtures.onnx_models import mlp_model, unique, upload

pytestmark = pytest.mark.integration

# 1:1:6 when quotas work here; a quota binds only while the machine would give the device more,
# and a loaded shared machine gives each busy process ~0.15 of a core: the small ones still bind
CPUS = [0.05, 0.05, 0.3]


@pytest.fixture(scope="module")
def trio(simulator: SimulatorThread) -> Iterator[list[SimDevice]]:
    cpus = CPUS if cpuquota.unavailable_reason() is None else []
    with started_devices(simulator, 3, f"pi{os.getpid() % 10000}", cpus=cpus) as devices:
        for d in devices:  # the venv's Python (numpy + onnxruntime), one ONNX Runtime thread
            (d.home / "py").write_text(f'#!/bin/sh\nEVC_INFER_THREADS=1 exec {sys.executable} "$@"\n')
            (d.home / "py").chmod(0o755)
        yield devices


@pytest.fixture(scope="module")
def model() -> tuple[bytes, Any]:
    d = load_reference_digits()
    return mlp_model(d, 1024, layers=2), d


@pytest.fixture(scope="module")
def deployment(
    api: Any, worker: Any, store: Store, trio: list[SimDevice], model: tuple[bytes, Any]
) -> Iterator[tuple[str, list[Device]]]:
    with device_records(store, trio) as devices:
        name = unique("digits-par")
        status, body = upload(api, model[0], {"name": name, "version": "1"})
        assert status == 201, body
        body = {
            "model": name, "version": "1", "devices": [d["id"] for d in devices], "python": "~/py",
            "ports": {d["id"]: free_port() for d in devices},
        }  # fmt: skip
        status, job = api.call("POST", "/api/v1/deployments", json=body)
        assert status == 202, job
        assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
        dep_id = str(job["params"]["deployment"])
        yield dep_id, devices
        status, job = api.call("DELETE", f"/api/v1/deployments/{dep_id}")
        api.wait_job(job["id"], timeout=60)


def _dataset(api: Any, d: Any) -> dict[str, Any]:
    buf = io.BytesIO()
    np.savez(buf, x=d.X_test.astype(np.float32), y=d.y_test)
    form = {"file": (io.BytesIO(buf.getvalue()), "digits.npz"), "name": "digits-test"}
    status, body = api.call("POST", "/api/v1/inference/datasets", data=form, content_type="multipart/form-data")
    assert status == 201, body
    assert body["items"] == len(d.X_test) and body["shape"] == [64] and body["labels"] is True
    return dict(body)


def _results(api: Any, job_id: str) -> list[dict[str, Any]]:
    resp = api.client.get(f"/api/v1/inference/jobs/{job_id}/results", headers={"Authorization": f"Bearer {api.admin}"})
    assert resp.status_code == 200, resp.data[:300]
    return [json.loads(line) for line in resp.data.decode().splitlines()]


def _expected(model: tuple[bytes, Any], repeat: int) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model[0], providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"X": model[1].X_test.astype(np.float32)})[0]
    return np.tile(probs.argmax(axis=1), repeat)


def test_parallel_job_over_three_devices_in_input_order(
    api: Any, live: str, deployment: tuple[str, list[Device]], model: tuple[bytes, Any], tmp_path: Path
) -> None:
    dep_id, devices = deployment
    d = model[1]
    repeat = 60
    np.savez(tmp_path / "digits.npz", x=d.X_test.astype(np.float32), y=d.y_test)
    args = [
        "--deployment",
        dep_id,
        "--data",
        str(tmp_path / "digits.npz"),
        "--repeat",
        str(repeat),
        "--target-s",
        "0.3",
    ]
    code, out, _ = evc(live, api.admin, "--json", "infer", "run", *args, "--wait")
    assert code == 0, out
    job = json.loads(out)
    ds = {"items": len(d.X_test)}
    assert job["kind"] == "parallel-infer" and job["params"]["items"] == ds["items"] * repeat
    assert job["state"] == "succeeded", job
    s = job["summary"]
    n = ds["items"] * repeat
    assert s["items"] == n and set(s["devices"]) == {d["name"] for d in devices}
    assert sum(v["items"] for v in s["devices"].values()) == n
    assert s["accuracy"] > 0.9 and job["progress"]["done"] == n and set(job["progress"]["rates"]) == set(s["devices"])
    code, out, _ = evc(live, api.admin, "infer", "results", job["id"])
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["item"] for r in rows] == list(range(n))
    assert [r["prediction"] for r in rows] == _expected(model, repeat).tolist()
    assert {r["device"] for r in rows} <= set(s["devices"]) and all(r["latency_ms"] > 0 for r in rows)
    if cpuquota.unavailable_reason() is None:  # the 0.3-CPU device does more than each 0.05-CPU one
        shares = {name: v["share"] for name, v in s["devices"].items()}
        fast, slow = devices[2]["name"], [devices[0]["name"], devices[1]["name"]]
        assert all(shares[fast] > shares[x] for x in slow), s["devices"]
    status, shown = api.call("GET", f"/api/v1/inference/jobs/{job['id']}")
    assert status == 200 and shown["summary"]["items"] == n
    code, _, text = evc(live, api.admin, "infer", "show", job["id"])
    assert code == 0 and f"{n} items in" in text and devices[2]["name"] in text
    resp = api.client.get(f"/api/v1/inference/jobs/{job['id']}/results?format=npz",
                          headers={"Authorization": f"Bearer {api.admin}"})  # fmt: skip
    with np.load(io.BytesIO(resp.data)) as z:
        assert z["prediction"].shape == (n,) and z["output"].shape == (n, 10) and len(z["devices"]) == 3


def test_fl_shards_on_the_devices_as_the_data_set(api: Any, deployment: tuple[str, list[Device]]) -> None:
    dep_id, devices = deployment
    name = unique("shards")
    status, job = api.call("POST", "/api/v1/fl/partition", json={"devices": [d["id"] for d in devices], "name": name})
    assert status == 202, job
    assert api.wait_job(job["id"], timeout=60)["state"] == "succeeded"
    body = {"kind": "parallel", "deployment": dep_id, "dataset": f"fl-shards:{name}", "chunk": {"target_s": 0.2}}
    status, job = api.call("POST", "/api/v1/inference/jobs", json=body)
    assert status == 202 and job["params"]["items"] is None, job
    job = api.wait_job(job["id"], timeout=60)
    assert job["state"] == "succeeded", job
    s = job["summary"]
    train = len(load_reference_digits().X_train)
    assert s["items"] == train and sum(s["shards"].values()) == train and s["shards_missing"] == {}
    assert set(s["shards"]) == {d["name"] for d in devices} and s["accuracy"] > 0.9
    body["dataset"] = "fl-shards:never-partitioned"
    status, job = api.call("POST", "/api/v1/inference/jobs", json=body)
    job = api.wait_job(job["id"], timeout=60)
    assert job["state"] == "failed" and "no device has the shard" in job["error"]["message"], job


def test_a_device_killed_mid_job_loses_nothing(
    api: Any, deployment: tuple[str, list[Device]], model: tuple[bytes, Any], trio: list[SimDevice]
) -> None:
    dep_id, devices = deployment
    repeat = 120
    body = {"kind": "parallel", "deployment": dep_id, "dataset": "digits", "repeat": repeat,
            "chunk": {"target_s": 0.2, "first_items": 64}}  # fmt: skip
    status, job = api.call("POST", "/api/v1/inference/jobs", json=body)
    assert status == 202, job
    n = job["params"]["items"]

    def started() -> bool:  # the first chunks answered: the devices are at work
        _, j = api.call("GET", f"/api/v1/jobs/{job['id']}")
        return j["progress"].get("total") == n and 0 < int(j["progress"].get("done") or 0) < n // 2

    wait_until(started, 60, "the first items done", interval=0.05)
    victim = trio[2]  # the fastest: it holds a chunk now
    assert kill_servers(victim) == 2
    job = api.wait_job(job["id"], timeout=120)
    assert job["state"] == "succeeded", job
    s = job["summary"]
    assert s["dropped"] == [victim.name] and s["devices"][victim.name]["failures"] >= 2
    assert sum(v["items"] for v in s["devices"].values()) == n
    rows = _results(api, job["id"])
    assert [r["item"] for r in rows] == list(range(n))  # each item recorded once, in order
    assert [r["prediction"] for r in rows] == _expected(model, repeat).tolist()
    _, events = api.call("GET", f"/api/v1/jobs/{job['id']}/events")
    texts = " ".join(e.get("message", "") for e in (events.get("items") or events))
    assert f"{victim.name}:" in texts and "dropped" in texts

    # the cluster endpoint skips the stopped device: every request answered, by the others
    x = model[1].X_test[:2].astype(np.float32)
    req = {"inputs": [{"name": "X", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    seen = set()
    for _ in range(6):
        resp = api.client.post(f"/api/v1/deployments/{dep_id}/infer", json=req,
                               headers={"Authorization": f"Bearer {api.admin}"})  # fmt: skip
        assert resp.status_code == 200, resp.data[:300]
        probs = np.array(resp.get_json()["outputs"][0]["data"]).reshape(2, 10)
        assert probs.argmax(axis=1).tolist() == _expected(model, 1)[:2].tolist()
        seen.add(resp.headers["X-EVC-Device"])
    assert victim.name not in seen and seen
    loads = api.store.infer_loads(dep_id)
    assert all(out == 0 for out, _, _ in loads.values())


def test_bad_requests_are_4xx(api: Any, settings: Any) -> None:
    from evc.api.app import create_app

    status, body = api.call("POST", "/api/v1/inference/jobs", json={"kind": "telepathy"})
    assert status == 422 and "kind" in body["message"]
    status, body = api.call("POST", "/api/v1/inference/jobs",
                            json={"kind": "parallel", "deployment": "dep_nope", "dataset": "digits"})  # fmt: skip
    assert status == 404
    status, body = api.call("POST", "/api/v1/inference/jobs", json={"kind": "parallel", "deployment": "dep_x",
                            "dataset": "digits", "chunk": {"max_items": 0}})  # fmt: skip
    assert status == 422
    form = {"file": (io.BytesIO(b"not an npz"), "x.npz")}
    status, body = api.call("POST", "/api/v1/inference/datasets", data=form, content_type="multipart/form-data")
    assert status == 422 and ".npz" in body["message"]
    small = create_app(settings.replace(inference_dataset_max_bytes=1000)).test_client()
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((100, 64), np.float32))
    resp = small.post("/api/v1/inference/datasets", data={"file": (io.BytesIO(buf.getvalue()), "x.npz")},
                      headers={"Authorization": f"Bearer {api.admin}"}, content_type="multipart/form-data")  # fmt: skip
    assert resp.status_code == 413 and "inference_dataset_max_bytes" in resp.get_json()["message"]
    ds = _dataset(api, load_reference_digits())
    status, body = api.call("GET", f"/api/v1/inference/datasets/{ds['id']}")
    assert status == 200 and body == ds
    status, body = api.call("GET", "/api/v1/inference/datasets/ds_nope")
    assert status == 404
    status, body = api.call("POST", "/api/v1/deployments/dep_nope/infer", json={"inputs": []})
    assert status == 404


def test_progress_reaches_flower_through_celery_events(
    api: Any, settings: Any, deployment: tuple[str, list[Device]]
) -> None:
    """Flower builds its view from Celery's events with ``celery.events.state.State``: the job's
    ``task-progress`` events arrive there, and the task shows as PROGRESS with done/total."""
    import threading

    from evc.workers.celery_app import make_celery

    app = make_celery(settings, include_tasks=False)
    state = app.events.State()
    progress: list[dict[str, Any]] = []
    ready, stop = threading.Event(), threading.Event()

    def listen() -> None:
        def on_event(event: dict[str, Any]) -> None:
            state.event(event)
            if event.get("type") == "task-progress":
                progress.append(event)
                task = state.tasks.get(event["uuid"])
                event["seen_state"] = task.state if task is not None else None
            recv.should_stop = stop.is_set()

        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": on_event})
            ready.set()
            while not stop.is_set():
                try:
                    recv.capture(limit=None, timeout=1, wakeup=False)
                except Exception:  # noqa: BLE001 - a timeout: look at the stop flag again
                    pass

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert ready.wait(5)
    dep_id, _ = deployment
    body = {"kind": "parallel", "deployment": dep_id, "dataset": "digits", "repeat": 20, "chunk": {"target_s": 0.2}}
    status, job = api.call("POST", "/api/v1/inference/jobs", json=body)
    assert status == 202, job
    assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
    wait_until(lambda: progress, 10, "a task-progress event")
    stop.set()
    t.join(5)
    mine = [e for e in progress if str(e["uuid"]).startswith(job["id"])]
    assert mine, progress[:3]
    last = mine[-1]
    assert last["seen_state"] == "PROGRESS" and 0 < last["done"] <= last["total"] == 20 * 360
    assert "items_per_s" in last and isinstance(last.get("rates"), dict)
