"""Cost curves: what registration, a warm health sweep, a provisioning run, a no-op job and a
filtered job listing cost at 100, 1,000 and 5,000 simulated devices (issue 18 item 2).

    .venv/bin/python bench/cost_curves.py [--sizes 100,1000,5000] [--provision-sample 20]
        [--png build/bench/cost_curves.png] [--json PATH]

Per size: a private Redis, one simulator process serving every device, one Celery worker (-c 2,
queues ssh, ansible and default) and the API in this process (Flask's test client). Then:

* registration: every device through ``POST /api/v1/devices`` until every job has succeeded;
* warm health sweep: ``evc.health.sweep`` exactly as the beat task runs it, after one cold sweep
  (median of ``--warm-runs``);
* provisioning: a small playbook (``bench/provision_bench.py``'s three tasks) as one job over a
  *sample* of ``--provision-sample`` devices (default 20), at every size: the sample is said in
  the row, never hidden; the fleet's size changes what the job reads, not how many it runs;
* no-op jobs: ``--noop-jobs`` (default 200) submitted and finished: Redis memory per finished job;
* filtered listing: ``GET /api/v1/jobs?kind=register&state=succeeded&limit=50`` (median of 50).

Controller CPU is this process (API, sweep) plus the worker's process tree; the simulator's
(the devices' side) is printed apart, never counted as the controller's. Redis memory is
``used_memory`` deltas. The FL round is measured by ``bench/fl_evc.py`` (its devices train for
real; 5,000 of them do not fit one machine): its per-device cost row is not in this table.

Targets: per-device warm-sweep cost (CPU) from 1,000 to 5,000 devices grows <= 1.2x;
registration of 1,000 devices <= 30 s. A table, a JSON file and a log-log PNG (bench/_plot.py).
Exit status 0 whatever the figures say.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from _common import API, Figure, emit, private_stack, spawn, stop, tree_cpu, wait_for_sim
from _plot import loglog
from provision_bench import PLAYBOOK

from evc import health, keys
from evc import pool as pooling
from evc.settings import Settings, settings_env
from evc.store import Store
from evc_sim import raise_fd_limit

TERMINAL = ("succeeded", "partial", "failed", "cancelled")


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Meter:
    """Wall time, controller CPU (this process + the worker tree), simulator CPU, Redis memory."""

    def __init__(self, worker: int, sim: int, r: redis.Redis) -> None:
        self.worker, self.sim, self.r = worker, sim, r

    def mem(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    def __enter__(self) -> Meter:
        self.t, self.c, self.s, self.m = (
            time.perf_counter(),
            own_cpu() + tree_cpu(self.worker),
            tree_cpu(self.sim),
            self.mem(),
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t
        self.cpu = own_cpu() + tree_cpu(self.worker) - self.c
        self.sim_cpu = tree_cpu(self.sim) - self.s
        self.dmem = self.mem() - self.m


def wait_jobs(store: Store, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    """Wait for every job of *ids*, polling the oldest unfinished one (they finish about in
    order): one read per poll whatever the fleet's size, so the wait costs no controller CPU
    that grows with it (polling every pending job did: at 5,000 it took a core)."""
    deadline, i = time.monotonic() + timeout, 0
    while i < len(ids):
        if store.job_state(ids[i]) in TERMINAL:
            i += 1
            continue
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(ids) - i} of {len(ids)} jobs still running after {timeout:.0f} s")
        time.sleep(0.02)
    return [dict(store.get_job(j)) for j in ids]


def start_sim(
    tmp: Path, n: int, settings: Settings, env: dict[str, str], started: list[subprocess.Popen[bytes]]
) -> tuple[subprocess.Popen[bytes], list[Any]]:
    state = tmp / "devices.json"
    sim = spawn([sys.executable, "-m", "evc_sim", "--devices", str(n), "--root", str(tmp / "sim"),
                 "--state-file", str(state), "--authorized-keys", str(settings.key_path.with_suffix(".pub")),
                 "--privileges", "user", "--prefix", "cc"], env, tmp / "sim.log")  # fmt: skip
    started.append(sim)
    return sim, wait_for_sim(sim, state, tmp / "sim.log", timeout=900)


def measure(n: int, a: argparse.Namespace) -> dict[str, Any]:
    """Every operation at one fleet size: a row per operation."""
    tmp = Path(tempfile.mkdtemp(prefix=f"evc-bench-cost-{n}-"))
    tmp.chmod(0o755)
    srv, settings = private_stack(tmp)
    (tmp / "playbooks").mkdir()
    (tmp / "playbooks" / "bench3.yml").write_text(PLAYBOOK)
    settings = settings.replace(playbook_dirs=str(tmp / "playbooks"))
    keys.ensure_keypair(settings)
    env = {**os.environ, **settings_env(settings)}
    store = Store.from_settings(settings)
    r = redis.Redis.from_url(settings.redis_url)
    rows: dict[str, Any] = {"devices": n, "load": os.getloadavg()[0]}
    started: list[subprocess.Popen[bytes]] = []  # stopped whatever happens (Ctrl-C included)
    try:
        sim, devices = start_sim(tmp, n, settings, env, started)
        worker = spawn([sys.executable, "-m", "celery", "-A", "evc.workers.app", "worker", "-Q", "ssh,ansible,default",
                        "-c", str(a.concurrency), "-l", "WARNING", "--without-mingle", "--without-gossip",
                        "-n", f"cc{n}@localhost"], env, tmp / "worker.log")  # fmt: skip
        started.append(worker)
        api = API(settings, store)
        from evc.workers.celery_app import make_celery

        while not make_celery(settings, include_tasks=False).control.ping(timeout=0.5):
            time.sleep(0.2)
        m = Meter(worker.pid, sim.pid, r)
        with m:
            ids = [api.call("POST", "/api/v1/devices", json={"name": d.name, "host": d.host, "port": d.port,
                                                              "username": d.username})["job"]["id"]
                   for d in devices]  # fmt: skip
            done = wait_jobs(store, ids, a.timeout)
        ok = sum(j["state"] == "succeeded" for j in done)
        rows["register"] = _row(m, n, f"{ok}/{n} succeeded")
        rows["mem_per_device_B"] = m.dmem / n  # devices + their registration jobs
        health.sweep(store, settings)  # cold: opens the pool's connections
        runs = []
        for _ in range(a.warm_runs):
            with Meter(worker.pid, sim.pid, r) as m:
                res = health.sweep(store, settings)
            runs.append((m, len(res.failures)))
        m, failed = sorted(runs, key=lambda x: x[0].cpu)[len(runs) // 2]
        rows["sweep"] = _row(m, n, f"median of {a.warm_runs}; {failed} failed")
        rows["provision"] = provision(api, store, worker.pid, sim.pid, r, a, n)
        with Meter(worker.pid, sim.pid, r) as m:
            noop = [api.call("POST", "/api/v1/jobs", json={"kind": "noop"})["id"] for _ in range(a.noop_jobs)]
            wait_jobs(store, noop, a.timeout)
        rows["mem_per_job_B"] = m.dmem / a.noop_jobs
        rows["noop"] = _row(m, a.noop_jobs, f"{a.noop_jobs} no-op jobs (per job)")
        q = "/api/v1/jobs?kind=register&state=succeeded&limit=50"
        times = []
        with Meter(worker.pid, sim.pid, r) as m:
            for _ in range(a.list_requests):
                t = time.perf_counter()
                api.call("GET", q)
                times.append(time.perf_counter() - t)
        rows["listing"] = {"wall_s": statistics.median(times), "cpu_per_device_s": m.cpu / a.list_requests / n,
                           "note": f"median of {a.list_requests} requests over {n + a.noop_jobs} jobs"}  # fmt: skip
        rows["redis_used_memory_B"] = int(r.info("memory")["used_memory"])
    finally:
        pooling.shutdown()
        for proc in reversed(started):
            stop(proc)
        srv.stop()
    return rows


def _row(m: Meter, per: int, note: str) -> dict[str, Any]:
    return {"wall_s": m.wall, "cpu_per_device_s": m.cpu / per, "sim_cpu_s": m.sim_cpu, "note": note}


def provision(
    api: API, store: Store, worker: int, sim: int, r: redis.Redis, a: argparse.Namespace, n: int
) -> dict[str, Any]:
    """One provisioning job (the built-in ``ping`` playbook) over a sample of the fleet."""
    k = min(a.provision_sample, n)
    devs = api.call("GET", f"/api/v1/devices?limit={k}")["items"][:k]
    with Meter(worker, sim, r) as m:
        job = api.call("POST", "/api/v1/provision", json={"playbook": a.playbook, "targets": [d["id"] for d in devs]})
        done = wait_jobs(store, [job["id"]], a.timeout)[0]
    return _row(m, k, f"sample of {k} devices, {done['state']}")


OPS = ("register", "sweep", "provision", "noop", "listing")


def table(results: list[dict[str, Any]]) -> list[Figure]:
    print(f"{'operation':<10} {'devices':>8} {'wall s':>9} {'ctl CPU ms/dev':>15} {'sim CPU s':>10}  note")
    for res in results:
        for op in OPS:
            row = res.get(op)
            if row:
                print(f"{op:<10} {res['devices']:>8} {row['wall_s']:>9.3f} {row['cpu_per_device_s'] * 1000:>15.3f} "
                      f"{row.get('sim_cpu_s', float('nan')):>10.2f}  {row['note']}")  # fmt: skip
    print(f"{'devices':>8} {'Redis B/device':>15} {'Redis B/finished job':>21} {'load avg':>9}")
    for res in results:
        print(f"{res['devices']:>8} {res['mem_per_device_B']:>15.0f} {res['mem_per_job_B']:>21.0f} {res['load']:>9.1f}")
    figs: list[Figure] = []
    by_n = {res["devices"]: res for res in results}
    if 1000 in by_n:
        w = by_n[1000]["register"]["wall_s"]
        figs.append(Figure("register 1,000 devices (cost curves)", "<= 30 s", w, "s", w <= 30, w / 30))
    if 1000 in by_n and 5000 in by_n:
        g = by_n[5000]["sweep"]["cpu_per_device_s"] / by_n[1000]["sweep"]["cpu_per_device_s"]
        figs.append(Figure("warm sweep CPU/device growth 1,000->5,000", "<= 1.2x", g, "x", g <= 1.2, g / 1.2))
    for res in results:
        for op in OPS:
            row, n = res.get(op), res["devices"]
            if row and op != "listing":
                per = "job" if op == "noop" else "device"
                said = f"; {row['note'].split(',')[0]}" if op == "provision" else ""  # the sample, said
                name = f"{op}: controller CPU per {per} ({n}{said})"
                figs.append(Figure(name, "-", row["cpu_per_device_s"] * 1000, "ms", True))
            if row and op in ("register", "sweep", "listing"):
                figs.append(Figure(f"{op}: wall time ({n} devices)", "-", row["wall_s"], "s", True))
        figs.append(
            Figure(f"Redis memory per device ({res['devices']} devices)", "-", res["mem_per_device_B"], "B", True)
        )
        figs.append(Figure(f"Redis memory per finished job ({res['devices']})", "-", res["mem_per_job_B"], "B", True))
    return figs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4, help="the worker's processes (registration is I/O bound)")
    ap.add_argument("--provision-sample", type=int, default=20)
    ap.add_argument("--playbook", default="bench3", help="bench3: provision_bench's three tasks (ping, command, stat)")
    ap.add_argument("--noop-jobs", type=int, default=200)
    ap.add_argument("--list-requests", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--png", type=Path, default=Path("build/bench/cost_curves.png"))
    ap.add_argument("--json", type=Path, default=Path("build/bench/cost_curves.json"))
    a = ap.parse_args()
    print(f"file descriptors: soft limit raised to {raise_fd_limit()}; load average {os.getloadavg()}")
    results = []
    for n in [int(x) for x in a.sizes.split(",")]:
        print(f"== {n} devices", flush=True)
        results.append(measure(n, a))
        print(json.dumps(results[-1]), flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1))
    series = {
        op: [(res["devices"], res[op]["cpu_per_device_s"] * 1000) for res in results if res.get(op)] for op in OPS
    }
    series["sweep wall"] = [(res["devices"], res["sweep"]["wall_s"] * 1000) for res in results]
    loglog(a.png, series, "devices", "controller CPU ms per device (sweep wall: ms)")
    print(f"wrote {a.json} and {a.png}")
    emit(table(results))


if __name__ == "__main__":
    main()
