"""Collaborative inference end to end: the API, a real Celery worker, a simulated device over
SSH running two deployments (a light edge model, a CNN), a real Redis; the controller reaches
the edge servers through the shaped link proxy (``evc_sim.linkproxy``)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evc.embedded import free_port
from evc.model import Device
from evc.store import Store
from evc_sim import SimDevice, SimulatorThread
from evc_sim.linkproxy import LinkProxy
from tests.fixtures.cli import evc
from tests.fixtures.collab_models import Digits, accuracy, cached_cloud_model, digits, edge_model
from tests.fixtures.deploy import device_records, started_devices

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sims(simulator: SimulatorThread) -> Iterator[list[SimDevice]]:
    with started_devices(simulator, 1, f"co{os.getpid() % 10000}") as devices:
        py = devices[0].home / "py"
        py.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        py.chmod(0o755)
        yield devices


@pytest.fixture()
def devices(store: Store, sims: list[SimDevice]) -> Iterator[list[Device]]:
    with device_records(store, sims) as out:
        yield out


def _push(api: Any, name: str, data: bytes) -> None:
    form = {"metadata": json.dumps({"name": name, "version": "1"}), "file": (io.BytesIO(data), "model.onnx")}
    status, body = api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")
    assert status == 201, body


def _deploy(api: Any, name: str, dev: Device) -> tuple[str, int]:
    port = free_port()
    body = {"model": name, "version": "1", "devices": [dev["id"]], "python": "~/py", "ports": {dev["id"]: port},
            "threads": 1}  # fmt: skip
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    job = api.wait_job(job["id"], timeout=120)
    assert job["state"] == "succeeded", job
    return str(job["params"]["deployment"]), port


def _dataset(api: Any, x: np.ndarray, y: np.ndarray) -> str:
    buf = io.BytesIO()
    np.savez(buf, X=x, y=y)
    form = {"file": (io.BytesIO(buf.getvalue()), "set.npz")}
    status, body = api.call("POST", "/api/v1/eval-sets", data=form, content_type="multipart/form-data")
    assert status == 201, body
    return str(body["sha256"])


def _run(api: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, job = api.call("POST", f"/api/v1/inference/{path}", json=body)
    assert status == 202, job
    job = api.wait_job(job["id"], timeout=120)
    assert job["state"] == "succeeded", (job["error"], job["summary"])
    return dict(job["summary"])


def test_joint_and_split_through_a_shaped_link(
    api: Any, worker: Any, live: str, devices: list[Device], tmp_path: Path
) -> None:
    d: Digits = digits()
    edge, cloud = edge_model(d), cached_cloud_model(d)
    tag = time.time_ns() % 10**9
    _push(api, f"edge-{tag}", edge)
    _push(api, f"cnn-{tag}", cloud)
    edge_dep, edge_port = _deploy(api, f"edge-{tag}", devices[0])
    cnn_dep, cnn_port = _deploy(api, f"cnn-{tag}", devices[0])
    data, cal = _dataset(api, d.x_test[:160], d.y_test[:160]), _dataset(api, d.x_cal, d.y_cal)
    links = [LinkProxy(("127.0.0.1", p), rate_mbit=50, delay_ms=1, directions="down") for p in (edge_port, cnn_port)]
    ports = [link.start() for link in links]
    try:
        # bad input: a threshold or a target is needed, a target needs a calibration set
        body: dict[str, Any] = {"deployment": edge_dep, "cloud": {"model": f"cnn-{tag}", "version": "1"}, "data": data}
        status, err = api.call("POST", "/api/v1/inference/joint", json=body)
        assert status == 422 and "threshold" in err["message"]
        status, err = api.call("POST", "/api/v1/inference/joint", json={**body, "target_offload": 0.3})
        assert status == 422 and "calibration" in err["message"]

        s = _run(api, "joint", {**body, "calibration": cal, "target_offload": 0.3, "endpoint": f"127.0.0.1:{ports[0]}"})
        want_edge, want_cloud = (
            accuracy(edge, d.x_test[:160], d.y_test[:160]),
            accuracy(cloud, d.x_test[:160], d.y_test[:160]),
        )
        assert s["edge_only"]["accuracy"] == pytest.approx(want_edge, abs=1e-6)
        assert s["cloud_only"]["accuracy"] == pytest.approx(want_cloud, abs=1e-6)
        assert 0 < s["joint"]["offload"] <= 0.4 and s["tuning"]["offload"] <= 0.3
        assert s["joint"]["accuracy"] > s["edge_only"]["accuracy"]
        assert s["edge_only"]["bytes_sent"] < s["joint"]["bytes_sent"] < s["cloud_only"]["bytes_sent"]
        assert len(s["curve"]) == 21 and s["curve"][-1]["accuracy"] == pytest.approx(want_cloud, abs=1e-6)

        # the cloud tier on a designated device: the CNN's deployment
        s = _run(api, "joint", {**body, "cloud": {"deployment": cnn_dep}, "threshold": 0.9})
        assert s["cloud_only"]["accuracy"] == pytest.approx(want_cloud, abs=1e-6)
        assert s["edge_only"]["accuracy"] == pytest.approx(want_edge, abs=1e-6) and 0 < s["joint"]["offload"] < 1

        body = {"deployment": cnn_dep, "endpoint": f"127.0.0.1:{ports[1]}", "batch": 8, "rounds": 5,
                "measure_all": True, "data": data}  # fmt: skip
        s = _run(api, "split", body)
        assert len(s["candidates"]) == 11 and s["chosen"] in {c["cut"] for c in s["candidates"]}
        assert all(c["measured_ms"] > 0 and c["predicted_ms"] > 0 for c in s["candidates"])
        assert s["run"]["accuracy"] == pytest.approx(want_cloud, abs=1e-6)
        assert 10 < s["link"]["bandwidth_mbit"] < 80 and "predicts" in s["why"]

        # the CLI: upload the data, follow the job, show the table
        npz = tmp_path / "test.npz"
        np.savez(npz, X=d.x_test[:64], y=d.y_test[:64])
        code, _, text = evc(live, api.admin, "infer", "joint", "--deployment", edge_dep, "--cloud", f"cnn-{tag}:1",
                            "--data", str(npz), "--threshold", "0.9")  # fmt: skip
        assert code == 0 and "edge_only" in text and "cloud_only" in text, text
        code, _, text = evc(live, api.admin, "infer", "split", "--deployment", cnn_dep, "--cut", "4", "--batch", "4",
                            "--rounds", "3", "--data", str(npz))  # fmt: skip
        assert code == 0 and "picked c4: c4 was asked for" in text and "pool1" in text, text
        code, _, text = evc(live, api.admin, "infer", "split", "--deployment", cnn_dep, "--cut", "99")
        assert code != 0 and "cut must be" in text, text
    finally:
        for link in links:
            link.stop()
        for dep in (edge_dep, cnn_dep):
            api.wait_job(api.call("DELETE", f"/api/v1/deployments/{dep}")[1]["id"], timeout=60)
