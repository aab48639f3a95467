"""Monitoring end to end: the exporter playbook, service discovery and the metrics endpoints.

The end-to-end test registers simulated devices through the API and a real Celery worker, runs
the ``exporter`` playbook on them through the provisioning service (real ansible-playbook), serves
the API over real HTTP, and points a real Prometheus at ``/api/v1/prometheus/targets`` with a
read-only token: Prometheus discovers the exporters, scrapes their real metrics, fires
EVCDeviceDown when one stops, and forgets a device removed from EVC. The other tests cover the
pure helpers, the endpoints, and the process-exit hooks of gunicorn and Celery.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from evc import monitoring
from evc.auth import create_operator_token
from evc.context import Caller, Context
from evc.model import Cluster, Device
from evc.provisioning.service import ProvisionRequest, submit_provision
from evc.settings import Settings
from evc.store import JSON, Store, new_id, now
from evc_sim import SimDevice
from tests.fixtures.prometheus import (
    PrometheusServer,
    alive,
    build_prometheus_client_wheel,
    exporter_dir,
    free_port,
    read_pid,
    rewrite_rule_durations,
    stop_exporter,
    wait_until,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "evc.yml"
TARGETS = "/api/v1/prometheus/targets"


# ------------------------------------------------------------------------------ pure helpers
def _device(name: str, **extra: Any) -> JSON:
    return {
        "id": f"dev_{name}", "name": name, "host": "10.0.0.5", "state": "online",
        "cluster_id": None, "facts": {"arch": "aarch64"}, **extra,
    }  # fmt: skip


def test_target_groups_list_monitored_devices_with_their_labels() -> None:
    record = monitoring.exporter_record({"exporter_port": 9200, "listen": "0.0.0.0", "mode": "auto"})
    with_node = monitoring.exporter_record({"node_exporter": True, "node_exporter_port": 9101})
    assert record is not None
    devices = [
        _device("zeta", exporter=record, cluster_id="cl_1"),
        _device("alpha", exporter=with_node, host="fd00::7", state="degraded", facts={}),
        _device("unmonitored"),
        _device("removed-exporter", exporter=monitoring.exporter_record({"state": "absent"})),
        _device("vpn", exporter={**record, "listen": "100.64.0.9"}),
        _device("loopback", exporter={**record, "listen": "127.0.0.1"}, host="edge-3.lan"),
    ]
    clusters = {"cl_1": {"id": "cl_1", "name": "line-1", "profile": "k3s"}}

    groups = monitoring.target_groups(devices, clusters)
    assert [g["labels"]["device"] for g in groups] == ["alpha", "loopback", "vpn", "zeta"]
    by_name = {g["labels"]["device"]: g for g in groups}
    assert by_name["zeta"] == {
        "targets": ["10.0.0.5:9200"],
        "labels": {
            "device": "zeta", "device_id": "dev_zeta", "cluster": "cl_1", "cluster_name": "line-1",
            "profile": "k3s", "arch": "aarch64", "state": "online",
        },
    }  # fmt: skip
    assert by_name["alpha"]["targets"] == ["[fd00::7]:9110"]
    assert by_name["alpha"]["labels"]["state"] == "degraded" and by_name["alpha"]["labels"]["arch"] == ""
    assert by_name["vpn"]["targets"] == ["100.64.0.9:9200"]  # bound to one address: scraped there
    assert by_name["loopback"]["targets"] == ["edge-3.lan:9200"]

    node = monitoring.target_groups(devices, clusters, "node")
    assert [(g["labels"]["device"], g["targets"]) for g in node] == [("alpha", ["[fd00::7]:9101"])]


def test_exporter_record_follows_the_playbook_variables() -> None:
    assert monitoring.exporter_record({}) == {
        "port": 9110, "listen": "0.0.0.0", "mode": "auto", "node_exporter": None,
    }  # fmt: skip
    assert monitoring.exporter_record({"mode": "container", "node_exporter": True}) == {
        "port": 9110, "listen": "0.0.0.0", "mode": "container", "node_exporter": {"port": 9100},
    }  # fmt: skip
    assert monitoring.exporter_record({"state": "absent", "exporter_port": 1}) is None


def test_exporter_bundle_is_reproducible_and_runs_alone(tmp_path: Path) -> None:
    first = monitoring.exporter_bundle(tmp_path / "a")
    again = monitoring.exporter_bundle(tmp_path / "b")
    assert first.name == again.name and first.read_bytes() == again.read_bytes()
    assert monitoring.exporter_bundle(tmp_path / "a") == first  # built once
    with zipfile.ZipFile(first) as zf:
        names = zf.namelist()
    assert "__main__.py" in names and f"{monitoring.BUNDLE_PACKAGE}/cli.py" in names
    assert not [n for n in names if n.startswith("evc/") or "__pycache__" in n]
    # runs with nothing of EVC importable: only the bundle and prometheus_client
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-I", str(first), "--once", "--disable", "tegrastats", "--disable", "nvidia"],
        capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert "evc_edge_exporter_build_info" in out.stdout and "evc_edge_load1" in out.stdout
    # and with no site-packages at all: the bundle carries the controller's prometheus_client
    assert "prometheus_client/__init__.py" in names
    bare = subprocess.run(
        [sys.executable, "-I", "-S", str(first), "--once", "--disable", "tegrastats", "--disable", "nvidia"],
        capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert "evc_edge_load1" in bare.stdout


# ------------------------------------------------------------------------------ endpoints
def test_targets_endpoint_needs_a_read_token_and_follows_the_registry(api: Any, store: Store) -> None:
    tag = secrets.token_hex(3)
    cluster = store.create_cluster(
        cast(Cluster, {"id": new_id("cl"), "name": f"mon-{tag}", "profile": "direct", "created_at": now()})
    )
    ids = []
    for i, exporter in enumerate([monitoring.exporter_record({"node_exporter": True}), None]):
        dev = {**_device(f"mon-{tag}-{i}"), "id": new_id("dev"), "exporter": exporter, "cluster_id": cluster["id"]}
        store.create_device(cast(Device, dev), token_hash=f"x-{dev['id']}")
        ids.append(dev["id"])
    try:
        assert api.call("GET", TARGETS, token=None)[0] == 401
        status, groups = api.call("GET", TARGETS, token="read")
        assert status == 200
        mine = [g for g in groups if g["labels"]["device_id"] in ids]
        assert mine == [
            {
                "targets": ["10.0.0.5:9110"],
                "labels": {
                    "device": f"mon-{tag}-0", "device_id": ids[0], "cluster": cluster["id"],
                    "cluster_name": f"mon-{tag}", "profile": "direct", "arch": "aarch64", "state": "online",
                },
            }
        ]  # fmt: skip
        status, node = api.call("GET", TARGETS + "?exporter=node", token="read")
        assert status == 200 and [g["targets"] for g in node if g["labels"]["device_id"] in ids] == [["10.0.0.5:9100"]]
        assert api.call("GET", TARGETS + "?exporter=cadvisor", token="read")[0] == 422

        assert api.call("DELETE", f"/api/v1/devices/{ids[0]}")[0] == 200
        ids.pop(0)
        _, groups = api.call("GET", TARGETS, token="read")
        assert not [g for g in groups if g["labels"]["device"] == f"mon-{tag}-0"]
    finally:
        for dev_id in ids:
            store.delete_device(dev_id)
        store.delete_cluster(cluster["id"])


def _record_in_subprocess(env_dir: Path, code: str) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(env_dir)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60, cwd=ROOT)


def test_worker_metrics_endpoint_merges_the_workers_files(settings: Settings, tmp_path: Path) -> None:
    from evc.api.app import create_app

    from evc import metrics

    client = create_app(settings.replace(metrics_dir="")).test_client()
    resp = client.get("/metrics/workers")
    assert resp.status_code == 503 and b"EVC_METRICS_DIR" in resp.data

    client = create_app(settings.replace(metrics_dir=str(tmp_path))).test_client()
    assert client.get("/metrics/workers").status_code == 503  # no worker started yet
    workers = metrics.reset_multiprocess_dir(metrics.multiprocess_dir(tmp_path, "workers"))
    _record_in_subprocess(
        workers, "from evc import metrics; metrics.record_job_finished('provision', 'succeeded', 3.0)"
    )
    resp = client.get("/metrics/workers")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    assert b'evc_jobs_total{kind="provision",state="succeeded"} 1.0' in resp.data
    assert b"evc_devices" not in resp.data  # the fleet is the API's /metrics, not the workers'
    # worker containers sharing one volume write to a folder each (compose.podman.yaml), with
    # the same file names (their process ids repeat): every folder is merged
    for name in ("default@host-0a1b2c3d", "default@host-4e5f6a7b"):
        (workers / name).mkdir()
        for f in workers.glob("*.db"):
            (workers / name / f.name).write_bytes(f.read_bytes())
    resp = client.get("/metrics/workers")
    assert b'evc_jobs_total{kind="provision",state="succeeded"} 3.0' in resp.data


def test_process_exit_hooks_forget_a_dead_process(tmp_path: Path) -> None:
    """gunicorn's child_exit and Celery's worker_process_shutdown drop the live gauges of the
    process that exited; the launcher's reset removes what an earlier run left."""
    from evc import metrics

    dead = 4_000_001  # pids the hooks are told about; the files are named after them
    for pid in (dead, dead + 1):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
    _record_in_subprocess(
        tmp_path,
        "from types import SimpleNamespace\n"
        "from evc.api import gunicorn_conf\n"
        "from evc.workers import signals\n"
        f"gunicorn_conf.child_exit(None, SimpleNamespace(pid={dead}))\n"
        f"signals.mark_child_dead(pid={dead + 1}, exitcode=0)\n",
    )
    assert not (tmp_path / f"gauge_livesum_{dead}.db").exists()
    assert not (tmp_path / f"gauge_livesum_{dead + 1}.db").exists()
    (tmp_path / "counter_1.db").write_bytes(b"")
    (tmp_path / "keep.txt").write_text("not prometheus_client's")
    metrics.reset_multiprocess_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]  # and the subprocess's own files


# ------------------------------------------------------------------------------ container mode
FAKE_DOCKER = """
import json, os, signal, subprocess, sys
# A stand-in docker CLI: a container is a local process, the state a JSON file.
path = os.environ["FAKE_DOCKER_STATE"]
state = json.load(open(path)) if os.path.exists(path) else {"containers": {}, "runs": []}
args = sys.argv[1:]

def save():
    json.dump(state, open(path, "w"))

def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False

if args[0] in ("info", "image", "logs"):
    sys.exit(0)
if args[0] == "inspect":
    c = state["containers"].get(args[-1])
    if not c:
        sys.exit(1)
    print(c["label"] + (" true" if alive(c["pid"]) else " false"))
elif args[0] == "rm":
    gone = [n for n in args[2:] if state["containers"].get(n)]
    for n in gone:
        os.kill(state["containers"].pop(n)["pid"], signal.SIGTERM)
    save()
    print("\\n".join(gone))
    sys.exit(0 if gone else 1)
elif args[0] == "run":
    i, name, label = 1, "", ""
    while args[i].startswith("-"):
        opt, _, val = args[i].partition("=")
        if not val and opt in ("--name", "--label", "--restart", "--network"):
            val, i = args[i + 1], i + 1
        name = val if opt == "--name" else name
        label = val.partition("=")[2] if opt == "--label" else label
        i += 1
    argv = [sys.executable if a == "python" else a.replace("/host/", "/") for a in args[i + 1:]]
    proc = subprocess.Popen(argv, cwd=os.environ["FAKE_DOCKER_CWD"], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state["containers"][name] = {"pid": proc.pid, "label": label}
    state["runs"].append(args)
    save()
else:
    sys.exit("unexpected: " + " ".join(args))
"""


def play_recap(stdout: str) -> dict[str, int]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("dev0 ") and "ok=" in ln)
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split(":", 1)[1].split())}


@pytest.mark.integration
@pytest.mark.slow
def test_container_mode_runs_replaces_and_removes_the_exporter_container(tmp_path: Path) -> None:
    """mode container against a docker-compatible stand-in (this machine has no container
    daemon to rely on): the container runs with the host's /proc and /sys and answers; a second
    run changes nothing; a new port replaces it; state absent removes it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(f"#!{sys.executable}\n{FAKE_DOCKER}")
    docker.chmod(0o755)
    state = tmp_path / "docker.json"
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(
        "dev0 ansible_connection=local ansible_python_interpreter=" + sys.executable
        + " evc_privilege=user evc_become=False evc_can_admin=False\n"
    )  # fmt: skip
    env = {
        **os.environ, "HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_DOCKER_STATE": str(state), "FAKE_DOCKER_CWD": str(ROOT),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1",
    }  # fmt: skip

    def play(**extra: Any) -> dict[str, int]:
        variables = {"mode": "container", "listen": "127.0.0.1", "mounts": ["/", "/tmp"], **extra}
        out = subprocess.run(
            [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
             str(ROOT / "playbooks" / "exporter.yml"), "-e", json.dumps(variables)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        return play_recap(out.stdout)

    def containers() -> dict[str, Any]:
        return dict(json.loads(state.read_text())["containers"])

    port = free_port()
    try:
        assert play(exporter_port=port)["changed"] == 1
        (run,) = json.loads(state.read_text())["runs"]
        assert run[run.index("--name") + 1] == "evc-edge-exporter" and "--network" in run
        assert {"--pid=host", "--volume=/proc:/host/proc:ro", "--volume=/tmp:/tmp:ro"} <= set(run)
        assert run[run.index("localhost/evc-edge-exporter:0.1.0") + 1 :][:3] == ["python", "-m", "evc.device.exporter"]
        assert "--port" in run and str(port) in run and "--mount=/tmp" in run
        first = containers()["evc-edge-exporter"]["pid"]

        assert play(exporter_port=port)["changed"] == 0
        assert containers()["evc-edge-exporter"]["pid"] == first

        port = free_port()
        assert play(exporter_port=port)["changed"] == 1
        assert containers()["evc-edge-exporter"]["pid"] != first

        assert play(state="absent")["changed"] >= 1
        assert containers() == {}
    finally:
        if state.exists():
            for c in containers().values():
                try:
                    os.kill(c["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass


# ------------------------------------------------------------------------------ end to end
@pytest.fixture()
def exporters() -> Iterator[list[SimDevice]]:
    """Devices whose exporters the test starts; every one is stopped after it, even on failure.

    Requested after ``sim_devices``, so it is torn down first, while the devices' homes exist."""
    devices: list[SimDevice] = []
    yield devices
    for sim in devices:
        stop_exporter(sim)


class HTTPAPI:
    """The API app served over real HTTP on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = int(self.server.server_port)
        self.thread = threading.Thread(target=self.server.serve_forever, name="evc-api-http", daemon=True)
        self.thread.start()

    def get(self, path: str, token: str) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return json.loads(r.read())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def edge_job(api_port: int, token_file: Path) -> dict[str, Any]:
    """The deployed evc-edge scrape job, pointed at the test API with the test's token file."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "evc-edge")
    (sd,) = job["http_sd_configs"]
    assert sd["url"].endswith(TARGETS) and sd["authorization"]["type"] == "Bearer"
    sd.update(url=f"http://127.0.0.1:{api_port}{TARGETS}", refresh_interval="1s")
    sd["authorization"]["credentials_file"] = str(token_file)
    return dict(job)


def provision_exporter(api: Any, settings: Settings, device_id: str, **extra_vars: Any) -> str:
    """Submit an exporter job through the provisioning service; the real worker runs it."""
    from evc.workers.celery_app import make_celery

    request = ProvisionRequest.from_dict({"playbook": "exporter", "targets": [device_id], "extra_vars": extra_vars})
    ctx = Context(api.store, settings, make_celery(settings, include_tasks=False), Caller("test"))
    job, _ = submit_provision(ctx, request)
    return str(job["id"])


def up_by_device(srv: PrometheusServer) -> dict[str, dict[str, Any]]:
    return {r["metric"].get("device", ""): r for r in srv.query('up{job="evc-edge"}')}


@pytest.mark.integration
@pytest.mark.slow
def test_prometheus_discovers_scrapes_and_alerts_on_provisioned_devices(
    api: Any,
    worker: Any,
    settings: Settings,
    store: Store,
    sim_devices: Callable[..., list[SimDevice]],
    exporters: list[SimDevice],
    start_prometheus: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    started = time.monotonic()

    def phase(what: str) -> None:  # shown with the captured log when the test fails or is slow
        log.warning("%6.1fs %s", time.monotonic() - started, what)

    privileges = ["root", "sudo", "user"] if os.geteuid() == 0 else ["sudo", "user", "sudo"]
    sims = sim_devices(3, privilege=privileges)
    tag = secrets.token_hex(3)
    names = [f"mon-{tag}-{i}" for i in range(3)]
    ids: list[str] = []
    submitted: list[str] = []  # waited for on the way out, so no job starts an exporter after the test
    http: HTTPAPI | None = None
    try:
        # registered through the API and the worker
        reg_jobs = []
        for name, sim in zip(names, sims, strict=True):
            body = {"name": name, "host": sim.host, "port": sim.port, "username": sim.username}
            status, out = api.call("POST", "/api/v1/devices", json=body)
            assert status == 202, out
            ids.append(out["device"]["id"])
            reg_jobs.append(out["job"]["id"])
        for job_id in reg_jobs:
            assert api.wait_job(job_id, timeout=120)["state"] == "succeeded"

        phase("registered")
        # the exporter playbook through the provisioning service and the worker, one port each
        # (the simulated devices share this machine); prometheus_client from an operator's wheel
        wheel = build_prometheus_client_wheel(settings.data_dir / "artifacts")
        ports = [free_port() for _ in sims]
        exporters.extend(sims)
        common = {"listen": "127.0.0.1", "prometheus_client_wheel": wheel.name, "mounts": ["/", "/tmp"]}
        jobs = [
            provision_exporter(api, settings, d, exporter_port=p, **common) for d, p in zip(ids, ports, strict=True)
        ]
        submitted.extend(jobs)
        for job_id, dev_id, port in zip(jobs, ids, ports, strict=True):
            job = api.wait_job(job_id, timeout=300)
            assert job["state"] == "succeeded", job
            assert job["results"][dev_id]["status"] == "ok" and job["results"][dev_id]["changed"] > 0
            record = store.get_device(dev_id)["exporter"]
            assert record == {"port": port, "listen": "127.0.0.1", "mode": "auto", "node_exporter": None}
        phase("exporters provisioned")
        # run again on one device while Prometheus works: nothing changes, nothing restarts
        supervisor0 = read_pid(exporter_dir(sims[0]) / "exporter.supervisor.pid")
        rerun = provision_exporter(api, settings, ids[0], exporter_port=ports[0], **common)
        submitted.append(rerun)

        # the API over HTTP, a read-only token for Prometheus, the deployed scrape job and rules
        http = HTTPAPI(api.app)
        _, reader = create_operator_token(Context(store, settings), f"prometheus-{tag}", ["read"])
        token_file = tmp_path / "evc-token"
        token_file.write_text(reader + "\n")
        groups = http.get(TARGETS, reader)
        mine = {g["labels"]["device"]: g for g in groups if g["labels"]["device_id"] in ids}
        assert {n: g["targets"] for n, g in mine.items()} == {
            n: [f"127.0.0.1:{p}"] for n, p in zip(names, ports, strict=True)
        }
        rules = rewrite_rule_durations(RULES, tmp_path / "rules" / "evc.yml", for_="1s")
        srv = start_prometheus([edge_job(http.port, token_file)], [rules])

        phase("prometheus started")
        # discovered through HTTP SD and scraped: up, real metrics, EVC's labels on every series
        wait_until(lambda: set(names) <= set(up_by_device(srv)), 60, "Prometheus to discover the devices")
        srv.wait_for_scrapes("evc-edge", samples=2, timeout=60)
        up = up_by_device(srv)
        for name, dev_id in zip(names, ids, strict=True):
            labels = up[name]["metric"]
            assert up[name]["value"][1] == "1"
            assert labels["instance"] == name and labels["device_id"] == dev_id
            assert labels["state"] == "online" and "cluster" not in labels and "profile" not in labels  # empty: dropped
            assert labels["arch"] == store.get_device(dev_id)["facts"]["arch"]
        load = {r["metric"]["device"]: float(r["value"][1]) for r in srv.query("evc_edge_load1")}
        assert set(names) <= set(load) and all(load[n] >= 0 for n in names)
        disks = srv.query(f'evc_edge_filesystem_size_bytes{{device="{names[0]}"}}')
        assert {r["metric"]["mountpoint"] for r in disks} == {"/", "/tmp"}

        phase("scraped")
        # a dead exporter is restarted by its supervisor
        pid_file = exporter_dir(sims[2]) / "exporter.pid"
        old = read_pid(pid_file)
        assert alive(old)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_until(
            lambda: (p := read_pid(pid_file)) not in (None, old) and alive(p), 30, "the exporter to be restarted"
        )

        phase("exporter restarted")
        # a device whose exporter stops fires EVCDeviceDown, the others do not
        out = subprocess.run(
            ["sh", str(exporter_dir(sims[1]) / "supervise.sh"), "stop", "exporter"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert out.stdout.strip() == "stopped"
        assert not alive(read_pid(exporter_dir(sims[1]) / "exporter.pid"))
        firing = wait_until(lambda: srv.firing("EVCDeviceDown", device=names[1]), 45, "EVCDeviceDown to fire")
        assert firing[0]["labels"]["severity"] == "critical" and firing[0]["labels"]["device_id"] == ids[1]
        assert not srv.firing("EVCDeviceDown", device=names[0])
        assert up_by_device(srv)[names[2]]["value"][1] == "1"  # restarted device scraped again

        phase("EVCDeviceDown fired")
        # a device removed from EVC leaves the target list, and Prometheus drops it
        assert api.call("DELETE", f"/api/v1/devices/{ids[2]}")[0] == 200
        assert names[2] not in {g["labels"]["device"] for g in http.get(TARGETS, reader)}
        wait_until(
            lambda: all(t["labels"].get("device") != names[2] for t in srv.targets()),
            30,
            "Prometheus to drop the removed device",
        )

        phase("removed device dropped")
        # the second run changed nothing on its device and left the running exporter alone
        job = api.wait_job(rerun, timeout=300)
        assert job["state"] == "succeeded", job
        assert job["results"][ids[0]]["changed"] == 0, job["results"][ids[0]]
        assert read_pid(exporter_dir(sims[0]) / "exporter.supervisor.pid") == supervisor0
        assert alive(supervisor0)
        phase("second run unchanged")
    finally:
        for job_id in submitted:
            try:
                api.wait_job(job_id, timeout=300)
            except AssertionError:
                log.error("provision job %s did not finish", job_id)
        if http is not None:
            http.close()
        for dev_id in ids:
            try:
                store.delete_device(dev_id)
            except Exception:  # noqa: BLE001 - removed by the test already
                pass
