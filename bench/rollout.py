"""Rollout benchmark (issue 13's figure): a deployment on 20 simulated devices rolled out from
version 1 to version 2 of the digits model, one device failing its smoke test on version 2.

The real path: a private Redis, the simulator in its own process (20 SSH servers running
commands for real, sharing this host's network: one port per device), a Celery worker process,
the API (Flask app, in this process). The devices' records are written to the store directly
(registration is not what is measured). Every device's Python is this venv's; the failing one's
has a ``sitecustomize`` that makes ONNX Runtime refuse ``.../2/model.onnx`` (a fault switch, as
in tests/test_rollout.py), so its edge server loads v2 but fails the smoke inference.

A rollout stops at its first failing device (the devices not reached stay on v1), so the
failing device is the last one by default (``--fail-at 19``): the report shows 19 devices
updated and the failed one rolled back, named, with its reason. ``--fail-at 5`` shows the stop.
Then ``POST /deployments/{id}/rollback`` returns all 20 to v1 (timed too) and the deployment is
removed.

The edge servers switch versions live (SIGHUP, no restart): a client thread calls the first
three good devices' endpoints all through the rollout and the rollback, and the report counts
its failed requests (want 0). ``--failure-budget N`` lets the rollout go on past N failing
devices (``--fail-at 5 --failure-budget 1``: 19 updated, the failed one back on v1).

    .venv/bin/python bench/rollout.py [--devices 20] [--fail-at 19] [--max-unavailable 1] [--failure-budget N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import API, Figure, emit, private_stack, spawn, stop, stop_edge_servers, wait_for_sim  # noqa: E402

from evc import keys  # noqa: E402
from evc.embedded import free_port  # noqa: E402
from evc.model import Device  # noqa: E402
from evc.settings import settings_env  # noqa: E402
from evc.store import Store, new_id  # noqa: E402
from tests.fixtures.onnx_models import digits_model, fit_softmax, softmax_model  # noqa: E402
from tests.test_rollout import FAULT  # noqa: E402
from tests.test_rollout_live import Hammer  # noqa: E402


def _python(home: Path, faulty: bool) -> None:
    env = ""
    if faulty:
        (home / "fault").mkdir(exist_ok=True)
        (home / "fault" / "sitecustomize.py").write_text(FAULT)
        env = 'PYTHONPATH="$HOME/fault" '
    (home / "py").write_text(f'#!/bin/sh\n{env}exec {sys.executable} "$@"\n')
    (home / "py").chmod(0o755)


def _push(api: API, name: str, version: str, data: bytes) -> None:
    form = {"metadata": json.dumps({"name": name, "version": version}), "file": (io.BytesIO(data), "model.onnx")}
    api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")


def run(args: argparse.Namespace, tmp: Path) -> tuple[bool, list[Figure]]:
    redis, settings = private_stack(tmp)
    procs: list[subprocess.Popen[bytes]] = []
    sims = []
    try:
        store = Store.from_settings(settings)
        keys.ensure_keypair(settings)
        env = {**os.environ, **settings_env(settings)}
        state = tmp / "sim" / "devices.json"
        procs.append(spawn(
            [sys.executable, "-m", "evc_sim", "--devices", str(args.devices), "--root", str(tmp / "sim"),
             "--state-file", str(state), "--authorized-keys", str(settings.key_path.with_suffix(".pub")),
             "--privileges", "root", "--prefix", "ro"], env, tmp / "sim.log",
        ))  # fmt: skip
        procs.append(spawn(
            [sys.executable, "-m", "celery", "-A", "evc.workers.app", "worker", "-Q", "default,ssh,ansible",
             "-P", "threads", "-c", "4", "-n", "bench-rollout@%h", "-l", "WARNING",
             "--without-mingle", "--without-gossip"], env, tmp / "worker.log",
        ))  # fmt: skip
        sims = wait_for_sim(procs[0], state, tmp / "sim.log")
        api = API(settings, store)
        ids = []
        for i, d in enumerate(sims):
            rec = cast(Device, {
                "id": new_id("dev"), "name": d.name, "host": d.host, "port": d.port, "username": d.username,
                "host_key": d.host_key_public, "state": "online", "privilege": "root", "level": 0, "labels": {},
                "cluster_id": None, "health": None, "created_at": time.time(),
            })  # fmt: skip
            ids.append(store.create_device(rec, token_hash="h-" + rec["id"])["id"])
            _python(Path(d.home), faulty=i == args.fail_at)
        bad = sims[args.fail_at].name
        v1, digits = digits_model()
        w, b = fit_softmax(digits)
        _push(api, "digits", "1", v1)
        _push(api, "digits", "2", softmax_model(w * 1.01, b))
        ports = {i: free_port() for i in ids}
        body = {"model": "digits", "version": "1", "devices": ids, "python": "~/py", "ports": ports}
        t0 = time.monotonic()
        job = api.call("POST", "/api/v1/deployments", json=body)
        dep_id = job["params"]["deployment"]
        job = api.wait(job["id"])
        deploy_s = time.monotonic() - t0
        if job["state"] != "succeeded":
            raise SystemExit(f"the first deployment {job['state']}: {json.dumps(job)[:3000]}")
        print(f"v1 deployed to {args.devices} devices in {deploy_s:.1f} s (all at once)")

        good = [i for i in range(args.devices) if i != args.fail_at][:3]
        hammer = Hammer([f"127.0.0.1:{ports[ids[i]]}" for i in good], "digits")
        hammer.start()
        t0 = time.monotonic()
        change = {"version": "2", "max_unavailable": args.max_unavailable}
        if args.failure_budget is not None:
            change["failure_budget"] = args.failure_budget
        job = api.call("PATCH", f"/api/v1/deployments/{dep_id}", json=change)
        job = api.wait(job["id"])
        rollout_s = time.monotonic() - t0
        dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
        summary = job.get("summary") or {}
        message = summary.get("message") or (job.get("error") or {}).get("message", "")
        names = dict(zip(ids, [s.name for s in sims], strict=True))
        by_state: dict[str, list[str]] = {}
        for t in dep["targets"]:
            by_state.setdefault(f"{t['state']} v{t['version']}", []).append(names[t["device"]])
        print(f"rollout v1 -> v2, max_unavailable {args.max_unavailable}: job {job['state']} in {rollout_s:.1f} s")
        print(f"  report: {message}")
        for k, v in sorted(by_state.items()):
            print(f"  {k}: {len(v)} ({', '.join(v) if len(v) <= 3 else v[0] + ' ... ' + v[-1]})")
        failed = [t for t in dep["targets"] if t["state"] == "rolled-back"]
        updated = sum(1 for t in dep["targets"] if t["state"] == "running" and t["version"] == "2")
        named = bad in message and bool(failed) and names[failed[0]["device"]] == bad

        t0 = time.monotonic()
        job_rb = api.wait(api.call("POST", f"/api/v1/deployments/{dep_id}/rollback", json={})["id"])
        rollback_s = time.monotonic() - t0
        hammer.stop()
        dep = api.call("GET", f"/api/v1/deployments/{dep_id}")
        live = sum(1 for t in dep["targets"] if t.get("switch") == "reload")
        print(f"client on {len(good)} good devices through both: {hammer.ok} requests, {len(hammer.failed)} failed"
              + (f" (first: {hammer.failed[0]})" if hammer.failed else ""))  # fmt: skip
        back = sum(1 for t in dep["targets"] if t["state"] == "running" and t["version"] == "1")
        print(f"rollback to v1: job {job_rb['state']} in {rollback_s:.1f} s, {back}/{args.devices} on v1")
        api.wait(api.call("DELETE", f"/api/v1/deployments/{dep_id}")["id"])

        n = args.max_unavailable  # the devices of the batches up to the failing one's, less it
        want_updated = min(args.devices, (args.fail_at // n + 1) * n) - 1
        if args.failure_budget:  # past the failing device: all the others
            want_updated = args.devices - 1
        figures = [
            Figure(f"rollout wall time, {args.devices} devices (s)", "-", rollout_s, "s", True),
            Figure("devices updated to v2", f"= {want_updated}", updated, "devices", updated == want_updated),
            Figure(
                "failed device rolled back, named in the report",
                "= 1",
                len(failed),
                "devices",
                named and len(failed) == 1,
            ),  # fmt: skip
            Figure(f"rollback of all {args.devices} to v1 (s)", "-", rollback_s, "s", back == args.devices),
            Figure("failed client requests during rollout + rollback", "= 0", len(hammer.failed), "requests",
                   not hammer.failed and hammer.ok > 0),
            Figure("devices switched live (SIGHUP) on the rollback", "-", live, "devices", True),
        ]  # fmt: skip
        return all(f.ok for f in figures), figures
    finally:
        stop_edge_servers(sims)  # servers left running if something stopped half-way
        for p in reversed(procs):
            stop(p)
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--fail-at", type=int, default=None, help="the failing device's index (default: the last)")
    parser.add_argument("--max-unavailable", type=int, default=1)
    parser.add_argument("--failure-budget", type=float, default=None, help="devices that may fail (count or fraction)")
    args = parser.parse_args()
    if args.fail_at is None:
        args.fail_at = args.devices - 1
    with tempfile.TemporaryDirectory(prefix="evc-bench-rollout-") as tmp:
        ok, figures = run(args, Path(tmp))
    emit(figures)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
