"""Deployments with runtime ``container``: image build (warm), image delivery per device (pull
from a registry vs shipped over SSH), and a rollout over a few devices.

The real path: a private Redis, Debian's ``docker-registry`` on loopback, the simulator in its
own process (``user`` devices: rootless podman per device, its image store in the device's home),
a Celery worker process, the API in this process. Half the devices have the registry blocked
(registries.conf), so the edge image is shipped to them (``podman save`` -> resumable SFTP ->
``podman load``); the others pull it. Then v1 -> v2 at ``--max-unavailable`` devices a time,
the rollback, and the removal (containers gone). Last, a second image version whose top layer
alone changed (built FROM the edge image) is deployed to the shipping devices: the bytes that
cross (only the layers a device lacks, :mod:`evc.deployments.layers`) vs the whole image.

    .venv/bin/python bench/deploy_container.py [--devices 4] [--max-unavailable 1]

Needs podman, runc, mmdebstrap and docker-registry (scripts/bootstrap test), run as root (the
simulator's user accounts).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pwd
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import API, Figure, emit, median, private_stack, registered, spawn, stop, wait_for_sim  # noqa: E402

from evc import __version__, keys  # noqa: E402
from evc.embedded import free_port  # noqa: E402
from evc.settings import settings_env  # noqa: E402
from evc.store import Store  # noqa: E402
from evc_sim import SimDevice  # noqa: E402
from tests.fixtures.onnx_models import digits_model, fit_softmax, softmax_model  # noqa: E402
from tests.test_deploy_container import ACCOUNT, _clean, _podman_home  # noqa: E402
from tests.test_models_oci import start_registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _push(api: API, name: str, version: str, data: bytes) -> None:
    form = {"metadata": json.dumps({"name": name, "version": version}), "file": (io.BytesIO(data), "model.onnx")}
    api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")


def _build(registry: str) -> tuple[float, str]:
    t0 = time.monotonic()
    out = subprocess.run(
        [str(ROOT / "scripts" / "build-edge-images"), "--only", "evc-edge-infer", "--push", registry, "--insecure"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, check=True,
    ).stdout  # fmt: skip
    return time.monotonic() - t0, out.strip().splitlines()[-1].split()[2]


def _start(args: argparse.Namespace, tmp: Path, env: dict[str, str], key: Path) -> tuple[subprocess.Popen[bytes],
                                                                                      list[SimDevice]]:  # fmt: skip
    state = tmp / "sim" / "devices.json"
    sim = spawn(
        [sys.executable, "-m", "evc_sim", "--devices", str(args.devices), "--root", str(tmp / "sim"),
         "--state-file", str(state), "--authorized-keys", str(key), "--privileges", "user", "--prefix", "bc"],
        env, tmp / "sim.log",
    )  # fmt: skip
    return sim, wait_for_sim(sim, state, tmp / "sim.log")


def _records(store: Store, sims: list[SimDevice]) -> list[str]:
    """The devices as registration leaves them, podman in their facts (a container deployment's L3 need)."""
    ids = registered(store, sims, privilege="user")
    for i in ids:
        store.update_device(i, facts={"podman": True})
    return ids


def _timed(api: API, method: str, path: str, body: Mapping[str, object]) -> tuple[float, dict[str, object]]:
    t0 = time.monotonic()
    job = api.wait(api.call(method, path, json=body)["id"], succeed=True)
    return time.monotonic() - t0, job


def _layered(api: API, ids: list[str]) -> list[Figure]:
    """A second image version whose top layer alone changed (FROM the edge image, one small file)
    deployed to the devices that get images shipped: the bytes that crossed vs the whole image."""
    from tests.test_deploy_container_layers import _second_version

    v2 = _second_version(f"localhost/evc-edge-infer:{__version__}", f"localhost/evc-bench-layer:{os.getpid()}")
    try:
        body = {"model": "digits", "version": "1", "devices": ids, "runtime": "container", "image": v2,
                "python": "python3", "ports": {i: free_port() for i in ids}}  # fmt: skip
        took, job = _timed(api, "POST", "/api/v1/deployments", body)
        got = [cast(dict[str, float], r["image_shipped"]) for r in cast(dict[str, dict[str, object]],
                                                                         job["results"]).values()]  # fmt: skip
        _timed(api, "DELETE", f"/api/v1/deployments/{cast(dict[str, str], job['params'])['deployment']}", {})
    finally:
        subprocess.run(["podman", "rmi", "-f", v2], capture_output=True, timeout=120, check=False)
    whole, sent = median([g["image_bytes"] for g in got]), median([g["sent_bytes"] for g in got])
    print(
        f"new top layer: {len(got)} device(s) got {[g['layers_sent'] for g in got]} layer(s) each; "
        f"reused {[g['layers_reused'] for g in got]}"
    )
    return [
        Figure("v2 (new top layer) shipped: whole image layout (MB)", "-", whole / 1e6, "MB", True),
        Figure("v2 (new top layer) shipped: bytes sent per device (kB, median)", "-", sent / 1e3, "kB", bool(got)),
        Figure(f"v2 (new top layer) deployed to {len(got)} shipping device(s) (s)", "-", took, "s", True),
    ]


def run(args: argparse.Namespace, tmp: Path) -> tuple[bool, list[Figure]]:
    redis, settings = private_stack(tmp)
    settings = settings.replace(edge_image_tls_verify=False)
    procs: list[subprocess.Popen[bytes]] = []
    sims: list[SimDevice] = []
    with start_registry(tmp / "registry") as registry:
        try:
            build_s, image = _build(registry.host)
            store = Store.from_settings(settings)
            keys.ensure_keypair(settings)
            env = {**os.environ, **settings_env(settings)}
            sim, sims = _start(args, tmp, env, settings.key_path.with_suffix(".pub"))
            procs.append(sim)
            procs.append(spawn(
                [sys.executable, "-m", "celery", "-A", "evc.workers.app", "worker", "-Q", "default,ssh,ansible",
                 "-P", "threads", "-c", "4", "-n", "bench-ctr@%h", "-l", "WARNING", "--without-mingle",
                 "--without-gossip"], env, tmp / "worker.log",
            ))  # fmt: skip
            pw = pwd.getpwnam(ACCOUNT)
            for i, d in enumerate(sims):  # odd devices: the registry blocked, the image shipped
                _podman_home(Path(d.home), pw.pw_uid, pw.pw_gid, blocked=registry.host if i % 2 else None)
            ids = _records(store, sims)
            api = API(settings, store)
            v1, digits = digits_model()
            w, b = fit_softmax(digits)
            _push(api, "digits", "1", v1)
            _push(api, "digits", "2", softmax_model(w * 1.01, b))
            body = {"model": "digits", "version": "1", "devices": ids, "runtime": "container", "image": image,
                    "python": "python3", "ports": {i: free_port() for i in ids}}  # fmt: skip
            deploy_s, job = _timed(api, "POST", "/api/v1/deployments", body)
            dep_id = cast(dict[str, str], job["params"])["deployment"]
            results = cast(dict[str, dict[str, object]], job["results"]).values()
            pull = [float(cast(float, r["image_s"])) for r in results if r["delivery"] == "pull"]
            ship = [float(cast(float, r["image_s"])) for r in results if r["delivery"] == "ship"]
            print(f"image {image}: build+push {build_s:.1f} s; v1 on {args.devices} devices in {deploy_s:.1f} s")
            patch = {"version": "2", "max_unavailable": args.max_unavailable}
            rollout_s, _ = _timed(api, "PATCH", f"/api/v1/deployments/{dep_id}", patch)
            rollback_s, _ = _timed(api, "POST", f"/api/v1/deployments/{dep_id}/rollback", {})
            remove_s, _ = _timed(api, "DELETE", f"/api/v1/deployments/{dep_id}", {})
            layered = _layered(api, ids[1::2])
            return True, [
                Figure("edge image build (cached) + push (s)", "-", build_s, "s", True),
                Figure(f"deploy v1 to {args.devices} devices, all at once (s)", "-", deploy_s, "s", True),
                Figure("image delivery by pull, per device (s, median)", "-", median(pull), "s", bool(pull)),
                Figure("image delivery by SSH ship + load, per device (s, median)", "-", median(ship), "s", bool(ship)),
                Figure(f"rollout v1 -> v2, max_unavailable {args.max_unavailable} (s)", "-", rollout_s, "s", True),
                Figure("rollback to v1 (s)", "-", rollback_s, "s", True),
                Figure("removal (containers and folders) (s)", "-", remove_s, "s", True),
                *layered,
            ]
        finally:
            for d in sims:
                _clean(d)
            for p in reversed(procs):
                stop(p)
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--max-unavailable", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="evc-bench-ctr-") as tmp:
        Path(tmp).chmod(0o755)  # the devices' accounts reach their homes below it
        ok, figures = run(args, Path(tmp))
    emit(figures)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
