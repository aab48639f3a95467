"""Deployments with runtime ``container``, for real: the edge server's image built from
deploy/edge/Dockerfile (scripts/build-edge-images: offline, cached by the hash of its inputs),
pushed to a real registry (Debian's ``docker-registry`` on loopback), run by real podman on
simulated devices over SSH, called with tritonclient, rolled to v2 and back, removed.

The devices are simulated ``user`` devices: their commands run as the unprivileged account
``evcsim-user`` with the device's home as HOME, so podman runs rootless, each device with its
own image store and run directories under its home (``~/.config/containers``, as the
container-runtime playbook writes it for an account without root). A simulated ``root`` device
is no use here: its uid 0 lives in a user namespace of 65536 ids whose mounts podman would have
to make as a "rootful" podman inside it, which is not what a device does. The account has no
subordinate ids, so podman maps the one uid (``ignore_chown_errors``), as on a device whose
administrator gave none.

One device may pull from the registry; the other has it blocked (registries.conf), as a device
on another network, so the image is shipped to it over SSH (``podman save`` -> the resumable
ship code -> ``podman load``). Skipped, with the reason, without podman, runc or docker-registry.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from evc import __version__
from evc.deployments import container
from evc.embedded import free_port
from evc.model import Device
from evc.settings import Settings
from evc_sim import SimDevice, SimulatorThread
from tests.fixtures.deploy import device_records
from tests.fixtures.helpers import wait_until
from tests.fixtures.onnx_models import digits_model, fit_softmax, softmax_model
from tests.test_models_oci import RegistryProcess, start_registry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = "evcsim-user"
#: what registration finds on these devices (podman on PATH): a container deployment's L3 need
PODMAN = {"podman": True}


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed: runtime container tests need it (apt-get install {package}; "
                    "scripts/bootstrap test installs it when it may)")  # fmt: skip


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("mmdebstrap", "mmdebstrap")):
        _need(tool, package)
    with start_registry(tmp_path_factory.mktemp("image-registry")) as srv:
        yield srv


@pytest.fixture(scope="module")
def image_ref(registry: RegistryProcess) -> str:
    """The edge image, built once per machine (cached by scripts/build-edge-images: its inputs'
    hash), pushed to the test registry: ``127.0.0.1:<port>/evc-edge-infer:<version>@sha256:...``."""
    env = dict(os.environ)
    if not env.get("CONTAINERS_CONF"):
        env.pop("CONTAINERS_CONF", None)  # the script writes build/podman/containers.conf
    started = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-edge-images"), "--only", "evc-edge-infer", "--push", registry.host,
         "--insecure"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\nscripts/build-edge-images --push: {time.monotonic() - started:.1f} s")
    line = proc.stdout.strip().splitlines()[-1].split()
    assert line[0] == "evc-edge-infer" and "@sha256:" in line[2], proc.stdout
    return line[2]


def _podman_home(home: Path, uid: int, gid: int, blocked: str | None = None) -> None:
    """Rootless podman for a ``user`` device's account, in its home (what the container-runtime
    playbook writes for an account without root, which it cannot run on a ``user`` device:
    it needs sudo), its registry *blocked* when given."""
    conf = home / ".config" / "containers"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "containers.conf").write_text(
        f'[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\ntmp_dir = "{home}/.local/run/libpod"\n'
    )
    (conf / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{home}/.local/share/containers/storage"\n'
        f'runroot = "{home}/.local/run/containers"\n[storage.options.overlay]\nignore_chown_errors = "true"\n'
    )
    _registries(home, uid, gid, blocked=blocked)


def _registries(home: Path, uid: int, gid: int, blocked: str | None = None, insecure: str | None = None) -> None:
    """The account's registries.conf: *blocked* (a device on another network) or *insecure* (a
    plain-HTTP registry, as an operator declares one for podman)."""
    conf = home / ".config" / "containers"
    conf.mkdir(parents=True, exist_ok=True)
    if blocked:
        (conf / "registries.conf").write_text(f'[[registry]]\nlocation = "{blocked}"\nblocked = true\n')
    if insecure:
        (conf / "registries.conf").write_text(f'[[registry]]\nlocation = "{insecure}"\ninsecure = true\n')
    for path in [home / ".config", *(home / ".config").rglob("*")]:
        os.chown(path, uid, gid)


def _as_device(dev: SimDevice, cmd: str, account: str = ACCOUNT) -> subprocess.CompletedProcess[str]:
    """*cmd* as the device's account with its home (to look at, and clean, its containers)."""
    return subprocess.run(
        ["runuser", "-u", account, "--", "env", f"HOME={dev.home}", "PATH=/usr/bin:/bin", "sh", "-c", cmd],
        capture_output=True, text=True, timeout=120, check=False, cwd="/",
    )  # fmt: skip


def _clean(dev: SimDevice, account: str = ACCOUNT) -> None:
    """Remove the device's containers and image store, then stop its rootless podman's pause
    process (the one whose HOME is this device's: each device has its own)."""
    _as_device(dev, "podman rm -af -t 1 >/dev/null 2>&1", account)
    _as_device(dev, "podman unshare rm -rf ~/.local/share/containers >/dev/null 2>&1", account)
    _stop_pause(dev, account)


#: the command lines of rootless podman's pause process: its own, or catatonit's where installed
PAUSE = (b"podman\0", b"catatonit\0-P\0")


def _stop_pause(dev: SimDevice, account: str = ACCOUNT) -> None:
    uid, home = pwd.getpwnam(account).pw_uid, f"HOME={dev.home}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or proc.stat().st_uid != uid:
                continue
            if (proc / "cmdline").read_bytes() in PAUSE and home in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture(scope="module")
def pair(simulator: SimulatorThread, registry: RegistryProcess) -> Iterator[list[SimDevice]]:
    """Two user devices with rootless podman; the second cannot reach the registry."""
    devices = simulator.start(2, f"ct{os.getpid() % 10000}", privileges="user")
    pw = pwd.getpwnam(ACCOUNT)
    _podman_home(devices[0].home, pw.pw_uid, pw.pw_gid)
    _podman_home(devices[1].home, pw.pw_uid, pw.pw_gid, blocked=registry.host)
    try:
        probe = _as_device(devices[0], "podman info --format '{{.Host.Security.Rootless}}'")
        if probe.returncode != 0:
            pytest.skip(f"rootless podman does not work for {ACCOUNT} on this machine: {probe.stderr.strip()[-300:]}")
        yield devices
    finally:
        for d in devices:
            _clean(d)
            simulator.remove(d.name)


@pytest.fixture(scope="module")
def capi(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An API and a worker of their own (Redis database 13), the registry reached over plain
    HTTP (``edge_image_tls_verify`` false: the test registry has no TLS), simulated devices'
    system paths staged under ``device_sysroot``."""
    from evc.api.app import create_app

    from tests.fixtures.services import API, Worker, own_database

    sysroot = Path(tempfile.mkdtemp(prefix="evc-sysroot-"))  # simulated devices' system paths, reachable
    sysroot.chmod(0o1777)  # by every account (sticky: each device's account makes its own folder)
    s, st = own_database(settings, 13, "ctr", edge_image_tls_verify=False, device_sysroot=str(sysroot))
    w = Worker(s, tmp_path_factory.mktemp("ctr-worker") / "worker.log", concurrency=2).start()
    try:
        yield API(create_app(s), st, s)
    finally:
        w.stop()
        shutil.rmtree(sysroot, ignore_errors=True)


@pytest.fixture()
def records(capi: Any, pair: list[SimDevice]) -> Iterator[list[Device]]:
    with device_records(capi.store, pair, privilege="user", facts=PODMAN) as out:
        yield out


def _push(api: Any, name: str, version: str, data: bytes) -> None:
    form = {"metadata": json.dumps({"name": name, "version": version}), "file": (io.BytesIO(data), "model.onnx")}
    status, body = api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")
    assert status == 201, body


def _broken_model(w: np.ndarray, b: np.ndarray) -> bytes:
    """The digits model with a Reshape to (-1, 7) before the softmax: it loads, but every
    inference fails (10 classes do not reshape to rows of 7)."""
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([-1, 7], np.int64), "S")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["z0"]), helper.make_node("Add", ["z0", "B"], ["z1"]),
         helper.make_node("Reshape", ["z1", "S"], ["z"]), helper.make_node("Softmax", ["z"], ["probs"], axis=1)],
        "digits",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"), shape],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="evc-test")
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _infer(endpoint: str, name: str, version: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(endpoint)
    assert client.is_server_ready()
    inp = httpclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return cast(np.ndarray, client.infer(name, [inp], model_version=version).as_numpy("probs"))


def _check_serving(api: Any, dep_id: str, name: str, version: str, data: bytes) -> dict[str, Any]:
    import onnxruntime as ort

    status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
    assert status == 200 and dep["state"] == "running", dep
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    for t in dep["targets"]:
        assert t["state"] == "running" and t["version"] == version, t
        np.testing.assert_allclose(_infer(t["endpoint"], name, version, x), want, rtol=1e-5, atol=1e-6)
    return cast(dict[str, Any], dep)


def test_container_deploy_pull_or_ship_rollout_rollback_remove(
    capi: Any, image_ref: str, pair: list[SimDevice], records: list[Device]
) -> None:
    api = capi
    v1, d = digits_model()
    w, b = fit_softmax(d)
    v2 = softmax_model(w * 1.01, b)
    name = f"digits-ctr-{time.time_ns() % 10**9}"
    _push(api, name, "1", v1)
    _push(api, name, "2", v2)
    ports = [free_port(), free_port()]
    body = {
        "model": name, "version": "1", "devices": [r["id"] for r in records], "runtime": "container",
        "image": image_ref, "python": "python3", "ports": {r["id"]: p for r, p in zip(records, ports, strict=True)},
    }  # fmt: skip
    started = time.monotonic()
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    dep_id = str(job["params"]["deployment"])
    job = api.wait_job(job["id"], timeout=240)
    print(f"\ncontainer deploy to 2 devices: {time.monotonic() - started:.1f} s")
    assert job["state"] == "succeeded", job
    dep = _check_serving(api, dep_id, name, "1", v1)
    first, second = dep["targets"]
    assert dep["runtime"] == "container" and dep["image"] == image_ref and dep["image_id"]
    assert first["delivery"] == "pull" and second["delivery"] == "ship", dep["targets"]
    assert {t["runtime"] for t in dep["targets"]} == {"podman"}
    assert {t["container"] for t in dep["targets"]} == {container.container_name(dep_id)}
    for r in job["results"].values():
        print(f"  {r['delivery']}: image in {r['image_s']} s")
    running = _as_device(pair[0], "podman ps --format '{{.Names}} {{.Status}}'").stdout
    assert container.container_name(dep_id) in running

    # roll out v2 on both at once, then back to v1: the containers are replaced, the image stays
    started = time.monotonic()
    job = api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "2", "max_unavailable": 2})[1]
    job = api.wait_job(job["id"], timeout=120)
    print(f"rollout to v2 on 2 devices: {time.monotonic() - started:.1f} s")
    assert job["state"] == "succeeded", job
    dep = _check_serving(api, dep_id, name, "2", v2)
    assert {t["delivery"] for t in dep["targets"]} == {"present"}
    job = api.call("POST", f"/api/v1/deployments/{dep_id}/rollback", json={})[1]
    assert api.wait_job(job["id"], timeout=120)["state"] == "succeeded"
    _check_serving(api, dep_id, name, "1", v1)

    # a version that fails the smoke inference: the first device goes back to v1 (its container
    # replaced again, gated), the rollout stops, the other device is not touched
    _push(api, name, "3", _broken_model(w, b))
    job = api.call("PATCH", f"/api/v1/deployments/{dep_id}", json={"version": "3", "max_unavailable": 1})[1]
    job = api.wait_job(job["id"], timeout=120)
    assert job["state"] == "failed" and pair[0].name in job["error"]["message"], job
    status, dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
    first, second = dep["targets"]
    assert first["state"] == "rolled-back" and first["version"] == "1", first
    assert "failed its smoke inference on version 3" in first["reason"], first
    assert second["state"] == "running" and second["version"] == "1", second
    x = np.zeros((1, 64), np.float32)
    for t in dep["targets"]:
        assert _infer(t["endpoint"], name, "1", x).shape == (1, 10)

    # removal removes the containers and the folders, and the image layout shipped for it
    archive = api.settings.data_dir / "images" / f"{dep['image_id']}.oci"
    assert (archive / "index.json").is_file()
    job = api.wait_job(api.call("DELETE", f"/api/v1/deployments/{dep_id}")[1]["id"], timeout=60)
    assert job["state"] == "succeeded", job
    assert not archive.exists()
    for dev in pair:
        out = _as_device(dev, "podman ps -a --format '{{.Names}}'")
        assert out.returncode == 0 and container.container_name(dep_id) not in out.stdout, out
        assert not (dev.home / ".evc" / "deploy" / dep_id).exists()
    for p in ports:
        wait_until(functools.partial(_closed, p), 10, f"port {p} to close")


def _closed(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_cli_deploy_runtime_container(capi: Any, image_ref: str, pair: list[SimDevice], records: list[Device]) -> None:
    """`evc deploy --runtime container --image ... --wait`, `evc deployment show/rm` (the image is
    on the device by now: delivery present)."""
    from werkzeug.serving import make_server

    from tests.fixtures.cli import evc

    srv = make_server("127.0.0.1", 0, capi.app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    live = f"http://127.0.0.1:{srv.server_port}"
    try:
        name = f"digits-ctrcli-{time.time_ns() % 10**9}"
        _push(capi, name, "1", digits_model()[0])
        port = free_port()
        args = ["--device", pair[0].name, "--port", str(port), "--python", "python3", "--runtime", "container"]
        code, out, text = evc(live, capi.admin, "deploy", f"{name}:1", *args, "--image", image_ref, "--wait")
        assert code == 0, text
        assert "runtime container" in text and f"127.0.0.1:{port}" in text and "present" in text, text
        dep_id = text.split("deployment ", 1)[1].split(":", 1)[0]
        code, out, text = evc(live, capi.admin, "--json", "deployment", "show", dep_id)
        assert code == 0 and json.loads(out)["targets"][0]["container"] == container.container_name(dep_id)
        code, out, text = evc(live, capi.admin, "deploy", f"{name}:1", "--device", pair[0].name, "--image", "x")
        assert code != 0 and "--image goes with --runtime container" in text
        code, out, text = evc(live, capi.admin, "deployment", "rm", dep_id, "--wait")
        assert code == 0 and "succeeded" in text, text
        assert container.container_name(dep_id) not in _as_device(pair[0], "podman ps -a --format '{{.Names}}'").stdout
    finally:
        srv.shutdown()


def test_a_device_without_a_usable_runtime_fails_with_the_reason(
    capi: Any, image_ref: str, simulator: SimulatorThread
) -> None:
    (dev,) = simulator.start(1, f"cn{os.getpid() % 10000}", privileges="user")
    try:
        conf = dev.home / ".config" / "containers"
        conf.mkdir(parents=True)
        (conf / "storage.conf").write_text('[storage]\ndriver = "no-such-driver"\n')
        os.chown(conf.parent, *pwd.getpwnam(ACCOUNT)[2:4])
        os.chown(conf, *pwd.getpwnam(ACCOUNT)[2:4])
        with device_records(capi.store, [dev], privilege="user", facts=PODMAN) as (rec,):
            _push(capi, name := f"digits-noctr-{time.time_ns() % 10**9}", "1", digits_model()[0])
            body = {"model": name, "version": "1", "devices": [rec["id"]], "runtime": "container", "image": image_ref}
            job = capi.wait_job(capi.call("POST", "/api/v1/deployments", json=body)[1]["id"], timeout=60)
            assert job["state"] == "failed", job
            msg = job["results"][rec["id"]]["error"]["message"]
            assert f"no container runtime (podman or docker) usable by the account on {dev.name}" in msg, msg
            assert "podman is installed but does not answer" in msg and "container-runtime playbook" in msg, msg
    finally:
        _stop_pause(dev)
        simulator.remove(dev.name)


def test_a_container_cluster_raised_to_l3_and_deployed_to(
    capi: Any, image_ref: str, registry: RegistryProcess, simulator: SimulatorThread, request: pytest.FixtureRequest
) -> None:
    """The container profile for real, through the API: a simulated ``sudo`` device (stand-in
    or real passwordless sudo; system paths staged under ``device_sysroot``) registered, in a
    cluster of profile ``container`` raised to L3 by the level job (real ansible-playbook):
    container-runtime (podman) writes the account's own containers.conf and, as the account
    has no subordinate ids and the machine's user database is not a simulated device's to
    change, ignore_chown_errors in its storage.conf, and checks that podman answers;
    the exporter (mode container) runs the evc-edge-exporter image pulled from the registry and
    answers. A deployment with runtime container to the CLUSTER (ensure_level) serves
    tritonclient; removal and the cleanup playbook leave nothing of EVC's."""
    from tests.fixtures.fleet import create_cluster, register_devices
    from tests.test_provision_integration import provision_now

    build = subprocess.run(
        [str(ROOT / "scripts" / "build-edge-images"), "--only", "evc-edge-exporter", "--push", registry.host,
         "--insecure"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    exporter_image = build.stdout.strip().splitlines()[-1].split()[2]
    (sim,) = simulator.start(1, f"cc{os.getpid() % 10000}", privileges="sudo")
    request.addfinalizer(lambda: simulator.remove(sim.name))
    request.addfinalizer(lambda: _clean(sim, sim.username))
    pw = pwd.getpwnam(sim.username)
    _registries(sim.home, pw.pw_uid, pw.pw_gid, insecure=registry.host)  # the operator's registry, plain HTTP
    (dev_id,) = register_devices(capi, [sim])
    ex_port, port = free_port(), free_port()
    exporter = {"image": exporter_image, "exporter_port": ex_port, "listen": "127.0.0.1"}
    devenv = {"build_tools": False, "workspace": "ws", "venv": "envs/cl", "packages": []}
    cl = create_cluster(capi, f"ctr{time.time_ns()}", "container", vars={"devenv": devenv, "exporter": exporter})
    assert capi.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": dev_id})[0] in (200, 202)
    started = time.monotonic()
    status, job = capi.call("POST", f"/api/v1/clusters/{cl['id']}/level", json={"target": 3})
    assert status == 202, job
    job = capi.wait_job(job["id"], timeout=300)
    print(f"\ncontainer cluster to L3 (1 sudo device): {time.monotonic() - started:.1f} s")
    assert job["state"] == "succeeded", job
    assert job["results"][dev_id]["level"] == 3, job["results"]
    conf = sim.home / ".config" / "containers"
    text = (conf / "containers.conf").read_text()
    assert 'runtime = "runc"' in text and "default_ulimits = []" in text, text
    storage = (conf / "storage.conf").read_text()
    assert 'ignore_chown_errors = "true"' in storage and "a simulated device" in storage, storage
    assert (conf / "containers.conf").stat().st_uid == pwd.getpwnam(sim.username).pw_uid
    sysroot = Path(capi.settings.device_sysroot)
    assert "default_ulimits = []" in (sysroot / dev_id / "etc/containers/containers.conf.d/50-evc.conf").read_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{ex_port}/metrics", timeout=10) as resp:
        assert b"evc_" in resp.read()
    assert "evc-edge-exporter" in _as_device(sim, "podman ps --format '{{.Names}}'", sim.username).stdout
    # L1 and L3 both run container-runtime: the second changes nothing; the playbook says what it did
    runs = _playbook_changes(capi.store, job["id"], dev_id)
    assert [p for p, _ in runs] == ["devenv", "container-runtime", "exporter", "container-runtime"], runs
    assert runs[1][1] > 0 and runs[3][1] == 0, runs
    said = [str(e.get("message", "")) for e in capi.store.events(job["id"], 0, 100_000)]
    assert any("podman for evcsim-sudo: no subordinate ids (a simulated device" in m for m in said), said[-40:]
    internal = {"evc_sysroot": str(sysroot)}

    # a deployment with runtime container to the cluster (not device ids), ensure_level
    name = f"digits-ctrcl-{time.time_ns() % 10**9}"
    v1, _ = digits_model()
    _push(capi, name, "1", v1)
    body = {"model": name, "version": "1", "cluster": cl["id"], "runtime": "container", "image": image_ref,
            "ensure_level": True, "ports": {dev_id: port}}  # fmt: skip
    started = time.monotonic()
    status, job = capi.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    dep_id = str(job["params"]["deployment"])
    assert capi.wait_job(job["id"], timeout=240)["state"] == "succeeded"
    print(f"container deploy to the cluster: {time.monotonic() - started:.1f} s")
    dep = _check_serving(capi, dep_id, name, "1", v1)
    assert dep["cluster"] == cl["id"] and [t["device"] for t in dep["targets"]] == [dev_id], dep
    (t,) = dep["targets"]
    assert t["runtime"] == "podman" and t["delivery"] == "pull" and t["endpoint"].endswith(f":{port}"), t
    job = capi.wait_job(capi.call("DELETE", f"/api/v1/deployments/{dep_id}")[1]["id"], timeout=60)
    assert job["state"] == "succeeded", job
    assert (
        container.container_name(dep_id)
        not in _as_device(sim, "podman ps -a --format '{{.Names}}'", sim.username).stdout
    )
    wait_until(functools.partial(_closed, port), 10, f"port {port} to close")

    # no registry: the controller's localhost/ image, copied only where absent, loaded, the archive
    # removed from the device (evc.monitoring.exporter_image_archive)
    local = {"mode": "container", "runtime": "podman", "image": f"localhost/evc-edge-exporter:{__version__}",
             "exporter_port": free_port(), "listen": "127.0.0.1"}  # fmt: skip
    for attempt in (1, 2):
        job, results = provision_now(capi.store, capi.settings, "exporter", [dev_id], extra_vars=local)
        assert job["state"] == "succeeded", {d: r.get("message") for d, r in results.items()}
        changed = results[dev_id]["changed_tasks"]
        assert ("Load the image, then remove the archive" in changed) == (attempt == 1), changed
    assert list((Path(capi.settings.data_dir) / "images" / "exporter").glob("*.tar")), "no archive on the controller"
    assert not list((sim.home / ".evc" / "exporter").glob("*.tar")), "the archive was left on the device"
    with urllib.request.urlopen(f"http://127.0.0.1:{local['exporter_port']}/metrics", timeout=10) as resp:
        assert b"evc_" in resp.read()

    # the exporter's container goes with state absent; cleanup removes EVC's podman settings
    ex = {"mode": "container", "runtime": "podman", **exporter, "state": "absent"}
    job, results = provision_now(capi.store, capi.settings, "exporter", [dev_id], extra_vars=ex)
    assert job["state"] == "succeeded", results
    assert "evc-edge-exporter" not in _as_device(sim, "podman ps -a --format '{{.Names}}'", sim.username).stdout
    cleanup = {"components": ["container-runtime"], "remove_workspace": False}
    job, results = provision_now(capi.store, capi.settings, "cleanup", [dev_id], extra_vars=cleanup,
                                 internal_vars=internal)  # fmt: skip
    assert job["state"] == "succeeded", {d: r.get("message") for d, r in results.items()}
    assert not (sysroot / dev_id / "etc/containers/containers.conf.d/50-evc.conf").exists()
    assert not (conf / "containers.conf").exists() and not (conf / "storage.conf").exists()
    assert (conf / "registries.conf").exists()  # not EVC's


def _playbook_changes(store: Any, job_id: str, device_id: str) -> list[tuple[str, int]]:
    """(playbook, tasks that changed the device) of each step of a level job, in order (printed
    with each step's seconds, from its level event to its stats)."""
    out: list[tuple[str, int]] = []
    playbook, began = "", 0.0
    for e in store.events(job_id, 0, 100_000):
        if e.get("type") == "level" and e.get("playbook"):
            playbook, began = str(e["playbook"]), float(e.get("ts") or 0)
        elif e.get("event") == "playbook_on_stats":
            out.append((playbook, int(e["hosts"][device_id]["changed"])))
            print(f"  {playbook}: {float(e.get('ts') or 0) - began:.1f} s, {out[-1][1]} changed")
    return out


def test_image_archives_no_deployment_uses_are_pruned(store: Any, settings: Settings, tmp_path: Path) -> None:
    """<data_dir>/images keeps the archives and OCI layouts a deployment's image_id names, any
    save in progress, and the exporter's folder (the level job's archive of its image)."""
    from evc.store._base import new_id

    s = settings.replace(data_dir=tmp_path)
    (tmp_path / "images").mkdir()
    used, unused = f"{time.time_ns():x}a", f"{time.time_ns():x}b"
    for name in (f"{used}.tar", f"{unused}.tar", f"{unused}.tar-part"):
        (tmp_path / "images" / name).write_bytes(b"x")
    # the layer-by-layer ship's OCI layouts, one in progress, and the level job's exporter archives
    for name in (f"{used}.oci", f"{unused}.oci", f"{unused}.oci-part", "exporter"):
        (tmp_path / "images" / name / "blobs").mkdir(parents=True)
    dep = {"id": new_id("dep"), "model": "m", "version": "1", "devices": [], "image_id": used}
    store.create_deployment(dep)
    try:
        assert container.prune_archives(store, s) == [unused]
        kept = {f"{unused}.tar-part", f"{unused}.oci-part", "exporter"}
        assert {p.name for p in (tmp_path / "images").iterdir()} == {*kept, f"{used}.tar", f"{used}.oci"}
    finally:
        store.delete_deployment(dep["id"])
    assert container.prune_archives(store, s) == [used]
