"""`evc infer`: inference jobs over a deployment's devices (run, show, results)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from evc.cli.common import Ctx, _table, _watch, console, emit, main, pass_ctx
from evc.client import APIError

UPLOAD_TIMEOUT_S = 600.0


@main.group()
def infer() -> None:
    """Inference across a cluster: a data set spread over a deployment's devices."""


def _summary(job: dict[str, Any]) -> None:
    s = job.get("summary") or {}
    console.print(f"{job['kind']} job {job['id']} {job['state']}")
    if not s.get("items"):
        return
    acc = f", accuracy {s['accuracy']:.4f}" if "accuracy" in s else ""
    console.print(
        f"{s['items']} items in {s['makespan_s']} s ({s['items_per_s']} items/s, {s['mode']}){acc}; "
        f"re-issued {s.get('reissued', 0)}, duplicates dropped {s.get('duplicates_dropped', 0)}, "
        f"re-queued {s.get('requeued', 0)}"
    )
    rows = [
        {"device": name, "items": d["items"], "share": f"{d['share']:.1%}", "rate": d.get("mean_rate") or "",
         "chunks": d["chunks"], "failures": d["failures"], "dropped": "yes" if d["dropped"] else ""}
        for name, d in (s.get("devices") or {}).items()
    ]  # fmt: skip
    _table(rows, ["device", "items", "share", "rate", "chunks", "failures", "dropped"])
    console.print(f"results: evc infer results {job['id']} [--format npz -o FILE]")


def _upload(c: Ctx, data: Path) -> str:
    with open(data, "rb") as f:
        body = c.client().request(
            "POST", "/api/v1/inference/datasets", files={"file": (data.name, f, "application/octet-stream")},
            data={"name": data.name}, timeout=UPLOAD_TIMEOUT_S,
        )  # fmt: skip
    return str(body["id"])


@infer.command("run")
@click.option("--deployment", required=True, help="the deployment whose running devices do the work")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=".npz with x (items) and optional y (labels), uploaded first")  # fmt: skip
@click.option("--dataset", default=None, help="an uploaded data set's id, or a named one (digits, digits-train)")
@click.option("--repeat", type=int, default=1, help="the data set this many times over")
@click.option("--mode", type=click.Choice(["dynamic", "static"]), default="dynamic",
              help="dynamic (devices pull chunks sized to their speed) or static (an even split)")  # fmt: skip
@click.option("--target-s", type=float, default=None, help="how long a chunk should take on its device")
@click.option("--max-items", type=int, default=None, help="the largest chunk")
@click.option("--wait", is_flag=True, help="follow the job's progress and show its summary")
@pass_ctx
def run(
    c: Ctx, deployment: str, data: Path | None, dataset: str | None, repeat: int, mode: str, target_s: float | None,
    max_items: int | None, wait: bool,
) -> None:  # fmt: skip
    """Run every item of a data set through a deployment's devices (kind parallel)."""
    if bool(data) == bool(dataset):
        raise click.UsageError("give --data FILE.npz or --dataset ID|NAME")
    ds = _upload(c, data) if data else str(dataset)
    chunk = {k: v for k, v in {"target_s": target_s, "max_items": max_items}.items() if v is not None}
    body = {"kind": "parallel", "deployment": deployment, "dataset": ds, "repeat": repeat, "mode": mode,
            "chunk": chunk}  # fmt: skip
    client = c.client()
    job = client.post("/api/v1/inference/jobs", body)
    if not wait:
        emit(c, job, lambda j: console.print(f"{j['kind']} job {j['id']} {j['state']} ({j['params']['items']} items)"))
        return
    job = _watch(c, client, job["id"])
    emit(c, job, _summary)
    sys.exit(0 if job["state"] == "succeeded" else 1)


@infer.command("show")
@click.argument("job_id")
@pass_ctx
def show(c: Ctx, job_id: str) -> None:
    """An inference job: state, throughput, each device's share."""
    emit(c, c.client().get(f"/api/v1/inference/jobs/{job_id}"), _summary)


@infer.command("results")
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npz"]), default="jsonl")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write to this file (default: stdout; npz needs a file)")  # fmt: skip
@pass_ctx
def results(c: Ctx, job_id: str, fmt: str, output: Path | None) -> None:
    """A finished job's results in input order (JSON lines: item, prediction, score, device, latency_ms)."""
    if fmt == "npz" and output is None:
        raise click.UsageError("--format npz needs -o FILE")
    client = c.client()
    resp = client.session.get(f"{client.url}/api/v1/inference/jobs/{job_id}/results", params={"format": fmt},
                              stream=True, timeout=client.timeout)  # fmt: skip
    if resp.status_code >= 400:
        try:
            message = resp.json().get("message") or resp.reason
        except ValueError:
            message = resp.text[:300]
        raise APIError(resp.status_code, f"{resp.status_code} {message}")
    if output is None:
        for block in resp.iter_content(1 << 16):
            sys.stdout.buffer.write(block)
        return
    with open(output, "wb") as f:
        for block in resp.iter_content(1 << 16):
            f.write(block)
    console.print(f"wrote {output}")
