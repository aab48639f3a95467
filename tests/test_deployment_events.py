"""Deployments seen from outside: Prometheus discovery of the edge inference servers
(``/api/v1/prometheus/targets?exporter=infer``) and the webhook's deployment events, posted to a
real HTTP receiver on loopback around the job bodies (real Redis store)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import HTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from evc import monitoring
from evc.auth import create_operator_token
from evc.context import Context
from evc.deployments import events
from evc.errors import DeviceError
from evc.model import Cluster, Device
from evc.settings import Settings
from evc.store import JSON, Store, new_id, now
from tests.fixtures.helpers import webhook_receiver
from tests.fixtures.prometheus import PrometheusServer, free_port, wait_until

TARGETS = "/api/v1/prometheus/targets"
PROMETHEUS_YML = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "prometheus.yml"


def _dep(dep_id: str = "dep_1", **extra: Any) -> JSON:
    return {
        "id": dep_id, "model": "digits", "version": "1", "variant": None, "served_version": "1",
        "cluster": None, "devices": ["dev_a", "dev_b"], "state": "running", **extra,
    }  # fmt: skip


# ------------------------------------------------------------------------------ pure helpers
def test_infer_targets_list_running_devices_with_their_labels() -> None:
    states = {
        "dev_b": {"state": "running", "version": "1-int8", "endpoint": "10.0.0.6:8500"},
        "dev_a": {"state": "running", "version": "1-int8", "endpoint": "10.0.0.5:8501"},
        "dev_c": {"state": "failed", "reason": "no onnxruntime", "version": "1-int8"},
        "dev_d": {"state": "pending"},
    }
    devices = {
        "dev_a": {"id": "dev_a", "name": "alpha", "cluster_id": "cl_1"},
        "dev_b": {"id": "dev_b", "name": "beta"},
    }
    groups = monitoring.infer_target_groups(
        [(_dep(served_version="1-int8", variant="int8"), states)], devices, {"cl_1": {"name": "edge"}}
    )
    assert groups == [
        {
            "targets": ["10.0.0.5:8501"],
            "labels": {
                "deployment": "dep_1", "model": "digits", "version": "1-int8", "device": "alpha",
                "device_id": "dev_a", "cluster": "cl_1", "cluster_name": "edge",
            },
        },
        {
            "targets": ["10.0.0.6:8500"],
            "labels": {
                "deployment": "dep_1", "model": "digits", "version": "1-int8", "device": "beta",
                "device_id": "dev_b", "cluster": "", "cluster_name": "",
            },
        },
    ]  # fmt: skip
    assert "infer" in monitoring.EXPORTERS


def test_deploy_events_name_each_device_that_changed() -> None:
    dep = _dep(state="deploying")
    before = (dep, {"dev_a": {"state": "pending", "updated_at": 1}, "dev_b": {"state": "pending", "updated_at": 1}})
    after = (
        {**dep, "state": "partial"},
        {
            "dev_a": {"state": "running", "version": "1", "endpoint": "10.0.0.5:8500", "updated_at": 2},
            "dev_b": {"state": "failed", "reason": "no onnxruntime", "version": "1", "updated_at": 2},
        },
    )
    evs = events.changes("deploy", before, after, {"dev_a": "alpha", "dev_b": "beta"}, at=5.0)
    assert [(e["event"], e["name"], e["state"], e["deployment_state"]) for e in evs] == [
        (events.DEVICE, "alpha", "running", "partial"),
        (events.DEVICE, "beta", "failed", "partial"),
    ]
    assert evs[0]["endpoint"] == "10.0.0.5:8500" and evs[1]["reason"] == "no onnxruntime"
    body = events.webhook_body(evs)
    assert body["type"] == "deployment"
    assert body["text"].splitlines() == [
        "deployment dep_1 (digits:1) on alpha: running",
        "deployment dep_1 (digits:1) on beta: failed (no onnxruntime)",
    ]
    assert events.changes("deploy", after, after, {}) == []  # nothing changed: nothing to say


def test_remove_events_end_with_removed_once_the_record_is_gone() -> None:
    dep = _dep(state="removing")
    before = (dep, {"dev_a": {"state": "running", "updated_at": 1}})
    gone = events.changes("deploy-remove", before, (None, {}), {}, at=5.0)
    assert [e["event"] for e in gone] == [events.REMOVED]
    left = events.changes("deploy-remove", before, (dep, {"dev_a": {"state": "removed", "updated_at": 2}}), {})
    assert [(e["event"], e["state"]) for e in left] == [(events.DEVICE, "removed")]
    assert events.webhook_body(gone)["text"] == "deployment dep_1 (digits:1): removed"


# ------------------------------------------------------------------------------ with Redis and HTTP
_Hook = webhook_receiver()  # what the webhook was sent: _Hook.received


@pytest.fixture()
def hook() -> Iterator[str]:
    _Hook.received.clear()
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def recorded(store: Store) -> Iterator[tuple[Any, list[Device], JSON]]:
    """A cluster, two devices in it and a deployment of them (as ``submit`` records it)."""
    tag = new_id("x")[-6:]
    cluster = store.create_cluster(
        cast(Cluster, {"id": new_id("cl"), "name": f"ev-{tag}", "profile": "direct", "created_at": now()})
    )
    devs = []
    for i in range(2):
        rec = {
            "id": new_id("dev"), "name": f"ev-{tag}-{i}", "host": "127.0.0.1", "state": "online",
            "cluster_id": cluster["id"], "facts": {}, "created_at": now(),
        }  # fmt: skip
        devs.append(store.create_device(cast(Device, rec), token_hash=f"h-{rec['id']}"))
    dep = store.create_deployment(
        _dep(new_id("dep"), cluster=cluster["id"], devices=[d["id"] for d in devs], state="deploying")
    )
    yield cluster, devs, dep
    try:
        store.delete_deployment(dep["id"])
    except Exception:  # noqa: BLE001, S110 - the test removed it
        pass
    for d in devs:
        store.delete_device(d["id"])
    store.delete_cluster(cluster["id"])


def _wait_for(n: int, timeout: float = 5.0) -> list[JSON]:
    deadline = time.monotonic() + timeout
    while len(_Hook.received) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return list(_Hook.received)


def test_deploy_and_remove_jobs_post_their_events(
    store: Store, settings: Settings, hook: str, recorded: tuple[Any, list[Device], JSON]
) -> None:
    _, (a, b), dep = recorded
    s = settings.replace(webhook_url=hook)

    def deploy_body() -> str:  # what the deploy job records: one device running, one failed
        store.set_deployment_device(dep["id"], a["id"], {"state": "running", "version": "1", "endpoint": "h:1"})
        store.set_deployment_device(dep["id"], b["id"], {"state": "failed", "reason": "boom", "version": "1"})
        store.update_deployment(dep["id"], state="partial")
        return "done"

    assert events.around_job(store, s, "deploy", dep["id"], deploy_body) == "done"
    started, devices = _wait_for(2)
    assert started["events"] == [
        {**started["events"][0], "event": "deployment.started", "deployment": dep["id"], "model": "digits"}
    ]
    assert [(e["name"], e["state"], e["deployment_state"]) for e in devices["events"]] == [
        (a["name"], "running", "partial"),
        (b["name"], "failed", "partial"),
    ]

    def remove_body() -> None:  # a failing job still reports what it did
        store.set_deployment_device(dep["id"], a["id"], {"state": "removed"})
        store.delete_deployment(dep["id"])
        raise DeviceError("one device left behind")

    _Hook.received.clear()
    with pytest.raises(DeviceError):
        events.around_job(store, s, "deploy-remove", dep["id"], remove_body)
    (body,) = _wait_for(1)
    assert [e["event"] for e in body["events"]] == ["deployment.removed"]
    assert events.around_job(store, settings.replace(webhook_url=""), "deploy", "dep_nonexistent", lambda: 1) == 1


def test_a_lost_device_is_posted_unreachable(
    store: Store, settings: Settings, hook: str, recorded: tuple[Any, list[Device], JSON]
) -> None:
    """The health sweep's hook (:func:`evc.deployments.converge.on_health`): the device lost is
    ``unreachable`` in its deployment, which is ``partial``, and the webhook hears it."""
    from evc.context import Context
    from evc.deployments import converge

    _, (a, b), dep = recorded
    for d in (a, b):
        store.set_deployment_device(dep["id"], d["id"], {"state": "running", "version": "1", "endpoint": "h:1"})
    store.update_deployment(dep["id"], state="running")
    s = settings.replace(webhook_url=hook)
    change = {"type": "device.state", "device": a["id"], "from": "degraded", "to": "offline", "reason": "3 misses"}
    assert converge.on_health(Context(store, s), [change]) == []
    (body,) = _wait_for(1)
    (ev,) = body["events"]
    assert (ev["event"], ev["name"], ev["state"], ev["deployment_state"]) == (
        "deployment.device", a["name"], "unreachable", "partial",
    )  # fmt: skip
    assert "device offline: 3 misses" in ev["reason"] and f"{a['name']}: unreachable" in body["text"]
    assert store.get_deployment(dep["id"])["state"] == "partial"
    # lost again: nothing new to say
    _Hook.received.clear()
    converge.on_health(Context(store, s), [change])
    assert _wait_for(1, timeout=0.5) == []


def test_discovery_lists_running_deployments(api: Any, store: Store, recorded: tuple[Any, list[Device], JSON]) -> None:
    cluster, (a, b), dep = recorded
    store.set_deployment_device(dep["id"], a["id"], {"state": "running", "version": "1", "endpoint": "127.0.0.1:8601"})
    store.set_deployment_device(dep["id"], b["id"], {"state": "failed", "reason": "boom"})
    assert api.call("GET", TARGETS + "?exporter=infer", token=None)[0] == 401
    status, groups = api.call("GET", TARGETS + "?exporter=infer", token="read")
    assert status == 200
    assert [g for g in groups if g["labels"]["deployment"] == dep["id"]] == [
        {
            "targets": ["127.0.0.1:8601"],
            "labels": {
                "deployment": dep["id"], "model": "digits", "version": "1", "device": a["name"],
                "device_id": a["id"], "cluster": cluster["id"], "cluster_name": cluster["name"],
            },
        }
    ]  # fmt: skip
    store.delete_deployment(dep["id"])
    _, groups = api.call("GET", TARGETS + "?exporter=infer", token="read")
    assert not [g for g in groups if g["labels"]["deployment"] == dep["id"]]


# ------------------------------------------------------------------------------ with a real Prometheus
@pytest.mark.slow
def test_prometheus_discovers_and_scrapes_a_deployed_edge_server(
    api: Any,
    store: Store,
    settings: Settings,
    recorded: tuple[Any, list[Device], JSON],
    start_prometheus: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    """The deployed ``evc-infer`` scrape job, pointed at the API over HTTP: Prometheus finds the
    running edge server of a deployment and scrapes its ``evc_infer_requests_total``."""
    from tests.fixtures.onnx_models import digits_model, models_folder
    from tests.test_monitoring_e2e import HTTPAPI

    _, (a, _b), dep = recorded
    port = free_port()
    folder = models_folder(tmp_path / "models", {("digits", "1"): digits_model()[0]})
    server = subprocess.Popen(
        [sys.executable, "-m", "evc.device.infer", "--models-dir", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "WARNING"],
        start_new_session=True,
    )  # fmt: skip
    http = HTTPAPI(api.app)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _get(base + "/v2/health/ready") == 200, 60, "the edge server to be ready")
        body = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
        for _ in range(3):
            req = urllib.request.Request(
                base + "/v2/models/digits/versions/1/infer",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
                assert r.status == 200
        store.set_deployment_device(
            dep["id"], a["id"], {"state": "running", "version": "1", "endpoint": f"127.0.0.1:{port}"}
        )
        _, reader = create_operator_token(Context(store, settings), f"prom-{dep['id']}", ["read"])
        token_file = tmp_path / "evc-token"
        token_file.write_text(reader + "\n")
        job = _infer_job(http.port, token_file, dep["id"])
        srv = start_prometheus([job])
        srv.wait_for_scrapes("evc-infer", samples=2, timeout=60)
        got = srv.query(f'evc_infer_requests_total{{job="evc-infer", deployment="{dep["id"]}"}}')
        assert got, "no evc_infer_requests_total scraped"
        labels = got[0]["metric"]
        assert labels["device"] == a["name"] and labels["device_id"] == a["id"]
        assert labels["instance"] == f"{dep['id']}/{a['name']}"
        assert labels["model"] == "digits" and labels["version"] == "1"  # the server's own (honor_labels)
        assert sum(float(r["value"][1]) for r in got if r["metric"].get("status") == "200") == 3
    finally:
        http.close()
        server.terminate()
        server.wait(30)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback
            return int(r.status)
    except (OSError, urllib.error.URLError):
        return 0


def _infer_job(api_port: int, token_file: Path, deployment_id: str) -> dict[str, Any]:
    """The deployed evc-infer scrape job, pointed at the test API, keeping this test's deployment."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "evc-infer")
    (sd,) = job["http_sd_configs"]
    assert sd["url"].endswith(TARGETS + "?exporter=infer")
    sd.update(url=f"http://127.0.0.1:{api_port}{TARGETS}?exporter=infer", refresh_interval="1s")
    sd["authorization"]["credentials_file"] = str(token_file)
    keep = {"source_labels": ["deployment"], "regex": deployment_id, "action": "keep"}
    job["relabel_configs"] = [keep, *job.get("relabel_configs", [])]
    return dict(job)
