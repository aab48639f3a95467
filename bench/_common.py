"""Helpers shared by the benchmarks: a private Redis, settings, the figure table."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evc.embedded import RedisServer
from evc.settings import Settings, load_settings

FIGURE_PREFIX = "FIGURE "


@dataclass
class Figure:
    """One figure a benchmark reports.

    *target* is the issue's target as text (``"<= 2.5 s"``, ``">= 50x"``), ``"-"`` for a figure
    printed for information (then *ok* is True). *ratio* compares *measured* with the figure's
    reference point: the issue's baseline where the benchmark names one, else the target.
    """

    name: str
    target: str
    measured: float
    unit: str
    ok: bool
    ratio: float | None = None

    def row(self) -> str:
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else "-"
        mark = "OK " if self.ok else "MISS"
        return (
            f"{mark} {self.name:<48} target {self.target:<14} measured {self.measured:>10.2f} {self.unit:<8} "
            f"ratio {ratio}"
        )

    def to_json(self) -> str:
        """One line of JSON; a measurement that is not a finite number (nothing measured) is null."""

        def num(v: float | None) -> float | None:
            return float(v) if v is not None and math.isfinite(v) else None

        return json.dumps(
            {
                "name": self.name,
                "target": self.target,
                "measured": num(self.measured),
                "unit": self.unit,
                "ok": bool(self.ok),
                "ratio": num(self.ratio),
            }
        )


def private_stack(tmp: Path | None = None) -> tuple[RedisServer, Settings]:
    tmp = tmp or Path(tempfile.mkdtemp(prefix="evc-bench-"))
    srv = RedisServer(tmp / "redis").start()
    settings = load_settings(env={}, redis_url=srv.url, data_dir=tmp / "data", key_prefix="bench")
    return srv, settings


def stamp(value: float | None, what: str) -> float:
    """A time stamp a finished job has set (``started_at``, ``finished_at``); a benchmark whose
    job lacks it stops there."""
    if value is None:
        raise SystemExit(f"the job has no {what}")
    return value


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_figures(figures: list[Figure]) -> None:
    for f in figures:
        print(f.row())


def emit(figures: list[Figure]) -> None:
    """The human rows (as :func:`print_figures`), then one ``FIGURE {json}`` line per figure, the
    lines ``bench/run.py`` collects."""
    print_figures(figures)
    for f in figures:
        print(FIGURE_PREFIX + f.to_json())
    sys.stdout.flush()


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start *argv* in a session of its own, its output appended to *log*."""
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group :func:`spawn` started; SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class API:
    """EVC's API in process (Flask's test client) with an admin token of its own."""

    def __init__(self, settings: Settings, store: Any) -> None:
        from evc.api.app import create_app

        from evc.auth import create_operator_token
        from evc.context import Context

        self.client = create_app(settings).test_client()
        _, self.token = create_operator_token(Context(store, settings), "bench", ["admin"])

    def call(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.client.open(path, method=method, headers={"Authorization": f"Bearer {self.token}"}, **kw)
        body = resp.get_json(silent=True)
        if resp.status_code >= 400:
            raise SystemExit(f"{method} {path}: {resp.status_code} {body}")
        return body

    def wait(self, job_id: str, timeout: float = 900.0, *, succeed: bool = False) -> dict[str, Any]:
        """The job once it ended; with *succeed*, anything but ``succeeded`` stops the benchmark."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.call("GET", f"/api/v1/jobs/{job_id}")
            if job["state"] in ("succeeded", "partial", "failed", "cancelled"):
                if succeed and job["state"] != "succeeded":
                    raise SystemExit(f"job {job_id} {job['state']}: {json.dumps(job, indent=1)[:3000]}")
                return dict(job)
            time.sleep(0.05)
        raise SystemExit(f"job {job_id} did not finish in {timeout} s")


def proc_stats() -> dict[int, list[str]]:
    """pid -> the fields of ``/proc/<pid>/stat`` after the command name (field 3 on: state, ppid,
    ...), for every process now (Linux /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                table[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    return table


def tree_cpu(pid: int) -> float:
    """CPU seconds of *pid*, its reaped children and its live descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {p: (int(f[1]), sum(int(x) for x in f[11:15]) / tick) for p, f in proc_stats().items()}
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in table:
            total += table[p][1]
            todo += [c for c, (parent, _) in table.items() if parent == p]
    return total


def registered(store: Any, devices: list[Any], id_prefix: str | None = None, privilege: str | None = None) -> list[str]:
    """Online device records for simulated *devices*, as a successful registration leaves them
    (host keys pinned: what a sweep reads); ids ``<id_prefix><index>``, or new ids; with
    *privilege*, that privilege at level 0."""
    from evc.store import new_id

    ids = []
    for i, d in enumerate(devices):
        dev_id = f"{id_prefix}{i:05d}" if id_prefix else new_id("dev")
        rec = {
            "id": dev_id, "name": d.name, "host": d.host, "port": d.port, "username": d.username,
            "host_key": d.host_key_public, "state": "online", "health": None, "last_seen": None,
            "cluster_id": None, "labels": {}, "created_at": time.time(),
            **({"privilege": privilege, "level": 0} if privilege else {}),
        }  # fmt: skip
        store.create_device(rec, token_hash=f"h-{dev_id}")
        ids.append(dev_id)
    return ids


def wait_for_sim(proc: subprocess.Popen[bytes], state: Path, log: Path, timeout: float = 60.0) -> list[Any]:
    """The devices a simulator process lists in *state* once it serves them (SystemExit with the
    end of its *log* when it dies or takes longer than *timeout*)."""
    from evc_sim import read_state

    deadline = time.monotonic() + timeout
    while not state.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the simulator did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return list(read_state(state))


def stop_edge_servers(devices: list[Any]) -> None:
    """Stop every edge server a deployment left on simulated *devices* (their supervisors)."""
    for d in devices:
        for script in (Path(d.home) / ".evc" / "deploy").glob("*/supervise.sh"):
            subprocess.run(["sh", str(script), "stop"], check=False, timeout=30)
