"""Benchmark: API job submission throughput/latency (gunicorn, 2 sync workers, wrk) and the
no-op job's submit-to-succeeded latency through a real Celery worker.

    .venv/bin/python bench/api_submit.py [--duration 10] [--connections 8]

Targets (issue 2, 2-core machine): >= 1,500 submissions/s with p99 <= 20 ms (a bare Flask
endpoint calling apply_async does ~1,770/s, p99 12.5 ms there); no-op job submission to
`succeeded` p50 <= 5 ms (a bare Celery round trip is 2.0 ms)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests
from _common import Figure, emit, median, pct, private_stack, stamp

from evc.auth import create_operator_token
from evc.context import Context
from evc.embedded import free_port
from evc.settings import settings_env
from evc.store import Store

LUA = """
wrk.method = "POST"
wrk.body = '{"kind": "noop"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def _wait(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def _parse_ms(s: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def _wrk(app: str, settings, token: str, duration: int, connections: int) -> tuple[float, float, str]:
    env = {**os.environ, **settings_env(settings)}
    api = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "2", "-b", settings.api_bind, "--log-level", "warning",
         "--chdir", str(Path(__file__).parent), app], env=env,
    )  # fmt: skip
    try:
        _wait(f"http://{settings.api_bind}/api/v1/jobs", 20)
        script = Path(tempfile.mkdtemp()) / "post.lua"
        script.write_text(LUA % token)
        url = f"http://{settings.api_bind}/api/v1/jobs"
        subprocess.run(["wrk", "-t1", "-c4", "-d2s", "-s", str(script), url], capture_output=True)  # warm-up
        out = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        api.terminate()
        api.wait()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = _parse_ms(re.search(r"99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return rps, p99, out


def submission(duration: int, connections: int) -> list[Figure]:
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk); skipping the submission benchmark")
        nan = float("nan")  # reported as not measured, never left out
        return [
            Figure("API submissions/s (not measured: no wrk)", ">= 1500", nan, "req/s", False),
            Figure("API submission p99 latency (not measured: no wrk)", "<= 20 ms", nan, "ms", False),
        ]
    srv, settings = private_stack()
    port = free_port()
    settings = settings.replace(api_bind=f"127.0.0.1:{port}")
    store = Store.from_settings(settings)
    _, token = create_operator_token(Context(store, settings), "bench", ["admin"])
    try:
        base_rps, base_p99, _ = _wrk("_bare_app:app", settings, token, duration, connections)
        print(f"baseline (bare Flask + send_task, same machine, now): {base_rps:.0f} req/s, p99 {base_p99:.1f} ms")
        rps, p99, out = _wrk("evc.api.wsgi:app", settings, token, duration, connections)
        print(out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            print(f"WARNING: {non2xx.group(1)} non-2xx responses")
    finally:
        srv.stop()
    print(f"EVC / baseline throughput ratio: {rps / base_rps:.2f}")
    return [
        Figure("API submissions/s (2 gunicorn sync workers)", ">= 1500", rps, "req/s", rps >= 1500, rps / 1770),
        Figure("API submission p99 latency", "<= 20 ms", p99, "ms", p99 <= 20, p99 / 12.5),
    ]


def roundtrip(n: int) -> list[Figure]:
    """No-op jobs one after another: job.finished_at - job.created_at, both server-side clocks."""
    from evc.workers.celery_app import make_celery

    from evc import jobs

    srv, settings = private_stack()
    store = Store.from_settings(settings)
    env = {**os.environ, **settings_env(settings)}
    w = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "evc.workers.app", "worker", "-Q", "default", "-c", "1",
         "-l", "WARNING", "--without-mingle", "--without-gossip", "-n", "bench@localhost"], env=env,
    )  # fmt: skip
    try:
        sender = make_celery(settings, include_tasks=False)
        deadline = time.monotonic() + 30
        while not sender.control.ping(timeout=0.5):
            if time.monotonic() > deadline:
                raise SystemExit("worker did not start")
        lat: list[float] = []
        for i in range(n + 20):
            job, _ = jobs.submit(store, sender, "noop", created_by="bench")
            while True:
                state = store.job_state(job["id"])
                if state in ("succeeded", "failed"):
                    break
                time.sleep(0.0002)
            j = store.get_job(job["id"])
            if i >= 20:  # warm-up
                lat.append((stamp(j["finished_at"], "finished_at") - j["created_at"]) * 1000)
    finally:
        w.terminate()
        w.wait()
        srv.stop()
    p50 = median(lat)
    print(
        f"no-op submit->succeeded over {n} jobs: p50 {p50:.2f} ms, p90 {pct(lat, 90):.2f} ms, p99 {pct(lat, 99):.2f} ms"
    )
    return [Figure("no-op job submit->succeeded p50", "<= 5 ms", p50, "ms", p50 <= 5, p50 / 2.0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=300)
    a = ap.parse_args()
    figs = submission(a.duration, a.connections) + roundtrip(a.jobs)
    emit(figs)


if __name__ == "__main__":
    main()
