"""The container image, built for real: scripts/build-image (podman, offline: an mmdebstrap base and
a wheelhouse) and what every role needs from the result (issue 12: "the container image works").

Opt-in, since a build takes minutes: EVC_TEST_IMAGE=1 pytest tests/test_image.py. Skipped without
podman. The image is tagged localhost/evc:test-image; the base image stays cached by podman.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/evc:test-image"
RUNTIME = os.environ.get("EVC_PODMAN_RUNTIME", "runc")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("EVC_TEST_IMAGE") != "1", reason="builds the image: set EVC_TEST_IMAGE=1"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("CONTAINERS_CONF"):
        conf = tmp_path_factory.mktemp("podman") / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        env["CONTAINERS_CONF"] = str(conf)
    return env


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> str:
    started = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-image"), TAG],
        cwd=ROOT, env=podman_env, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"build-image: built {TAG} in" in proc.stdout
    print(f"\nscripts/build-image {TAG}: {took:.0f} s")
    return TAG


def podman(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "--runtime", RUNTIME, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_in(image: str, env: dict[str, str], *cmd: str) -> str:
    proc = podman(env, "run", "--rm", "--network", "none", image, *cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_package_is_whole_and_the_simulator_absent(image: str, podman_env: dict[str, str]) -> None:
    """evc.api, evc.tasks, evc.workers and the playbooks are installed inside evc/ (the
    package-dir mapping), the entry points import, and the simulator is not in the image."""
    out = run_in(
        image, podman_env, "python", "-c",
        "import importlib.util, json, os\n"
        "import evc.api.wsgi, evc.workers.app, evc.cli, evc\n"
        "d = os.path.dirname(evc.__file__)\n"
        "print(json.dumps({'listing': sorted(os.listdir(d)),"
        " 'facts': os.path.isfile(os.path.join(d, 'playbooks', 'facts.yml')),"
        " 'sim': importlib.util.find_spec('evc_sim') is not None}))",
    )  # fmt: skip
    got = json.loads(out.strip().splitlines()[-1])
    assert {"api", "tasks", "workers", "playbooks"} <= set(got["listing"]), got["listing"]
    assert "sim" not in got["listing"]
    assert got["facts"], "evc/playbooks/facts.yml is missing"
    assert not got["sim"], "the simulator (evc_sim) is in the image"


def test_the_roles_commands_run(image: str, podman_env: dict[str, str]) -> None:
    """The CLI, Celery with EVC's app (workers, beat, flower use it), ansible and ssh."""
    assert "Usage: evc" in run_in(image, podman_env, "evc", "--help")
    assert "celery" in run_in(image, podman_env, "celery", "-A", "evc.workers.app", "report")
    assert run_in(image, podman_env, "celery", "-A", "evc.workers.app", "--version").strip()
    assert "flower" in run_in(image, podman_env, "celery", "-A", "evc.workers.app", "flower", "--help").lower()
    assert run_in(image, podman_env, "ansible-playbook", "--version").startswith("ansible-playbook")
    out = run_in(image, podman_env, "sh", "-c", "id -u; command -v ssh")
    assert out.split() == ["10001", "/usr/bin/ssh"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def api(image: str, podman_env: dict[str, str]) -> Iterator[str]:
    """The image's API command (gunicorn, 2 workers) on a free loopback port; EVC_REDIS_URL unset."""
    port = _free_port()
    proc = podman(
        podman_env, "run", "-d", "--rm", "--network", "host",
        image, "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}", "--worker-tmp-dir", "/dev/shm",
        "--access-logfile", "-", "evc.api.wsgi:app",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cid = proc.stdout.strip()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        podman(podman_env, "stop", "-t", "5", cid)


def test_the_api_starts_without_redis(api: str, podman_env: dict[str, str]) -> None:
    """gunicorn serves; /healthz is up, /readyz says clearly that no Redis is configured."""
    deadline = time.monotonic() + 60
    while True:
        try:
            status, body = _get(f"{api}/healthz")
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the API did not answer /healthz within 60 s"
            time.sleep(0.5)
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _get(f"{api}/readyz")
    assert status == 503
    ready = json.loads(body)
    assert ready["redis"] is False and "EVC_REDIS_URL" in ready["error"]
