"""deploy/k8s/base played with `podman kube play` (issue 19, item 4): the kustomization rendered by
kubectl/kustomize, mapped as tests/fixtures/kube.py says (what podman plays, what it cannot),
and smoke-checked: Redis with its password and claim, the init Pod, the API ready with its
workers, a simulated device registered by the ssh worker pod, a no-op job, a worker pod's metrics
sidecar. Pod, volume and secret names are podman-global here (no namespaces): one run at a time.
Skipped, saying why, without podman, runc, catatonit, kubectl/kustomize, or root."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from evc_sim import SimulatorThread
from tests.fixtures.compose import SERVICES_IMAGE, Stack, ensure_images, podman_env, why_not
from tests.fixtures.helpers import free_port, wait_until
from tests.fixtures.kube import for_podman, kustomize, render, secret_yaml

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(why_not() is not None, reason=str(why_not())),
    pytest.mark.skipif(kustomize() is None, reason="no kubectl or kustomize to render deploy/k8s/base"),
    pytest.mark.skipif(
        shutil.which("catatonit") is None and not Path("/usr/libexec/podman/catatonit").exists(),
        reason="no catatonit (podman's pause binary for pods; scripts/bootstrap test installs it)",
    ),
]


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("kube")
    env = podman_env(tmp)
    images = {"evc": ensure_images(env), "redis": SERVICES_IMAGE}
    ports = {name: free_port() for name in ("api", "flower", "redis", "metrics")}
    password = hashlib.sha256(os.urandom(16)).hexdigest()
    stages, left_out = for_podman(render(), images, ports, password)
    assert {k.split("/")[0] for k in left_out} == {"Namespace", "Service", "NetworkPolicy", "PodDisruptionBudget"}
    files = []
    for i, text in enumerate(stages):
        files.append(tmp / f"stage{i}.yaml")
        files[-1].write_text(text)
    (tmp / "secret.json").write_text(secret_yaml(password, ports["redis"]))
    stack = Stack("kube", {**env, "REDIS_PASSWORD": password}, ports)
    volumes_before = set(stack.podman("volume", "ls", "--format", "{{.Name}}").split())
    try:
        stack.podman("secret", "create", "evc-secrets", str(tmp / "secret.json"))
        play = ["kube", "play", "--network", "host"]
        stack.podman(*play, str(files[0]), timeout=300)
        wait_until(lambda: _redis_ping(stack), 60, "Redis' pod")
        stack.podman(*play, str(files[1]), timeout=300)
        rc = stack.podman("wait", "evc-init-init", timeout=180).strip()
        assert rc == "0", stack.logs("evc-init-init")
        stack.podman(*play, str(files[2]), timeout=600)
        stack.ports["api"] = ports["api"]
        wait_until(lambda: stack.http("/readyz")[0] == 200, 120, "the API pod to be ready")
        stack.token = stack.podman("exec", "evc-api-pod-0-api", "cat", "/var/lib/evc/admin-token").strip()
        yield stack
    finally:
        for f in reversed(files):
            subprocess.run(["podman", "kube", "down", str(f)], env=env, capture_output=True, timeout=300, check=False)
        stack.podman("secret", "rm", "evc-secrets", check=False)
        made = set(stack.podman("volume", "ls", "--format", "{{.Name}}").split()) - volumes_before
        for v in made:
            stack.podman("volume", "rm", "-f", v, check=False)
        pods = stack.podman("pod", "ls", "--format", "{{.Name}}").split()
        mine = [p for p in pods if p.startswith(("evc-", "redis-pod", "flower-pod"))]
        assert not mine, f"left behind: {mine}"


def _redis_ping(stack: Stack) -> bool:
    out = stack.podman("exec", "redis-pod-0-redis", "redis-cli", "-p", str(stack.ports["redis"]),
                       "-a", stack.env["REDIS_PASSWORD"], "--no-auth-warning", "ping", check=False)  # fmt: skip
    return out.strip() == "PONG"


def test_the_base_plays_and_serves(played: Stack) -> None:
    stack = played
    # every Deployment runs (one pod each), the init Pod has finished
    pods = dict(line.split() for line in stack.podman("pod", "ls", "--format", "{{.Name}} {{.Status}}").splitlines())
    for name in (
        "redis",
        "evc-api",
        "evc-beat",
        "flower",
        *(f"evc-worker-{q}" for q in ("default", "ssh", "ansible", "fl")),
    ):
        assert pods.get(f"{name}-pod-0") == "Running", (name, pods)
    # a device registered through the ssh worker pod, a no-op job through the default one
    root = Path(tempfile.mkdtemp(prefix="evc-sim-"))
    root.chmod(0o711)
    key = stack.call("GET", "/api/v1/ssh-key")["public_key"].strip()
    try:
        with SimulatorThread(root, authorized_keys=[key]) as sim:
            (d,) = sim.start(1, f"kube{os.getpid() % 10000}", privileges="root")
            body = {"name": d.name, "host": d.host, "port": d.port, "username": d.username}
            out = stack.call("POST", "/api/v1/devices", body)
            assert stack.wait_job(out["job"]["id"])["state"] == "succeeded"
            assert stack.call("GET", f"/api/v1/devices/{out['device']['id']}")["state"] == "online"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    job = stack.call("POST", "/api/v1/jobs", {"kind": "noop"})
    assert stack.wait_job(job["id"])["state"] == "succeeded"
    # a worker pod's metrics sidecar serves that pod's worker metrics (the first of them: the port
    # the mapping gave it)
    deadline = time.monotonic() + 30
    scraped = b""
    while time.monotonic() < deadline and b"evc_" not in scraped:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['metrics']}/metrics", timeout=5) as r:  # noqa: S310
                scraped = r.read()
        except OSError:
            time.sleep(1)
    assert b"evc_" in scraped
