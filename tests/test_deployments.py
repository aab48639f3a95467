"""Deployments end to end: the API, a real Celery worker, simulated devices over SSH, a real
Redis; the edge inference server started on the devices, called with tritonclient.

The simulated devices share this host's network, so each gets its own port (``ports``). Their
Python is ``~/py`` in each device's home: on one a wrapper around the venv's Python (numpy +
onnxruntime), on the other this host's system Python (no onnxruntime) where a test asks for it.
"""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evc.deployments import remote
from evc.embedded import free_port
from evc.model import Device
from evc.store import Store
from evc_sim import SimDevice, SimulatorThread
from tests.fixtures.deploy import device_records, started_devices
from tests.fixtures.helpers import wait_until
from tests.fixtures.onnx_models import digits_model

pytestmark = pytest.mark.integration

SYSTEM_PYTHON = "/usr/bin/python3"


def test_bundle_is_a_runnable_zip_app_and_reproducible() -> None:
    data = remote.bundle_bytes()
    assert data == remote.bundle_bytes()
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "__main__.py" in names and f"{remote.BUNDLE_PACKAGE}/server.py" in names
    script = remote.supervise_script("~/py", 8600)
    assert '"$HOME"/py "$dir/evc-edge-infer.pyz"' in script and "--port 8600" in script
    hint = remote.python_hint("python3", "dev-x", "ModuleNotFoundError: No module named 'onnxruntime'")
    assert hint.startswith("python3 on dev-x has no onnxruntime; install onnxruntime")


@pytest.fixture(scope="module")
def pair(simulator: SimulatorThread) -> Iterator[list[SimDevice]]:
    with started_devices(simulator, 2, f"dp{os.getpid() % 10000}") as devices:
        yield devices


def _python(dev: SimDevice, interpreter: str) -> None:
    """``~/py`` on *dev*: *interpreter*, through a wrapper script."""
    path = dev.home / "py"
    path.write_text(f'#!/bin/sh\nexec {interpreter} "$@"\n')
    path.chmod(0o755)


@pytest.fixture()
def devices(store: Store, pair: list[SimDevice]) -> Iterator[list[Device]]:
    """Device records for the pair (as registration leaves them), removed after the test."""
    with device_records(store, pair) as out:
        yield out


def _push_model(api: Any, name: str) -> bytes:
    data, _ = digits_model()
    form = {"metadata": json.dumps({"name": name, "version": "1"}), "file": (io.BytesIO(data), "model.onnx")}
    status, body = api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")
    assert status == 201, body
    return data


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _port_closed(port: int) -> bool:
    return not _port_open(port)


def _deploy(api: Any, name: str, devices: list[Device], ports: list[int]) -> tuple[dict[str, Any], str]:
    body = {
        "model": name, "version": "1", "devices": [d["id"] for d in devices], "python": "~/py",
        "ports": {d["id"]: p for d, p in zip(devices, ports, strict=True)},
    }  # fmt: skip
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    assert job["kind"] == "deploy"
    return api.wait_job(job["id"], timeout=120), str(job["params"]["deployment"])


def test_deploy_call_with_tritonclient_then_remove(
    api: Any, worker: Any, pair: list[SimDevice], devices: list[Device]
) -> None:
    import onnxruntime as ort
    import tritonclient.http as httpclient

    for d in pair:
        _python(d, sys.executable)
    name = f"digits-dep-{time.time_ns() % 10**9}"
    data = _push_model(api, name)
    ports = [free_port(), free_port()]
    job, dep_id = _deploy(api, name, devices, ports)
    assert job["state"] == "succeeded", job
    status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
    assert status == 200 and dep["state"] == "running"
    assert [t["state"] for t in dep["targets"]] == ["running", "running"]
    assert {t["endpoint"] for t in dep["targets"]} == {f"{d.host}:{p}" for d, p in zip(pair, ports, strict=True)}
    status, page = api.call("GET", "/api/v1/deployments")
    assert status == 200 and dep_id in [x["id"] for x in page["items"]]

    # a standard Open Inference Protocol client against each device, vs ONNX Runtime in process
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    for t in dep["targets"]:
        client = httpclient.InferenceServerClient(t["endpoint"])
        assert client.is_server_ready()
        inp = httpclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer(name, [inp], model_version="1").as_numpy("probs")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert t["sha256"] == dep["sha256"] and t["version"] == "1"

    # the model cannot be deleted while deployed
    status, body = api.call("DELETE", f"/api/v1/models/{name}/versions/1")
    assert status == 409 and "deployed" in body["message"]
    status, version = api.call("GET", f"/api/v1/models/{name}/versions/1")
    assert version["deployed"] is True

    # removal stops the servers (ports closed) and removes the folders
    status, job = api.call("DELETE", f"/api/v1/deployments/{dep_id}")
    assert status == 202 and job["kind"] == "deploy-remove"
    job = api.wait_job(job["id"], timeout=60)
    assert job["state"] == "succeeded", job
    for d, p in zip(pair, ports, strict=True):
        wait_until(functools.partial(_port_closed, p), 10, f"port {p} to close")
        assert not (d.home / ".evc" / "deploy" / dep_id).exists()
    assert api.call("GET", f"/api/v1/deployments/{dep_id}")[0] == 404
    assert api.call("DELETE", f"/api/v1/models/{name}/versions/1")[0] == 200


def test_a_device_without_onnxruntime_fails_with_the_reason(
    api: Any, worker: Any, pair: list[SimDevice], devices: list[Device]
) -> None:
    if os.system(f"{SYSTEM_PYTHON} -c 'import onnxruntime' 2>/dev/null") == 0:  # noqa: S605
        pytest.skip("this host's system Python has onnxruntime")
    _python(pair[0], sys.executable)
    _python(pair[1], SYSTEM_PYTHON)
    name = f"digits-dep-{time.time_ns() % 10**9}"
    _push_model(api, name)
    ports = [free_port(), free_port()]
    job, dep_id = _deploy(api, name, devices, ports)
    assert job["state"] == "partial", job
    bad = job["results"][devices[1]["id"]]
    assert not bad["ok"] and f"~/py on {pair[1].name} has no onnxruntime" in bad["error"]["message"]
    status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
    assert dep["state"] == "partial"
    good, failed = dep["targets"]
    assert good["state"] == "running" and _port_open(ports[0])
    assert failed["state"] == "failed" and "has no onnxruntime" in failed["reason"]
    job = api.wait_job(api.call("DELETE", f"/api/v1/deployments/{dep_id}")[1]["id"], timeout=60)
    assert job["state"] == "succeeded", job
    wait_until(functools.partial(_port_closed, ports[0]), 10, "the port to close")
    assert not (Path(pair[0].home) / ".evc" / "deploy" / dep_id).exists()


def test_cli_deploy_list_show_rm(
    api: Any, worker: Any, live: str, pair: list[SimDevice], devices: list[Device]
) -> None:
    from tests.fixtures.cli import evc

    _python(pair[0], sys.executable)
    name = f"digits-dep-{time.time_ns() % 10**9}"
    _push_model(api, name)
    port = free_port()
    code, out, text = evc(live, api.admin, "deploy", f"{name}:1", "--device", pair[0].name, "--port", str(port),
                          "--python", "~/py", "--wait")  # fmt: skip
    assert code == 0, text
    assert "running" in text and f"127.0.0.1:{port}" in text
    dep_id = text.split("deployment ", 1)[1].split(":", 1)[0]
    code, out, text = evc(live, api.admin, "deployment", "list")
    assert code == 0 and dep_id in text and "1/1" in text
    code, out, text = evc(live, api.admin, "--json", "deployment", "show", dep_id)
    assert code == 0 and json.loads(out)["targets"][0]["endpoint"] == f"127.0.0.1:{port}"
    code, out, text = evc(live, api.admin, "model", "rm", f"{name}:1")
    assert code != 0 and "deployed" in text
    code, out, text = evc(live, api.admin, "deployment", "rm", dep_id, "--wait")
    assert code == 0 and "succeeded" in text, text
    assert not _port_open(port)


def test_cluster_deployment_takes_the_clusters_python_and_survives_a_cut(
    api: Any, worker: Any, store: Store, simulator: SimulatorThread, pair: list[SimDevice], devices: list[Device]
) -> None:
    """A cluster's members, its FL python by default; the servers outlive the SSH connections
    (the simulator hangs up every command a device runs when it goes down)."""
    for d in pair:
        _python(d, sys.executable)
    status, cl = api.call("POST", "/api/v1/clusters", json={
        "name": f"dep-{time.time_ns() % 10**9}", "profile": "direct", "vars": {"fl-client": {"python": "~/py"}},
    })  # fmt: skip
    assert status == 201, cl
    for rec in devices:
        assert store.claim_membership(cl["id"], rec["id"]) is None
    name = f"digits-dep-{time.time_ns() % 10**9}"
    _push_model(api, name)
    ports = [free_port(), free_port()]
    body = {"model": name, "version": "1", "cluster": cl["id"],
            "ports": {rec["id"]: p for rec, p in zip(devices, ports, strict=True)}}  # fmt: skip
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    job = api.wait_job(job["id"], timeout=120)
    assert job["state"] == "succeeded", job
    dep_id = job["params"]["deployment"]
    dep = api.call("GET", f"/api/v1/deployments/{dep_id}")[1]
    assert dep["python"] == "~/py" and dep["cluster"] == cl["id"]
    simulator.set_fault(pair[0].name, "down")
    simulator.set_fault(pair[0].name, "ok")
    time.sleep(0.5)
    assert _port_open(ports[0]) and _port_open(ports[1])
    job = api.wait_job(api.call("DELETE", f"/api/v1/deployments/{dep_id}")[1]["id"], timeout=60)
    assert job["state"] == "succeeded", job
    for rec in devices:
        store.release_membership(cl["id"], rec["id"])
    api.call("DELETE", f"/api/v1/clusters/{cl['id']}")


def test_bad_requests_are_clear_4xx(api: Any, devices: list[Device]) -> None:
    ids = [d["id"] for d in devices]
    status, body = api.call("POST", "/api/v1/deployments", json={"model": "nope", "version": "1", "devices": ids})
    assert status == 404 and "nope:1" in body["message"]
    name = f"digits-dep-{time.time_ns() % 10**9}"
    _push_model(api, name)
    base = {"model": name, "version": "1"}
    status, body = api.call("POST", "/api/v1/deployments", json={**base, "devices": ids, "runtime": "kubernetes"})
    assert status == 422 and "runtime" in json.dumps(body)
    bad_image = {**base, "devices": ids, "runtime": "container", "image": "evc; rm -rf ~"}
    assert api.call("POST", "/api/v1/deployments", json=bad_image)[0] == 422
    status, body = api.call("POST", "/api/v1/deployments", json={**base, "devices": ids, "cluster": "c1"})
    assert status == 422
    status, body = api.call("POST", "/api/v1/deployments", json={**base, "devices": ["dev_nope"]})
    assert status == 404
    status, body = api.call("POST", "/api/v1/deployments", json={**base, "devices": ids, "python": "python3; rm -rf ~"})
    assert status == 422
    status, body = api.call("POST", "/api/v1/deployments", json={**base, "devices": ids, "ports": {"dev_x": 9000}})
    assert status == 422 and "dev_x" in body["message"]
    assert api.call("GET", "/api/v1/deployments/dep_nope")[0] == 404
    assert api.call("DELETE", "/api/v1/deployments/dep_nope")[0] == 404
    assert api.call("DELETE", f"/api/v1/models/{name}/versions/1")[0] == 200
