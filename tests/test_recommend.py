"""Model recommendation end to end: the API, a real Celery worker, simulated devices over SSH
(with real CPU quotas where this host allows them), a real Redis; calibration and profiling run
the one-shot runner on the devices; the recommendation, ``variant: recommended`` for a
deployment, and the fleet follower raising ``recommendation.changed``."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from evc.embedded import free_port
from evc.model import Device
from evc.recommend import advise, calibration
from evc.settings import Settings
from evc.store import Store
from evc_sim import SimDevice, SimulatorThread, cpuquota
from tests.fixtures.deploy import device_records, started_devices
from tests.fixtures.onnx_models import accuracy, digits_cnn

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(simulator: SimulatorThread) -> Iterator[list[SimDevice]]:
    prefix = f"rc{os.getpid() % 10000}"
    if cpuquota.unavailable_reason() is None:
        devices = simulator.start(2, prefix, privileges="root", cpus=(0.5, 1.0))
        try:
            yield devices
        finally:
            for d in devices:
                simulator.remove(d.name)
        return
    with started_devices(simulator, 2, prefix) as devices:
        yield devices


@pytest.fixture()
def devices(store: Store, pair: list[SimDevice]) -> Iterator[list[Device]]:
    for d in pair:
        (d.home / "py").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        (d.home / "py").chmod(0o755)
    with device_records(store, pair) as out:
        yield out


def _push(api: Any, name: str) -> dict[str, float]:
    """Version 1 (width 4), its int8 and a width-2 variant, each with its accuracy."""
    base, narrow = digits_cnn(4), digits_cnn(2)
    int8 = calibration.quantize(base)
    acc = {"base": accuracy(base), "int8": accuracy(int8), "w2": accuracy(narrow)}
    meta = {"name": name, "version": "1", "accuracy": {"dataset": "digits-test", "value": acc["base"]}}
    form = {"metadata": json.dumps(meta), "file": (io.BytesIO(base), "m.onnx")}
    assert api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")[0] == 201
    for variant, data in (("int8", int8), ("w2", narrow)):
        meta = {"variant": variant, "accuracy": {"dataset": "digits-test", "value": acc[variant]}}
        form = {"metadata": json.dumps(meta), "file": (io.BytesIO(data), "m.onnx")}
        path = f"/api/v1/models/{name}/versions/1/variants"
        assert api.call("POST", path, data=form, content_type="multipart/form-data")[0] == 201
    return acc


class _Hook(BaseHTTPRequestHandler):
    bodies: list[Any] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        _Hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_calibrate_profile_recommend_deploy_and_follow(
    api: Any, worker: Any, store: Store, settings: Settings, devices: list[Device]
) -> None:
    name = f"digits-rc-{time.time_ns() % 10**9}"
    acc = _push(api, name)
    ids = [d["id"] for d in devices]
    status, job = api.call("POST", "/api/v1/devices/calibrate", json={"devices": ids, "python": "~/py"})
    assert status == 202 and job["kind"] == "device-calibrate", job
    assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
    status, cal = api.call("GET", f"/api/v1/devices/{ids[0]}/calibration")
    assert status == 200 and cal["summary"]["conv_gflops"] > 0 and len(cal["timings_ms"]) == len(calibration.GRAPHS)

    # bad input is a 4xx with a message
    status, body = api.call("POST", f"/api/v1/models/{name}/profile", json={"devices": ids, "variants": ["nope"]})
    assert status == 422 and "nope" in body["message"]

    # profile two of the three variants on the first device only: the rest is predicted
    body = {"devices": ids[:1], "variants": ["base", "int8"], "batches": [1, 8], "warmup": 2, "timed": 10,
            "python": "~/py"}  # fmt: skip
    status, job = api.call("POST", f"/api/v1/models/{name}/profile", json=body)
    assert status == 202 and job["kind"] == "model-profile", job
    assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
    status, profiles = api.call("GET", f"/api/v1/models/{name}/profiles")
    assert status == 200 and len(profiles["items"]) == 2
    p = profiles["items"][0]
    assert p["batches"]["8"]["p50_ms"] > 0 and p["peak_rss_bytes"] > 0 and p["runtime"] == "onnxruntime-cpu"

    q = {"devices": ids, "objective": "latency", "batch": 8, "follow_load": "false"}
    status, rec = api.call("GET", f"/api/v1/models/{name}/recommend", query_string=q)
    assert status == 200, rec
    by = {d["device"]: d for d in rec["devices"]}
    assert set(by) == set(ids) and not rec["unable"]
    sources = {v["figures"]["source"] for v in by.values()}
    assert by[ids[1]]["figures"]["source"] == "predicted" and by[ids[1]]["figures"]["uncertainty"] > 0
    assert sources <= {"measured", "predicted"} and len(by[ids[0]]["rejected"]) == 2
    assert rec["predictor"]["profiles"] == 4

    # an accuracy no variant has: every device named with the reason
    q2 = {**q, "min_accuracy": 0.9999}
    rec2 = api.call("GET", f"/api/v1/models/{name}/recommend", query_string=q2)[1]
    assert not rec2["devices"] and len(rec2["unable"]) == 2
    assert f"accuracy {acc['base']:.3f} < 0.9999" in rec2["unable"][0]["reason"]

    # the objective accuracy: the best variant by accuracy on both, and variant: recommended deploys it
    q3 = {"devices": ids, "objective": "accuracy", "follow_load": "false"}
    rec3 = api.call("GET", f"/api/v1/models/{name}/recommend", query_string=q3)[1]
    best = max(acc, key=lambda k: (acc[k], k == "base"))
    labels = {d["label"] for d in rec3["devices"]}
    assert len(labels) == 1, rec3
    port = free_port()
    body = {"model": name, "version": "1", "variant": "recommended", "devices": ids[:1], "python": "~/py", "port": port}
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    dep_id = job["params"]["deployment"]
    dep = api.call("GET", f"/api/v1/deployments/{dep_id}")[1]
    assert (dep["variant"] or "base") == rec3["devices"][0]["label"]
    assert acc[rec3["devices"][0]["label"]] == acc[best]
    assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
    status, job = api.call("DELETE", f"/api/v1/deployments/{dep_id}")
    assert api.wait_job(job["id"], timeout=60)["state"] == "succeeded"

    # the fleet follower: the second device now very loaded, under a latency bound it no longer meets
    fast = rec["devices"][0]["figures"]["p95_ms"]
    bound = 2 * max(d["figures"]["p95_ms"] for d in rec["devices"])
    api.call(
        "GET", f"/api/v1/models/{name}/recommend", query_string={**q, "max_latency_ms": bound, "follow_load": "true"}
    )
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store.update_device(ids[1], health={"load1": 1000.0 * max(fast, 1.0), "checked_at": time.time()},
                            facts={"cpus": 1})  # fmt: skip
        hooked = settings.replace(webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
        changed = advise.follow(store, hooked, [ids[1]])
    finally:
        server.shutdown()
    assert [(c["device"], c["to"]) for c in changed] == [(ids[1], None)], changed
    assert "recommendation.changed" in {e.get("type") for e in store.fleet_events(20)}
    assert _Hook.bodies and _Hook.bodies[-1]["type"] == "recommend"
    assert api.call("GET", f"/api/v1/devices/{ids[1]}/calibration")[0] == 404  # the facts changed: expired
    text = api.client.get("/metrics").get_data(as_text=True)
    assert f'evc_recommend_chosen{{device="{devices[0]["name"]}",model="{name}"' in text
    assert api.call("DELETE", f"/api/v1/models/{name}/versions/1")[0] == 200
