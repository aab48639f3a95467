"""Cost curves: what registration, a warm health sweep, a provisioning run, an FL round, a no-op
job and a filtered job listing cost at 100, 1,000 and 5,000 simulated devices (issue 18 item 2).

    .venv/bin/python bench/cost_curves.py [--sizes 100,1000,5000] [--provision-sample 20]
        [--post-sample 100] [--fl-sample 20] [--png build/bench/cost_curves.png] [--json PATH]

Per size: a private Redis, the devices spread over ``--sim-procs`` simulator processes (default
4: one process serving every device was one thread doing every device's side of every SSH
handshake, the first thing to starve on a shared machine, where real devices are machines of
their own), one Celery worker (-c 4, queues ssh, ansible and default) and the API in this
process (Flask's test client); for the FL row only, the ``fl`` queue's worker. Then:

* registration, two ways. ``register_post``: ``--post-sample`` more devices (default 100)
  through one ``POST /api/v1/devices`` each (one job each), until every job has succeeded; they
  are removed afterwards, so the fleet keeps its size. ``register``: the whole fleet as one
  ``POST /api/v1/devices/import`` (one job probing the devices concurrently on one event loop,
  each device's outcome its result), the way a fleet is onboarded; the 30 s target is its;
* warm health sweep: ``evc.health.sweep`` exactly as the beat task runs it, after one cold sweep
  (median of ``--warm-runs``);
* provisioning: a small playbook (``bench/provision_bench.py``'s three tasks) as one job over a
  *sample* of ``--provision-sample`` devices (default 20), at every size: the sample is said in
  the row, never hidden; the fleet's size changes what the job reads, not how many it runs;
* FL round: one FedAvg round (a one-round FL job) over ``--fl-sample`` more devices (default
  20; a second simulator, of ``root`` devices, since the FL client runs with this Python,
  which the fleet's ``user`` accounts may not execute): each runs EVC's real FL client and
  trains for real (softmax on the digits, one local epoch). Their registration, the client
  install and the data push are not in the row. The sample is said in the row;
* no-op jobs: ``--noop-jobs`` (default 200) submitted and finished: Redis memory per finished job;
* filtered listing: ``GET /api/v1/jobs?kind=register&state=succeeded&limit=50`` (median of 50).

Controller CPU is this process (API, sweep) plus the workers' process trees; the simulator's
(the devices' side) is printed apart, never counted as the controller's. Redis memory is
``used_memory`` deltas: per device from the import (devices + the import job's per-device
results) and from the POST sample (a device + its own registration job).

Targets: per-device warm-sweep cost (CPU) from 1,000 to 5,000 devices grows <= 1.2x;
registration of 1,000 devices <= 30 s. A table, a JSON file and a log-log PNG (bench/_plot.py).
Exit status 0 whatever the figures say.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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

    def __init__(self, workers: list[int], sims: list[int], r: redis.Redis) -> None:
        self.workers, self.sims, self.r = workers, sims, r

    def ctl(self) -> float:
        return own_cpu() + sum(tree_cpu(w) for w in self.workers)

    def sim(self) -> float:
        return sum(tree_cpu(s) for s in self.sims)

    def mem(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    def __enter__(self) -> Meter:
        self.t, self.c, self.s, self.m = (
            time.perf_counter(),
            self.ctl(),
            self.sim(),
            self.mem(),
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t
        self.cpu = self.ctl() - self.c
        self.sim_cpu = self.sim() - self.s
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


def start_sims(
    tmp: Path,
    n: int,
    procs: int,
    settings: Settings,
    env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
    privileges: str = "user",
    prefix: str = "cc",
) -> tuple[list[int], list[Any]]:
    """*n* devices over *procs* simulator processes (started together): (their pids, the devices)."""
    sims = []
    for i in range(procs):
        count = n // procs + (i < n % procs)
        state, log = tmp / f"devices-{prefix}{i}.json", tmp / f"sim-{prefix}{i}.log"
        sims.append((spawn([sys.executable, "-m", "evc_sim", "--devices", str(count), "--root",
                            str(tmp / f"sim-{prefix}{i}"), "--state-file", str(state), "--authorized-keys",
                            str(settings.key_path.with_suffix(".pub")), "--privileges", privileges,
                            "--prefix", f"{prefix}{i}"], env, log), state, log))  # fmt: skip
        started.append(sims[-1][0])
    devices = [d for proc, state, log in sims for d in wait_for_sim(proc, state, log, timeout=900)]
    return [proc.pid for proc, _, _ in sims], devices


WORKER = [sys.executable, "-m", "celery", "-A", "evc.workers.app", "worker", "-l", "WARNING", "--without-mingle",
          "--without-gossip"]  # fmt: skip


def wait_workers(settings: Settings, count: int) -> None:
    from evc.workers.celery_app import make_celery

    while len(make_celery(settings, include_tasks=False).control.ping(timeout=0.5)) < count:
        time.sleep(0.2)


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
        k = min(a.post_sample, n) + WARM if a.post_sample else 0
        sims, devices = start_sims(tmp, n + k, a.sim_procs, settings, env, started)
        worker = spawn([*WORKER, "-Q", "ssh,ansible,default", "-c", str(a.concurrency), "-n", f"cc{n}@localhost"],
                       env, tmp / "worker.log")  # fmt: skip
        started.append(worker)
        api = API(settings, store)
        wait_workers(settings, 1)
        meter = functools.partial(Meter, [worker.pid], sims, r)
        register(api, store, meter, devices[:k], devices[k:], a, rows)
        sweep(store, settings, meter, a, rows)
        jobs_and_listing(api, store, meter, a, rows)  # before the FL row, whose clean-up frees memory
        rows["provision"] = provision(api, store, meter, a)
        if a.fl_sample:  # the fl queue's worker (threads, as `evc up` runs it) only now: its idle CPU stays out
            fl_sims, fl_devs = start_sims(tmp, a.fl_sample, 1, settings, env, started, "root", "fl")
            started.append(spawn([*WORKER, "-Q", "fl", "-P", "threads", "-c", "20", "-n", f"ccfl{n}@localhost"], env,
                                 tmp / "worker-fl.log"))  # fmt: skip
            wait_workers(settings, 2)
            rows["fl"] = fl_round(api, store, functools.partial(Meter, [worker.pid, started[-1].pid], fl_sims, r),
                                  fl_devs, a)  # fmt: skip
            stop(started.pop())
            stop(started.pop())  # the FL devices' simulator
        rows["redis_used_memory_B"] = int(r.info("memory")["used_memory"])
    finally:
        pooling.shutdown()
        for proc in reversed(started):
            stop(proc)
        srv.stop()
    return rows


#: devices registered one POST each before the POST sample, unmeasured: every worker process
#: imports the SSH and registration modules once (in a sample of 100 that was ~10 ms a device)
WARM = 8


def post_register(api: API, store: Store, devices: list[Any], a: argparse.Namespace) -> list[dict[str, Any]]:
    """Register *devices* with one ``POST /api/v1/devices`` each; their finished jobs."""
    ids = [api.call("POST", "/api/v1/devices", json={"name": d.name, "host": d.host, "port": d.port,
                                                      "username": d.username})["job"]["id"]
           for d in devices]  # fmt: skip
    return wait_jobs(store, ids, a.timeout)


def register(
    api: API,
    store: Store,
    meter: Callable[[], Meter],
    extra: list[Any],
    fleet: list[Any],
    a: argparse.Namespace,
    rows: dict[str, Any],
) -> None:
    """Registration both ways: ``register_post``, a sample of devices (*extra*, after ``WARM``
    of them) through one ``POST /api/v1/devices`` each (one job each; removed afterwards, so the
    fleet is *fleet*), then ``register``: the whole fleet as one ``POST /api/v1/devices/import``
    (one job, the devices probed concurrently on one event loop), the way a fleet is onboarded."""
    if len(extra) > WARM:
        warm = post_register(api, store, extra[:WARM], a)
        with meter() as m:
            done = post_register(api, store, extra[WARM:], a)
        k, ok = len(done), sum(j["state"] == "succeeded" for j in done)
        rows["register_post"] = _row(m, k, f"sample of {k} devices, one POST (one job) each, {ok} succeeded")
        rows["mem_per_device_post_B"] = m.dmem / k  # a device + its registration job
        for j in warm + done:
            api.call("DELETE", f"/api/v1/devices/{j['targets'][0]}")
    csv = "name,host,port,user\n" + "".join(f"{d.name},{d.host},{d.port},{d.username}\n" for d in fleet)
    with meter() as m:
        job = api.call("POST", "/api/v1/devices/import", json={"content": csv, "format": "csv"})["job"]
        imported = wait_jobs(store, [job["id"]], a.timeout)[0]
    res = imported.get("summary") or {}
    rows["register"] = _row(m, len(fleet), f"fleet import (one job), {imported['state']}, {res.get('ok', 0)} ok")
    rows["mem_per_device_B"] = m.dmem / len(fleet)  # devices + the import job's per-device results


def sweep(
    store: Store, settings: Settings, meter: Callable[[], Meter], a: argparse.Namespace, rows: dict[str, Any]
) -> None:
    """A warm health sweep exactly as the beat task runs it (median of ``--warm-runs`` by CPU)."""
    health.sweep(store, settings)  # cold: opens the pool's connections
    runs = []
    for _ in range(a.warm_runs):
        with meter() as m:
            res = health.sweep(store, settings)
        runs.append((m, len(res.failures)))
    m, failed = sorted(runs, key=lambda x: x[0].cpu)[len(runs) // 2]
    rows["sweep"] = _row(m, rows["devices"], f"median of {a.warm_runs}; {failed} failed")


def jobs_and_listing(
    api: API, store: Store, meter: Callable[[], Meter], a: argparse.Namespace, rows: dict[str, Any]
) -> None:
    """No-op jobs (Redis memory per finished job) and the filtered job listing."""
    with meter() as m:
        noop = [api.call("POST", "/api/v1/jobs", json={"kind": "noop"})["id"] for _ in range(a.noop_jobs)]
        wait_jobs(store, noop, a.timeout)
    rows["mem_per_job_B"] = m.dmem / a.noop_jobs
    rows["noop"] = _row(m, a.noop_jobs, f"{a.noop_jobs} no-op jobs (per job)")
    q = "/api/v1/jobs?kind=register&state=succeeded&limit=50"
    times = []
    with meter() as m:
        for _ in range(a.list_requests):
            t = time.perf_counter()
            api.call("GET", q)
            times.append(time.perf_counter() - t)
    n = rows["devices"]
    note = f"median of {a.list_requests} requests (kind=register: the POST sample's jobs)"
    rows["listing"] = {
        "wall_s": statistics.median(times),
        "cpu_per_device_s": m.cpu / a.list_requests / n,
        "note": note,
    }


def _row(m: Meter, per: int, note: str) -> dict[str, Any]:
    return {"wall_s": m.wall, "cpu_per_device_s": m.cpu / per, "sim_cpu_s": m.sim_cpu, "note": note}


def provision(api: API, store: Store, meter: Callable[[], Meter], a: argparse.Namespace) -> dict[str, Any]:
    """One provisioning job (``--playbook``) over a sample of the fleet."""
    devs = api.call("GET", f"/api/v1/devices?limit={a.provision_sample}")["items"][: a.provision_sample]
    with meter() as m:
        job = api.call("POST", "/api/v1/provision", json={"playbook": a.playbook, "targets": [d["id"] for d in devs]})
        done = wait_jobs(store, [job["id"]], a.timeout)[0]
    return _row(m, len(devs), f"sample of {len(devs)} devices, {done['state']}")


def fl_round(
    api: API, store: Store, meter: Callable[[], Meter], sims: list[Any], a: argparse.Namespace
) -> dict[str, Any]:
    """One FL round (a FedAvg job of one round) through EVC's orchestration over ``--fl-sample``
    more devices of the same controller (a simulator of ``root`` devices: the FL client runs with
    this Python, which the fleet's ``user`` accounts may not execute); every one of them runs the
    real FL client and trains for real (softmax on the digits, one local epoch). Their
    registration, the client install and the data push come first and are not in the row."""
    csv = "name,host,port,user\n" + "".join(f"{d.name},{d.host},{d.port},{d.username}\n" for d in sims)
    job = api.call("POST", "/api/v1/devices/import", json={"content": csv, "format": "csv"})
    api.wait(job["job"]["id"], a.timeout, succeed=True)
    ids = [d["device_id"] for d in job["devices"]]
    api.wait(api.call("POST", "/api/v1/fl/install", json={"devices": ids, "python": sys.executable})["id"], a.timeout,
             succeed=True)  # fmt: skip
    api.wait(api.call("POST", "/api/v1/fl/partition", json={"devices": ids, "name": "cc", "partition": "iid",
                                                            "seed": 42})["id"], a.timeout, succeed=True)  # fmt: skip
    with meter() as m:
        job = api.call("POST", "/api/v1/fl/jobs", json={
            "devices": ids, "data": {"path": "~/.evc/fl/data/cc/shard.npz"}, "rounds": 1, "strategy": "fedavg",
            "seed": 42, "lr": 0.1, "batch_size": 32, "local_epochs": 1, "python": sys.executable, "test_set": "cc",
            "round_timeout": 120,
        })  # fmt: skip
        done = api.wait(job["id"], a.timeout)
    return _row(m, len(ids), f"sample of {len(ids)} devices train, 1 round, {done['state']}")


OPS = ("register", "register_post", "sweep", "provision", "fl", "noop", "listing")


def table(results: list[dict[str, Any]]) -> list[Figure]:
    print(f"{'operation':<13} {'devices':>8} {'wall s':>9} {'ctl CPU ms/dev':>15} {'sim CPU s':>10}  note")
    for res in results:
        for op in OPS:
            row = res.get(op)
            if row:
                print(f"{op:<13} {res['devices']:>8} {row['wall_s']:>9.3f} {row['cpu_per_device_s'] * 1000:>15.3f} "
                      f"{row.get('sim_cpu_s', float('nan')):>10.2f}  {row['note']}")  # fmt: skip
    print(f"{'devices':>8} {'Redis B/device':>15} {'B/device (POST)':>16} {'Redis B/finished job':>21} {'load avg':>9}")
    for res in results:
        post = res.get("mem_per_device_post_B", float("nan"))
        print(f"{res['devices']:>8} {res['mem_per_device_B']:>15.0f} {post:>16.0f} {res['mem_per_job_B']:>21.0f} "
              f"{res['load']:>9.1f}")  # fmt: skip
    figs: list[Figure] = []
    by_n = {res["devices"]: res for res in results}
    if 1000 in by_n:
        w = by_n[1000]["register"]["wall_s"]
        figs.append(Figure("register 1,000 devices (fleet import)", "<= 30 s", w, "s", w <= 30, w / 30))
    if 1000 in by_n and 5000 in by_n:
        g = by_n[5000]["sweep"]["cpu_per_device_s"] / by_n[1000]["sweep"]["cpu_per_device_s"]
        figs.append(Figure("warm sweep CPU/device growth 1,000->5,000", "<= 1.2x", g, "x", g <= 1.2, g / 1.2))
    for res in results:
        for op in OPS:
            row, n = res.get(op), res["devices"]
            if row and op != "listing":
                per = "job" if op == "noop" else "device"
                said = f"; {row['note'].split(',')[0]}" if op in ("provision", "fl", "register_post") else ""
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
    ap.add_argument("--sim-procs", type=int, default=4, help="simulator processes the fleet is spread over")
    ap.add_argument("--post-sample", type=int, default=100, help="devices registered with one POST each (extra)")
    ap.add_argument("--fl-sample", type=int, default=20, help="devices that train in the FL round (0: no FL row)")
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
