"""Container deployments, for real, beyond tests/test_deploy_container.py: an image shipped layer
by layer (a second version built on the first sends only its new layer) and a device that
reboots between two health sweeps (its container stopped) serving again after the next sweep.

The fixtures are tests/test_deploy_container.py's (real rootless podman on simulated ``user``
devices, the edge image built by scripts/build-edge-images, Debian's docker-registry). The
second device's registry is blocked: it gets the first version shipped; the first device pulls
it; both get the second version shipped, layer by layer.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from evc import pool as pooling
from evc import ssh
from evc.deployments import container
from evc.embedded import free_port
from evc.model import Device
from evc_sim import SimDevice
from tests.fixtures.helpers import wait_until
from tests.fixtures.onnx_models import digits_model
from tests.test_deploy_container import (  # noqa: F401 - fixtures
    _as_device,
    _push,
    capi,
    image_ref,
    pair,
    records,
    registry,
)
from tests.test_deploy_converge import _jobs_of, _seen, _targets
from tests.test_deploy_converge_reboot import sweep_and_revive
from tests.test_deployments import _port_closed, _port_open

pytestmark = pytest.mark.integration


def _second_version(base: str, tag: str) -> str:
    """An image built FROM *base* with one more small layer (a changed top layer)."""
    with tempfile.TemporaryDirectory() as ctx:
        Path(ctx, "Containerfile").write_text(f"FROM {base}\nCOPY release /etc/evc-release\n")
        Path(ctx, "release").write_text(f"{tag} {time.time_ns()}\n")
        res = subprocess.run(["podman", "build", "-q", "-t", tag, ctx], capture_output=True, text=True, timeout=300,
                             check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return tag


def _first(api: Any, device: Device, ref: str | None, how: str) -> dict[str, Any]:
    """The first version onto the device (*how*: pulled from the registry, or shipped): what was shipped."""
    image = container.resolve(api.settings, ref)

    async def op(conn: Any, target: ssh.Target) -> str:
        return await container.ensure_image(conn, target, api.settings, "podman", image, "python3", device["name"])

    assert pooling.call(pooling.pool_for(api.settings).use(device, op)) in (how, "present")
    return image.shipped.get(device["id"]) or {}


def test_a_new_version_ships_its_new_layer_only_and_a_rebooted_device_serves_again(
    capi: Any,  # noqa: F811
    image_ref: str,  # noqa: F811
    pair: list[SimDevice],  # noqa: F811
    records: list[Device],  # noqa: F811
) -> None:
    api, (pulled, dev), sim = capi, records, pair[1]
    first = _first(api, dev, None, "ship")
    print(f"\nfirst version shipped: {first}")
    if first:  # not there before: the whole image crossed
        assert first["layers_reused"] == 0 and first["sent_bytes"] >= first["image_bytes"] * 0.99, first
    _first(api, pulled, image_ref, "pull")  # the other device has the first version from the registry
    v2 = _second_version(container.default_image(api.settings), f"localhost/evc-layertest:{time.time_ns() % 10**9}")
    name = f"digits-lay-{time.time_ns() % 10**9}"
    _push(api, name, "1", digits_model()[0])
    ports = {pulled["id"]: free_port(), dev["id"]: free_port()}
    port = ports[dev["id"]]
    body = {"model": name, "version": "1", "devices": list(ports), "runtime": "container", "image": v2,
            "python": "python3", "ports": ports}  # fmt: skip
    status, job = api.call("POST", "/api/v1/deployments", json=body)
    assert status == 202, job
    dep_id = str(job["params"]["deployment"])
    try:
        job = api.wait_job(job["id"], timeout=240)
        assert job["state"] == "succeeded", job
        targets = _targets(api, dep_id)
        t, other = targets[dev["id"]], targets[pulled["id"]]["image_shipped"]
        got = t["image_shipped"]
        print(f"second version (one new layer) shipped: {got}; to the device that pulled the first: {other}")
        # layers pulled from the registry: reused by podman, or (another compression) all sent again
        assert other["layers_sent"] == 1 or other["full_retry"] is True, other
        assert t["delivery"] == "ship" and got["layers_sent"] == 1 and got["full_retry"] is False, t
        assert got["layers_reused"] >= 1 and got["sent_bytes"] < got["image_bytes"] * 0.01, got
        assert t["on_boot"].startswith("none: no systemd user manager"), t  # the simulator has no systemd
        policy = "podman inspect --format 'restart={{.HostConfig.RestartPolicy.Name}}' "
        assert "restart=always" in _as_device(sim, policy + container.container_name(dep_id)).stdout
        assert _port_open(port)

        # the device "reboots" between two sweeps: its container is stopped, nothing starts it
        stop = _as_device(sim, f"podman stop -t 1 {container.container_name(dep_id)}")
        assert stop.returncode == 0, stop.stderr
        wait_until(lambda: _port_closed(port), timeout=10, what="the container stopped")
        since = _seen(api.store)
        pool = pooling.SSHPool(api.settings.replace(ssh_backoff_s=0.0, ssh_backoff_max_s=0.0))
        try:
            res = sweep_and_revive(api.store, api, pool, [dev["id"]])
        finally:
            pooling.call(pool.close_all())
        assert res.changes == []
        (conv,) = _jobs_of(api.store, dep_id, "deploy", since)
        done = api.wait_job(conv, timeout=240)
        assert done["state"] == "succeeded" and done["params"]["reason"] == "server down", done
        t = _targets(api, dep_id)[dev["id"]]
        assert t["state"] == "running" and t["delivery"] == "present" and _port_open(port), t
    finally:
        status, job = api.call("DELETE", f"/api/v1/deployments/{dep_id}")
        if status == 202:
            api.wait_job(job["id"], timeout=120)
        subprocess.run(["podman", "rmi", "-f", v2], capture_output=True, timeout=120, check=False)


def test_a_layer_held_in_another_compression_is_sent_again(
    capi: Any,  # noqa: F811
    pair: list[SimDevice],  # noqa: F811
    records: list[Device],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A device holding the base layer from an uncompressed archive: podman cannot match it to
    the shipped (gzip) blob, so the partial load is refused and the whole layout is sent."""
    api, sim, n = capi, pair[0], time.time_ns() % 10**9
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "base").write_bytes(os.urandom(1 << 20))
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tmp_path / "base.tar"), "."], check=True, timeout=60)
    base, app = f"localhost/evc-layerbase:{n}", f"localhost/evc-layerapp:{n}"
    subprocess.run(["podman", "import", str(tmp_path / "base.tar"), base], capture_output=True, check=True, timeout=120)
    try:
        _second_version(base, app)
        archive = sim.home / f"base-{n}.tar"  # the base, uncompressed (docker-archive), loaded on the device
        subprocess.run(["podman", "save", "--format", "docker-archive", "-o", str(archive), base], check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        archive.chmod(0o644)
        loaded = _as_device(sim, f"podman load -q -i {archive} && rm -f {archive}")
        assert loaded.returncode == 0, loaded.stderr
        got = _first(api, records[0], app, "ship")
        print(f"\nbase held uncompressed; shipped: {got}")
        assert got["full_retry"] is True and got["layers_sent"] == 2, got
        assert got["sent_bytes"] >= got["image_bytes"] * 0.99, got
    finally:
        subprocess.run(["podman", "rmi", "-f", app, base], capture_output=True, timeout=120, check=False)
        _as_device(sim, f"podman rmi -f {app} {base} >/dev/null 2>&1")
