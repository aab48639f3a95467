"""`evc flower` out of the box (issue 11.5): it finds the running stack's broker in the data
directory, protects its HTTP API with basic auth (a credential EVC generates, 0600), and shows
EVC's tasks by job id. A real Flower against a real Redis and a real worker."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from evc import flower
from evc.embedded import free_port
from evc.errors import ConfigError
from evc.settings import Settings, load_settings, settings_env
from tests.fixtures.helpers import wait_until

pytestmark = pytest.mark.integration


def test_broker_and_credential_files(tmp_path: Path) -> None:
    s = load_settings(env={}, data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match="evc up"):
        flower.broker_url(s)
    running = s.replace(redis_url="redis://:secret@127.0.0.1:6399/0")
    path = flower.record_broker(running)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert flower.broker_url(s) == running.redis_url  # found from the data directory
    assert flower.broker_url(s.replace(redis_url="redis://other/1")) == "redis://other/1"  # EVC_REDIS_URL wins
    user, password = flower.credential(s)
    assert (user, password) == flower.credential(s) and len(password) >= 20
    assert stat.S_IMODE((s.data_dir / flower.AUTH_FILE).stat().st_mode) == 0o600
    fl = flower.launch(s, 5599)
    assert fl.env["FLOWER_BASIC_AUTH"] == f"{user}:{password}" and password not in " ".join(fl.argv)
    assert "--address=127.0.0.1" in fl.argv
    flower.forget_broker(s)
    with pytest.raises(ConfigError):
        flower.broker_url(s)


def _get(url: str, auth: tuple[str, str] | None = None) -> requests.Response:
    return requests.get(url, auth=auth, timeout=5)


def _poll(fn: Any, timeout: float, what: str) -> Any:
    def attempt() -> Any:
        try:
            return fn()
        except requests.RequestException:  # not listening yet
            return None

    return wait_until(attempt, timeout, what, interval=0.3)


def test_evc_flower_watches_the_stack_and_shows_jobs_by_id(settings: Settings, api: Any, worker: Any,
                                                           tmp_path: Path) -> None:  # fmt: skip
    flower.record_broker(settings)  # as `evc up` does
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVC_", "FLOWER_"))}
    env.update(settings_env(settings.replace(redis_url="")))  # no broker given: found in the data dir
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "evc.cli", "flower", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _poll(lambda: proc.poll() is not None or _get(base + "/healthcheck").status_code, 30, "Flower")
        assert proc.poll() is None, log.read_text()[-2000:]
        user, password = flower.credential(settings)
        assert password in log.read_text()  # printed for the operator
        assert _get(base + "/api/workers").status_code == 401  # protected
        workers = _poll(lambda: (r := _get(base + "/api/workers", (user, password))).status_code == 200
                        and worker.hostname in r.json() and r.json(), 30, "the worker in Flower")  # fmt: skip
        assert worker.hostname in workers
        status, job = api.call("POST", "/api/v1/jobs", json={"kind": "noop"})
        assert status == 202, job
        assert api.wait_job(job["id"])["state"] == "succeeded"
        task_id = f"{job['id']}-{job.get('attempt', 0)}"
        tasks = _poll(lambda: (t := _get(base + "/api/tasks", (user, password)).json()) and task_id in t
                      and t[task_id]["state"] == "SUCCESS" and t, 30, f"task {task_id} done in Flower")  # fmt: skip
        assert tasks[task_id]["name"] == "evc.noop"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        flower.forget_broker(settings)
