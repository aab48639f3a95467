"""Run every benchmark in ``bench/`` and print one table: figure, target, measured, ratio, OK/MISS.

    .venv/bin/python bench/run.py [--quick] [--only NAME ...] [--log-dir DIR] [--timeout S] [--json PATH] [-v]

Each benchmark runs as a subprocess of this interpreter, with its default arguments (``--quick``:
small sizes, a smoke run of the plumbing whose figures are not the issue's), under a per-benchmark
timeout. Its output goes to ``<log dir>/<name>.log`` (a new temporary directory unless
``--log-dir``; printed first). Benchmarks report through ``_common.emit``: a human row and a
``FIGURE {json}`` line per figure; this runner collects those lines. A benchmark that fails,
times out, reports nothing or is skipped has a row saying so, never no row.

Exit status 0 whatever the figures say (this reports, it does not judge); 130 when interrupted;
anything else means the runner itself broke.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import proc_stats  # bench/ is this script's folder: on sys.path when run

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FIGURE_PREFIX = "FIGURE "  # as bench/_common.py writes them

# After a timeout: SIGINT to the benchmark's process group (Python runs its cleanup: simulators,
# workers, Redis), then SIGTERM, then SIGKILL, these many seconds apart.
STOP_GRACE_S = (30.0, 10.0)


@dataclass(frozen=True)
class Bench:
    name: str
    quick: tuple[str, ...]  # the arguments of a --quick run
    timeout_s: float  # generous: the full size on a loaded 2-core machine
    quick_timeout_s: float = 240.0
    skip_quick: str | None = None  # the reason --quick leaves it out

    @property
    def script(self) -> Path:
        return BENCH / f"{self.name}.py"


BENCHMARKS = [
    Bench("api_submit", ("--duration", "2", "--jobs", "50", "--repeat", "1", "--configs", "sync"), 900),
    Bench("registration", ("--devices", "10"), 900),
    Bench("provision_bench", ("--devices", "5", "--forks", "5", "--rounds", "1"), 1800),
    Bench("health_sweep", ("--devices", "20", "--ansible-devices", "10", "--warm-runs", "2"), 2400),
    Bench("fl_evc", ("--rounds", "5"), 1800),
    Bench("fl_reference", ("--rounds", "5"), 900),
    Bench("fl_vision", ("--rounds", "5"), 600),
    Bench("sim_scale", ("--devices", "20", "--warm-runs", "2"), 2400),
    Bench("job_listing", ("--jobs", "5000", "--requests", "50"), 900),
    Bench("edge_server", ("--requests", "300", "--warmup", "50"), 600),
    Bench(
        "cost_curves",
        (
            "--sizes",
            "10,30",
            "--warm-runs",
            "2",
            "--provision-sample",
            "5",
            "--noop-jobs",
            "20",
            "--list-requests",
            "5",
            "--post-sample",
            "10",
            "--fl-sample",
            "4",
        ),
        3600,
        quick_timeout_s=400,
    ),
]


@dataclass
class Outcome:
    bench: Bench
    status: str = "not run"  # ok | exit N | timeout | failed to start | skipped | interrupted
    note: str = ""
    wall_s: float = 0.0
    log: Path | None = None
    figures: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0  # FIGURE lines that did not parse

    def missed_own_figure(self) -> bool:
        """Exit status 1 after figures of which one missed: some benchmarks judge their figures
        themselves (provision_bench, fl_*). That is their verdict, not a failure."""
        return self.status == "exit 1" and any(not f.get("ok") for f in self.figures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.bench.name, "status": self.status, "note": self.note, "wall_s": round(self.wall_s, 2),
            "log": str(self.log) if self.log else None, "figures": self.figures,
        }  # fmt: skip


# -- processes ----------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process now (Linux /proc)."""
    return {pid: (int(f[1]), f[19]) for pid, f in proc_stats().items()}


def _descendants(pid: int) -> dict[int, str]:
    """The processes *pid* started, transitively (those in their own sessions too): pid -> start time."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, (parent, _) in table.items():
        children.setdefault(parent, []).append(p)
    found, todo = {}, [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found[c] = table[c][1]
                todo.append(c)
    return found


def _alive(pid: int, started: str) -> bool:
    """Whether *pid* is still the process that started at *started* (not a reused id)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return f[19] == started and f[0] != "Z"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a benchmark and whatever it started: SIGINT, SIGTERM, SIGKILL to its process group,
    then SIGKILL to any of its descendants still alive (simulators run in their own sessions)."""
    family = _descendants(proc.pid)
    for sig, grace in zip((signal.SIGINT, signal.SIGTERM), STOP_GRACE_S, strict=True):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # let their own cleanup finish first
    for pid, started in family.items():
        if _alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- running ------------------------------------------------------------------------------------


def _collect(line: str, out: Outcome) -> None:
    if not line.startswith(FIGURE_PREFIX):
        return
    try:
        fig = json.loads(line[len(FIGURE_PREFIX) :])
        if not isinstance(fig, dict) or "name" not in fig:
            raise ValueError(line)
    except ValueError:
        out.bad_lines += 1
        return
    out.figures.append(fig)


def _last_lines(path: Path, n: int = 3, upto: int | None = None) -> str:
    """The last *n* lines of output in *path* (its first *upto* bytes): what a failure said."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(upto if upto is not None else -1).decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]  # [0]: the command line
    lines = [ln for ln in lines if not ln.startswith(FIGURE_PREFIX)]
    return " | ".join(lines[-n:])


def run_one(b: Bench, args: argparse.Namespace, log_dir: Path) -> Outcome:
    """Run one benchmark to its end, its timeout or a Ctrl-C (then the outcome says "interrupted")."""
    out = Outcome(b, log=log_dir / f"{b.name}.log")
    assert out.log is not None
    if args.quick and b.skip_quick:
        out.status, out.note = "skipped", f"--quick: {b.skip_quick}"
        out.log = None
        return out
    cmd = [sys.executable, "-u", str(b.script), *(b.quick if args.quick else ())]
    timeout = args.timeout or (b.quick_timeout_s if args.quick else b.timeout_s)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"== {b.name}: {shlex.join(cmd[1:])}  (timeout {timeout:.0f} s, log {out.log})", flush=True)
    t0 = time.monotonic()
    said: int | None = None  # the log's size when it was stopped: what it said before the signals
    with open(out.log, "wb") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        try:
            # Straight to the file, not a pipe: what the benchmark starts inherits its output and
            # may outlive it; a file never blocks and never needs draining.
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            out.status, out.note = "failed to start", str(e)
            return out
    with open(out.log, "rb") as tail:
        pending = b""

        def follow() -> None:
            nonlocal pending
            pending += tail.read()
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                _collect(line, out)
                if args.verbose:
                    print(f"   | {line}", flush=True)

        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    out.status, out.note = "timeout", f"killed after {timeout:.0f} s"
                    said = out.log.stat().st_size
                    _stop(proc)
                    break
                follow()
                time.sleep(0.5)
        except KeyboardInterrupt:  # the benchmark runs in its own session: stop it here
            out.status, out.note = "interrupted", "stopped by Ctrl-C or SIGTERM"
            print("   interrupted: stopping it…", flush=True)
            said = out.log.stat().st_size
            _stop(proc)
        out.wall_s = time.monotonic() - t0
        follow()
        if pending:
            pending += b"\n"
            follow()
    if out.status == "not run":
        out.status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    if out.missed_own_figure():
        out.note = "its own verdict on the figures it reported"
    elif out.status != "ok" or not out.figures:
        out.note = "; ".join(x for x in (out.note, _last_lines(out.log, upto=said)) if x)
    if out.bad_lines:
        out.note = f"{out.bad_lines} unreadable FIGURE line(s); {out.note}"
    print(f"   {out.status} in {out.wall_s:.1f} s, {len(out.figures)} figure(s)", flush=True)
    return out


# -- the table ----------------------------------------------------------------------------------


def _num(v: Any) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}" if a >= 0.01 else f"{v:.4f}"


def rows(outcomes: list[Outcome]) -> list[list[str]]:
    table = []
    for o in outcomes:
        for f in o.figures:
            measured = f.get("measured")
            result = ("info" if f.get("target") in (None, "", "-") else "OK") if f.get("ok") else "MISS"
            if measured is None:
                result = "MISS (not measured)" if not f.get("ok") else "OK (not measured)"
            shown = f"{_num(measured)} {f.get('unit', '')}".strip() if measured is not None else "-"
            table.append([o.bench.name, str(f.get("name")), str(f.get("target", "-")), shown, _num(f.get("ratio")),
                          result])  # fmt: skip
        if (o.status != "ok" or not o.figures) and not o.missed_own_figure():
            what = {
                "ok": "NO FIGURES", "timeout": "TIMEOUT", "skipped": "SKIPPED", "interrupted": "INTERRUPTED",
                "not run": "NOT RUN",
            }.get(o.status, "FAILED")  # fmt: skip
            label = f"benchmark {o.status}" + (f" ({len(o.figures)} figures before)" if o.figures else "")
            table.append([o.bench.name, f"{label}: {o.note}" if o.note else label, "", "", "", what])
    return table


def print_table(table: list[list[str]]) -> None:
    head = ["benchmark", "figure", "target", "measured", "ratio", "result"]
    cap = [16, 84, 10, 16, 7, 20]  # longer cells are cut (a failure's whole note is printed below)
    width = [min(cap[i], max(len(r[i]) for r in [head, *table])) for i in range(len(head))]

    def line(r: list[str]) -> str:
        cells = []
        for i, c in enumerate(r):
            c = c if len(c) <= width[i] else c[: width[i] - 1] + "…"
            cells.append(c.rjust(width[i]) if i in (3, 4) else c.ljust(width[i]))
        return "  ".join(cells).rstrip()

    print(line(head))
    print("  ".join("-" * w for w in width))
    for r in table:
        print(line(r))


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: stop the running benchmark, print what was measured


def main(argv: list[str] | None = None) -> int:
    names = [b.name for b in BENCHMARKS]
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--only", action="append", choices=names, metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(names)}")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the plumbing")
    p.add_argument("--log-dir", type=Path, help="where the logs go (default: a new temporary directory)")
    p.add_argument("--timeout", type=float, help="seconds per benchmark, instead of each one's own")
    p.add_argument("--json", type=Path, help="also write the outcomes and figures here")
    p.add_argument("-v", "--verbose", action="store_true", help="echo each benchmark's output as it runs")
    args = p.parse_args(argv)
    # Also when started with SIGINT ignored (a background job): then the benchmarks would inherit
    # that, and the SIGINT that lets them clean up after a timeout would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_term)

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="evc-bench-run-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    print(f"{len(chosen)} benchmark(s){' (--quick)' if args.quick else ''}; logs in {log_dir}", flush=True)
    outcomes = [Outcome(b) for b in chosen]
    interrupted = False
    t0 = time.monotonic()
    for i, b in enumerate(chosen):
        try:
            outcomes[i] = run_one(b, args, log_dir)
        except KeyboardInterrupt:  # between two benchmarks
            outcomes[i].status, outcomes[i].note = "interrupted", "stopped by Ctrl-C or SIGTERM"
        if outcomes[i].status == "interrupted":
            interrupted = True
            break

    table = rows(outcomes)
    figs = [f for o in outcomes for f in o.figures]
    print()
    print(f"EVC benchmarks{' (--quick: small sizes, not the issue figures)' if args.quick else ''}, "
          f"{time.monotonic() - t0:.0f} s")  # fmt: skip
    print_table(table)
    print()
    ok = sum(1 for f in figs if f.get("ok"))
    print(f"{len(figs)} figures: {ok} OK, {len(figs) - ok} MISS")
    print("benchmarks:")
    w = max(len(o.bench.name) for o in outcomes)
    for o in outcomes:
        print(f"  {o.bench.name:<{w}}  {o.status:<11} {o.wall_s:6.0f} s  {len(o.figures):2d} figures"
              + (f"  {o.note}" if o.note else ""))  # fmt: skip
    results = json.dumps({"quick": args.quick, "benchmarks": [o.as_dict() for o in outcomes]}, indent=1)
    (log_dir / "results.json").write_text(results)
    if args.json:
        args.json.write_text(results)
    print(f"logs and results.json: {log_dir}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
