"""Benchmark: scale-out of the compose stack under podman (issue 19, item 3): the same queue served
by 1, 2 and 4 worker containers.

    .venv/bin/python bench/scale_out.py [--workers 1,2,4] [--jobs 300] [--devices 1000]

For each worker count: no-op jobs per second through the API and the ``default`` workers (all
jobs submitted at once from 8 threads; from the first submission to the last success), and a
health sweep of ``--devices`` simulated devices (the simulator in its own process on the host)
split into one sweep job per ``ssh`` worker container (from submission to the last sweep's end).
Each container runs one worker process (concurrency 1), so the curve is containers, not threads.
Uses tests/fixtures/compose.py (the images of tests/test_compose.py) and prints the load average
with each figure: on the shared 2-core machine the curve says where the cores run out.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Figure, emit, registered  # noqa: E402

from evc.settings import Settings  # noqa: E402
from evc.store import Store  # noqa: E402
from evc_sim import SimDevice, raise_fd_limit, read_state  # noqa: E402
from tests.fixtures.compose import Stack, ensure_images, new_stack, podman_env, why_not  # noqa: E402
from tests.fixtures.helpers import wait_until  # noqa: E402

SERVICES = ["evc-api", "worker-default", "worker-ssh"]


def start_simulator(root: Path, n: int, key: str) -> tuple[subprocess.Popen[bytes], list[SimDevice]]:
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)
    (root / "evc.pub").write_text(key + "\n")
    state = root / "devices.json"
    log = open(root / "sim.log", "wb")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "evc_sim", "--devices", str(n), "--root", str(root), "--state-file", str(state),
         "--authorized-keys", str(root / "evc.pub"), "--prefix", "scale"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    wait_until(lambda: state.exists() or proc.poll() is not None, 600, "the simulator")
    if proc.poll() is not None:
        raise SystemExit((root / "sim.log").read_text()[-2000:])
    return proc, read_state(state)


def register(store: Store, devices: list[SimDevice]) -> list[str]:
    """Device records as a registration leaves them (pinned host keys), written to the stack's Redis."""
    return registered(store, devices, "dev_scale")


def scale_to(stack: Stack, n: int) -> None:
    """Exactly *n* containers of worker-default and of worker-ssh, each ready."""
    old = stack.containers("worker-default", all_=True) + stack.containers("worker-ssh", all_=True)
    if old:
        stack.podman("rm", "-f", "-t", "5", *old, timeout=180)
    stack.env.update(WORKER_DEFAULT_REPLICAS=str(n), WORKER_SSH_REPLICAS=str(n))
    stack.compose("up", "-d", "--no-deps", "worker-default", "worker-ssh")
    names = stack.containers("worker-default") + stack.containers("worker-ssh")
    assert len(names) == 2 * n, names

    def ready() -> bool:
        return all(" ready." in stack.logs(c) for c in names)

    wait_until(ready, 180, f"{2 * n} workers to be ready", interval=1.0)


def jobs_per_second(stack: Stack, jobs: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: stack.call("POST", "/api/v1/jobs", {"kind": "noop"})["id"], range(jobs)))
    for job_id in ids:
        assert stack.wait_job(job_id, 600)["state"] == "succeeded"
    return jobs / (time.perf_counter() - t)


def sweep_seconds(stack: Stack, ids: list[str], shards: int) -> float:
    parts = [ids[i::shards] for i in range(shards)]
    t = time.perf_counter()
    jobs = [stack.call("POST", "/api/v1/health/sweep", {"devices": p})["id"] for p in parts]
    for job_id in jobs:
        job = stack.wait_job(job_id, 900)
        assert job["state"] in ("succeeded", "partial"), job
    return time.perf_counter() - t


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--devices", type=int, default=1000)
    args = ap.parse_args()
    if why_not():
        raise SystemExit(f"scale_out: {why_not()}")
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="evc-scale-"))
    env = podman_env(tmp)
    stack = new_stack(f"evcs{secrets.token_hex(3)}", {**env, "EVC_IMAGE": ensure_images(env)}, tmp)
    stack.env.update(WORKER_DEFAULT_CONCURRENCY="1", WORKER_SSH_CONCURRENCY="1", EVC_HEALTH_CONCURRENCY="200")
    sim = None
    figures: list[Figure] = []
    try:
        stack.compose("up", "-d", "--no-deps", "redis")
        wait_until(stack.redis_ping, 30, "Redis")
        stack.compose("up", "-d", "--no-deps", "evc-init")
        stack.podman("wait", f"{stack.project}_evc-init_1", timeout=120)
        stack.compose("up", "-d", "--no-deps", "evc-api")
        wait_until(lambda: stack.http("/healthz")[0] == 200, 90, "the API")
        stack.token = stack.podman("exec", f"{stack.project}_evc-api_1", "cat", "/var/lib/evc/admin-token").strip()
        key = stack.call("GET", "/api/v1/ssh-key")["public_key"].strip()
        sim, devices = start_simulator(tmp / "sim", args.devices, key)
        url = f"redis://:{stack.env['REDIS_PASSWORD']}@127.0.0.1:{stack.ports['redis']}/0"
        ids = register(Store.from_settings(Settings(redis_url=url)), devices)
        base_jobs = base_sweep = 0.0
        for n in (int(x) for x in args.workers.split(",")):
            scale_to(stack, n)
            sweep_seconds(stack, ids, n)  # opens each worker's connections (cold)
            warm = sweep_seconds(stack, ids, n)
            rate = jobs_per_second(stack, args.jobs)
            base_jobs, base_sweep = base_jobs or rate, base_sweep or warm
            print(f"{n} worker container(s): {rate:.0f} no-op jobs/s (x{rate / base_jobs:.2f}), "
                  f"warm sweep of {len(ids)} devices in {n} shard(s) {warm:.2f} s (x{base_sweep / warm:.2f}); "
                  f"load average {load()}", flush=True)  # fmt: skip
            figures += [
                Figure(f"no-op jobs/s, {n} default worker container(s)", "-", rate, "jobs/s", True, rate / base_jobs),
                Figure(f"warm health sweep, {len(ids)} devices, {n} ssh worker container(s)", "-", warm, "s", True,
                       base_sweep / warm),
            ]  # fmt: skip
    finally:
        if sim is not None:
            sim.terminate()
            sim.wait(30)
        left = stack.down()
        if left:
            print(f"scale_out: left behind: {left}", file=sys.stderr)
    emit(figures)


if __name__ == "__main__":
    main()
