"""Rollouts end to end: a deployment on four simulated devices updated in place from version 1
to 2 one device at a time, one device failing its smoke inference on version 2 (a fault switch
in that device's Python: a ``sitecustomize`` that makes ONNX Runtime refuse to run a
``.../2/model.onnx``), rolled back automatically; then ``evc deployment rollback``.

Real API, Celery worker, Redis and SSH (the simulator); the endpoints are called with
tritonclient. The simulated devices share this host's network, hence the per-device ports.
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from evc.embedded import free_port
from evc.model import Device
from evc.store import Store
from evc_sim import SimDevice, SimulatorThread
from tests.fixtures.deploy import device_records, started_devices
from tests.fixtures.helpers import wait_until
from tests.fixtures.onnx_models import digits_model, fit_softmax, softmax_model

pytestmark = pytest.mark.integration

#: the fault switch: the device's edge server cannot run version 2 of any model
FAULT = """
import sys
if "--models-dir" in sys.argv:
    import onnxruntime
    _run = onnxruntime.InferenceSession.run
    def run(self, *args, **kwargs):
        if "/2/model.onnx" in str(getattr(self, "_model_path", "")):
            raise RuntimeError("simulated fault: this device cannot run version 2")
        return _run(self, *args, **kwargs)
    onnxruntime.InferenceSession.run = run
"""


def set_python(dev: SimDevice, faulty: bool = False) -> None:
    """``~/py`` on *dev*: this venv's Python; with *faulty*, one whose ONNX Runtime refuses v2."""
    env = ""
    if faulty:
        (dev.home / "fault").mkdir(exist_ok=True)
        (dev.home / "fault" / "sitecustomize.py").write_text(FAULT)
        env = 'PYTHONPATH="$HOME/fault" '
    path = dev.home / "py"
    path.write_text(f'#!/bin/sh\n{env}exec {sys.executable} "$@"\n')
    path.chmod(0o755)


def models() -> tuple[bytes, bytes]:
    """Version 1 (the digits model) and version 2 (the same, its weights nudged: other bytes)."""
    v1, d = digits_model()
    w, b = fit_softmax(d)
    return v1, softmax_model(w * 1.01, b)


def push(api: Any, name: str, version: str, data: bytes) -> None:
    form = {"metadata": json.dumps({"name": name, "version": version}), "file": (io.BytesIO(data), "model.onnx")}
    status, body = api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")
    assert status == 201, body


@pytest.fixture(scope="module")
def four(simulator: SimulatorThread) -> Iterator[list[SimDevice]]:
    with started_devices(simulator, 4, f"ro{os.getpid() % 10000}") as devices:
        yield devices


@pytest.fixture()
def records(store: Store, four: list[SimDevice]) -> Iterator[list[Device]]:
    with device_records(store, four) as out:
        yield out


def infer(endpoint: str, name: str, version: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(endpoint)
    inp = httpclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return cast(np.ndarray, client.infer(name, [inp], model_version=version).as_numpy("probs"))


def test_rollout_with_a_failing_device_then_rollback(
    api: Any, worker: Any, live: str, four: list[SimDevice], records: list[Device]
) -> None:
    import onnxruntime as ort
    from tritonclient.utils import InferenceServerException

    from tests.fixtures.cli import evc

    for i, d in enumerate(four):
        set_python(d, faulty=i == 2)
    name = f"digits-ro-{time.time_ns() % 10**9}"
    v1, v2 = models()
    push(api, name, "1", v1)
    push(api, name, "2", v2)
    ports = [free_port() for _ in four]
    body = {
        "model": name, "version": "1", "devices": [r["id"] for r in records], "python": "~/py",
        "ports": {r["id"]: p for r, p in zip(records, ports, strict=True)},
    }  # fmt: skip
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    dep_id = job["params"]["deployment"]
    assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"

    # nothing to roll back to yet; an unknown version is a 404
    status, err = api.call("POST", f"/api/v1/deployments/{dep_id}/rollback", json={})
    assert status == 409 and "no previous version" in err["message"]
    assert api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "9"})[0] == 404
    assert api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "2", "max_unavailable": 0})[0] == 422

    # v1 -> v2, one device at a time: the third fails its smoke inference and goes back to v1,
    # the rollout stops there (the fourth stays on v1)
    status, job = api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "2", "max_unavailable": 1})
    assert status == 202 and job["kind"] == "deploy", job
    job = api.wait_job(job["id"], timeout=180)
    assert job["state"] == "partial", job
    bad = four[2].name
    message = job["summary"]["message"]
    assert bad in message and "simulated fault" in message and "1 not reached" in message, message
    assert job["summary"]["updated"] == 2 and job["summary"]["rolled_back"] == [bad]
    assert job["summary"]["not_reached"] == 1
    status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
    assert dep["state"] == "partial" and dep["version"] == "2" and dep["previous"]["version"] == "1"
    assert dep["rollout"]["state"] == "stopped" and dep["rollout"]["failed"][0]["name"] == bad
    got = [(t["state"], t["version"]) for t in dep["targets"]]
    assert got == [("running", "2"), ("running", "2"), ("rolled-back", "1"), ("running", "1")], got
    assert "failed its smoke inference on version 2" in dep["targets"][2]["reason"]
    assert "simulated fault" in dep["targets"][2]["reason"]

    # every endpoint answers, each with its version; version 2 is not served beside 1
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    want = {
        v: ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
        for v, data in (("1", v1), ("2", v2))
    }
    for t in dep["targets"]:
        np.testing.assert_allclose(
            infer(t["endpoint"], name, t["version"], x), want[t["version"]], rtol=1e-5, atol=1e-6
        )
        other = "1" if t["version"] == "2" else "2"
        with pytest.raises(InferenceServerException):
            infer(t["endpoint"], name, other, x)
    assert (four[2].home / ".evc" / "deploy" / dep_id / "standby" / name / "2" / "model.onnx").exists()

    # the previous version cannot be deleted from the registry (a rollback needs it)
    assert api.call("DELETE", f"/api/v1/models/{name}/versions/1")[0] == 409

    # evc deployment rollback: every device back on v1 (the rolled-back one stays as it is)
    code, out, text = evc(live, api.admin, "deployment", "rollback", dep_id, "--wait")
    assert code == 0, text
    assert "rollback: 2 -> 1 done" in text, text
    status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
    assert dep["state"] == "running" and dep["version"] == "1" and dep["previous"]["version"] == "2"
    assert [(t["state"], t["version"]) for t in dep["targets"]] == [("running", "1")] * 4
    for t in dep["targets"]:
        np.testing.assert_allclose(infer(t["endpoint"], name, "1", x), want["1"], rtol=1e-5, atol=1e-6)

    # evc deployment update, all four at once: the three good ones on v2, the faulty one back on v1
    code, out, text = evc(live, api.admin, "deployment", "update", dep_id, "--version", "2", "--max-unavailable", "4",
                          "--wait")  # fmt: skip
    assert code == 1 and "partial" in text and bad in text, text
    dep = api.call("GET", f"/api/v1/deployments/{dep_id}")[1]
    got = [(t["state"], t["version"]) for t in dep["targets"]]
    assert got == [("running", "2"), ("running", "2"), ("rolled-back", "1"), ("running", "2")], got

    job = api.wait_job(api.call("DELETE", f"/api/v1/deployments/{dep_id}")[1]["id"], timeout=60)
    assert job["state"] == "succeeded", job
    for d in four:
        assert not (Path(d.home) / ".evc" / "deploy" / dep_id).exists()
    for p in ports:
        wait_until(functools.partial(_closed, p), 10, f"port {p} to close")
    assert api.call("DELETE", f"/api/v1/models/{name}/versions/2")[0] == 200
    assert api.call("DELETE", f"/api/v1/models/{name}/versions/1")[0] == 200


def test_a_rollout_failing_on_its_first_device_leaves_the_deployment_as_it_was(
    api: Any, worker: Any, four: list[SimDevice], records: list[Device]
) -> None:
    """Its only device fails its gate on v2: the job fails, the record is back on v1, no previous."""
    for i, d in enumerate(four):
        set_python(d, faulty=i == 0)
    name = f"digits-ro-{time.time_ns() % 10**9}"
    v1, v2 = models()
    push(api, name, "1", v1)
    push(api, name, "2", v2)
    recs, ports = records[:1], [free_port()]
    body = {"model": name, "version": "1", "devices": [r["id"] for r in recs], "python": "~/py",
            "ports": {r["id"]: p for r, p in zip(recs, ports, strict=True)}}  # fmt: skip
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    dep_id = job["params"]["deployment"]
    assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
    key = {"Idempotency-Key": f"ro-{time.time_ns()}"}
    job = api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "2"}, headers=key)[1]
    status, busy = api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "2"})
    assert status == 409 and "deploying" in busy["message"]
    job = api.wait_job(job["id"], timeout=120)
    assert job["state"] == "failed" and four[0].name in job["error"]["message"], job
    dep = api.call("GET", f"/api/v1/deployments/{dep_id}")[1]
    # the same request again (its Idempotency-Key): the same job, the record left as it is
    again = api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "2"}, headers=key)[1]
    assert again["id"] == job["id"]
    after = api.call("GET", f"/api/v1/deployments/{dep_id}")[1]
    assert {**after, "updated_at": 0} == {**dep, "updated_at": 0}
    assert dep["state"] == "running" and dep["version"] == "1" and not dep["previous"]
    assert dep["targets"][0]["state"] == "rolled-back" and dep["targets"][0]["version"] == "1"
    assert api.call("POST", f"/api/v1/deployments/{dep_id}/rollback", json={})[0] == 409
    assert api.call("DELETE", f"/api/v1/models/{name}/versions/2")[0] == 200  # not held any more
    job = api.wait_job(api.call("DELETE", f"/api/v1/deployments/{dep_id}")[1]["id"], timeout=60)
    assert job["state"] == "succeeded", job
    wait_until(functools.partial(_closed, ports[0]), 10, "the port to close")


def _closed(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0
