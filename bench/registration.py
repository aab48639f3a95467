"""Benchmark: register N simulated devices through the API and a real worker, until every
registration job has succeeded.

    .venv/bin/python bench/registration.py [--devices 100] [--concurrency 4]

Target (issue 2, 2-core machine): 100 devices <= 5 s. The simulator runs in its own process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Figure, emit, private_stack, stamp

from evc import keys
from evc.auth import create_operator_token
from evc.context import Context
from evc.settings import settings_env
from evc.store import Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    srv, settings = private_stack()
    keys.ensure_keypair(settings)
    store = Store.from_settings(settings)
    env = {**os.environ, **settings_env(settings)}
    root = Path(tempfile.mkdtemp(prefix="evc-bench-sim-"))
    root.chmod(0o711)
    state = root / "devices.json"
    sim = subprocess.Popen(
        [sys.executable, "-m", "evc_sim", "--devices", str(a.devices), "--root", str(root),
         "--state-file", str(state), "--authorized-keys", str(settings.key_path.with_suffix(".pub")),
         "--privileges", "user"], env=env,
    )  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "evc.workers.app", "worker", "-Q", "ssh", "-c", str(a.concurrency),
         "-l", "WARNING", "--without-mingle", "--without-gossip", "-n", "bench@localhost"], env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not state.exists():
            if time.monotonic() > deadline or sim.poll() is not None:
                raise SystemExit("the simulator did not start")
            time.sleep(0.1)
        devices = json.loads(state.read_text())["devices"]
        from evc.api.app import create_app
        from evc.workers.celery_app import make_celery

        while not make_celery(settings, include_tasks=False).control.ping(timeout=0.5):
            time.sleep(0.2)
        app = create_app(settings)
        client = app.test_client()
        _, token = create_operator_token(Context(store, settings), "bench", ["admin"])
        h = {"Authorization": f"Bearer {token}"}
        t0 = time.time()
        job_ids = []
        for d in devices:
            r = client.post("/api/v1/devices", headers=h, json={
                "name": d["name"], "host": d["host"], "port": d["port"], "username": d["username"]})  # fmt: skip
            assert r.status_code == 202, r.get_json()
            job_ids.append(r.get_json()["job"]["id"])
        submitted = time.time() - t0
        pending = set(job_ids)
        while pending:
            for j in list(pending):
                if store.job_state(j) in ("succeeded", "failed", "cancelled"):
                    pending.discard(j)
            if time.time() - t0 > 300:
                raise SystemExit(f"{len(pending)} registrations still running after 300 s")
            time.sleep(0.05)
        jobs = [store.get_job(j) for j in job_ids]
        wall = max(stamp(j["finished_at"], "finished_at") for j in jobs) - t0
        ok = sum(1 for j in jobs if j["state"] == "succeeded")
        print(
            f"submitted {len(job_ids)} registrations in {submitted:.2f} s; {ok} succeeded; all done after {wall:.2f} s"
        )
        failed = [j["error"] for j in jobs if j["state"] != "succeeded"][:3]
        if failed:
            print("failures:", failed)
        target = 5.0 * a.devices / 100
        ok_all = wall <= target and ok == len(jobs)
        name = f"register {a.devices} simulated devices"
        emit([Figure(name, f"<= {target:.1f} s", wall, "s", ok_all, wall / target)])
    finally:
        worker.terminate()
        sim.terminate()
        worker.wait()
        sim.wait()
        srv.stop()


if __name__ == "__main__":
    main()
