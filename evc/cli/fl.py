"""`evc fl`: federated learning jobs of rounds over devices, the FL client, data shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from evc.cli.common import CLUSTER, DEVICE, Ctx, _table, _watch, console, emit, err_console, main, pass_ctx
from evc.client import TERMINAL, APIError, Client


@main.group()
def fl() -> None:
    """Federated learning: jobs of rounds over devices, the FL client, data shards."""


def _targets(devices: tuple[str, ...], cluster: str | None) -> dict[str, Any]:
    if bool(devices) == bool(cluster):
        raise click.UsageError("give --device (repeatable) or --cluster")
    return {"cluster": cluster} if cluster else {"devices": list(devices)}


def _param(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} must be key=value", param_hint="--param")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _fl_rounds(view: dict[str, Any], last: int = 20) -> Table:
    fl_ = view.get("fl") or {}
    t = Table("round", "clients", "failed", "late", "train loss", "accuracy", "eval loss", "time",
              title=f"{view['id']}  [{view['state']}]  round {fl_.get('round', 0)}/{fl_.get('rounds_total')}"
                    f"  ({fl_.get('phase')})")  # fmt: skip
    for r in (fl_.get("rounds") or [])[-last:]:
        num = lambda v, f="{:.4f}": "-" if v is None else f.format(v)  # noqa: E731
        t.add_row(str(r["round"]), f"{r['num_clients']}/{len(r.get('selected') or [])}", str(len(r["failures"])),
                  str(len(r.get("late") or [])), num(r.get("train_loss")), num(r.get("eval_accuracy")),
                  num(r.get("eval_loss")), f"{r['duration_s'] * 1000:.0f} ms")  # fmt: skip
    return t


def _fl_watch(c: Ctx, client: Client, job_id: str, poll: float = 0.5) -> dict[str, Any]:
    """Follow an FL job with a live per-round table until it ends."""
    import time

    from rich.live import Live

    view = client.get(f"/api/v1/fl/jobs/{job_id}")
    if c.as_json:
        while view["state"] not in TERMINAL:
            time.sleep(poll)
            view = client.get(f"/api/v1/fl/jobs/{job_id}")
        return dict(view)
    with Live(_fl_rounds(view), console=console, refresh_per_second=4) as live:
        while view["state"] not in TERMINAL:
            time.sleep(poll)
            view = client.get(f"/api/v1/fl/jobs/{job_id}")
            live.update(_fl_rounds(view))
    colour = {"succeeded": "green", "failed": "red"}.get(view["state"], "yellow")
    why = f": {view['error']['message']}" if view.get("error") else ""
    why = why or (f": {view['summary']['stopped']}" if (view.get("summary") or {}).get("stopped") else "")
    err_console.print(f"[{colour}]{view['state']}[/{colour}]{why}")
    return dict(view)


@fl.command("start")
@click.option(
    "--device", "devices", multiple=True, type=DEVICE, help="device name or id (repeatable; order = client index)"
)
@click.option("--cluster", default=None, type=CLUSTER, help="train on this cluster's members")
@click.option(
    "--data", "data_path", required=True, help="shard path on each device, e.g. ~/.evc/fl/data/digits/shard.npz"
)
@click.option("--rounds", default=10, show_default=True)
@click.option(
    "--model",
    default="softmax",
    show_default=True,
    help="softmax, mlp[:<hidden>], cnn[:<channels>], plugin:<name> or module:<path>.py",
)
@click.option(
    "--strategy", default="fedavg", show_default=True, type=click.Choice(["fedavg", "fedprox", "fedavgm", "fedadam"])
)
@click.option("--param", "params", multiple=True, help="strategy parameter key=value (repeatable), e.g. mu=0.01")
@click.option("--fraction-fit", type=float, default=None)
@click.option("--min-fit-clients", type=int, default=None)
@click.option("--min-available-clients", type=int, default=None)
@click.option("--round-timeout", type=float, default=60.0, show_default=True)
@click.option("--local-epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--python", default=None, help="the Python on the devices (default: the cluster's, else python3)")
@click.option("--test-set", default=None, help="server-side test set to evaluate each round on")
@click.option("--queue", default="fl", show_default=True)
@click.option("--watch/--no-watch", default=True, show_default=True, help="follow the rounds live")
@click.option(
    "--export",
    "export_as",
    default=None,
    metavar="NAME:VERSION",
    help="when it succeeds, register the global model as this model version (ONNX; implies --watch)",
)
@pass_ctx
def fl_start(c: Ctx, devices: tuple[str, ...], cluster: str | None, data_path: str, params: tuple[str, ...],
             watch: bool, export_as: str | None, **opts: Any) -> None:  # fmt: skip
    """Start a federated learning job (`--export digits:2`, then `evc deploy digits:2 ...`)."""
    body = {**_targets(devices, cluster), "data": {"path": data_path}, "strategy_params": _param(params),
            **{k: v for k, v in opts.items() if v is not None}}  # fmt: skip
    if export_as:
        name, version = _model_ref(export_as)
        body["export"] = {"name": name, "version": version}
    client = c.client()
    job = client.post("/api/v1/fl/jobs", json=body)
    if not watch:
        emit(c, job, lambda j: console.print(f"FL job [bold]{j['id']}[/bold] queued"))
        return
    view = _fl_watch(c, client, job["id"])
    summary = view.get("summary") or {}
    if not c.as_json and summary.get("exported"):
        _exported(summary["exported"])
    if not c.as_json and summary.get("export_error"):
        err_console.print(f"export failed: {summary['export_error']}")
    if c.as_json:
        emit(c, view)
    _exit_by_state(view, exported=not export_as or bool(summary.get("exported")))


def _model_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise click.BadParameter(f"{ref!r} must be NAME:VERSION", param_hint="--export")
    return name, version


def _exported(rec: dict[str, Any]) -> None:
    acc = rec.get("accuracy") or {}
    where = f", accuracy {acc['value']:.4f} on {acc['dataset']}" if acc.get("value") is not None else ""
    console.print(
        f"registered model [bold]{rec['name']}:{rec['version']}[/bold] (ONNX{where}; sha256 {rec['sha256'][:12]})"
    )


@fl.command("export")
@click.argument("job_id")
@click.option("--model", "name", required=True, help="the model's name in the registry")
@click.option("--version", required=True, help="the version to register")
@click.option("--round", "rnd", type=int, default=None, help="default: the last round")
@pass_ctx
def fl_export(c: Ctx, job_id: str, name: str, version: str, rnd: int | None) -> None:
    """Register a finished job's global model in the model registry as ONNX (softmax, mlp,
    cnn), with its accuracy on the job's test set; `evc deploy NAME:VERSION` then serves it."""
    body: dict[str, Any] = {"name": name, "version": version}
    if rnd is not None:
        body["round"] = rnd
    emit(c, c.client().post(f"/api/v1/fl/jobs/{job_id}/export", json=body), _exported)


def _exit_by_state(job: dict[str, Any], exported: bool = True) -> None:
    """Exit 0 when the job succeeded (and exported its model when asked to), 1 otherwise
    (failed, partial, cancelled, not exported)."""
    sys.exit(0 if job["state"] == "succeeded" and exported else 1)


@fl.command("show")
@click.argument("job_id")
@pass_ctx
def fl_show(c: Ctx, job_id: str) -> None:
    """An FL job and its per-round metrics."""
    emit(c, c.client().get(f"/api/v1/fl/jobs/{job_id}"), lambda v: console.print(_fl_rounds(v, last=10_000)))


@fl.command("watch")
@click.argument("job_id")
@pass_ctx
def fl_watch(c: Ctx, job_id: str) -> None:
    """Follow an FL job's rounds live (exit 1 unless it succeeds)."""
    view = _fl_watch(c, c.client(), job_id)
    if c.as_json:
        emit(c, view)
    _exit_by_state(view)


@fl.command("list")
@click.option("--limit", default=50, show_default=True)
@pass_ctx
def fl_list(c: Ctx, limit: int) -> None:
    """FL jobs, newest first."""
    data = c.client().get("/api/v1/fl/jobs", limit=limit)
    emit(c, data, lambda d: _table(d["items"], ["id", "state", "progress", "created_at"]))


@fl.command("stop")
@click.argument("job_id")
@pass_ctx
def fl_stop(c: Ctx, job_id: str) -> None:
    """Stop a job at its next round boundary."""
    emit(c, c.client().post(f"/api/v1/fl/jobs/{job_id}/stop"), lambda j: console.print(f"{j['id']}: stop requested"))


@fl.command("resume")
@click.argument("job_id")
@click.option("--watch/--no-watch", default=True, show_default=True)
@pass_ctx
def fl_resume(c: Ctx, job_id: str, watch: bool) -> None:
    """Resume a stopped or failed job from its last checkpoint."""
    client = c.client()
    job = client.post(f"/api/v1/fl/jobs/{job_id}/resume")
    if watch:
        job = _fl_watch(c, client, job_id)
    emit(c, job, lambda j: None)
    if watch:
        _exit_by_state(job)


@fl.command("model")
@click.argument("job_id")
@click.option("--round", "rnd", type=int, default=None, help="default: the latest")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="default: <job>-round-<N>.npz")
@pass_ctx
def fl_model(c: Ctx, job_id: str, rnd: int | None, output: Path | None) -> None:
    """Download the global model of a round (.npz: arr_0, arr_1, ... in parameter order)."""
    client = c.client()
    resp = client.session.get(f"{client.url}/api/v1/fl/jobs/{job_id}/model",
                              params={"round": rnd} if rnd is not None else None, timeout=client.timeout)  # fmt: skip
    if resp.status_code >= 400:
        raise APIError(resp.status_code, f"{resp.status_code} {resp.json().get('message', resp.reason)}")
    path = output or Path(f"{job_id}-round-{resp.headers.get('X-EVC-Round', rnd)}.npz")
    path.write_bytes(resp.content)
    console.print(f"wrote {path} (round {resp.headers.get('X-EVC-Round')}, {len(resp.content)} bytes)")


@fl.command("install")
@click.option("--device", "devices", multiple=True, type=DEVICE)
@click.option("--cluster", default=None, type=CLUSTER)
@click.option("--python", default=None, help="the Python on the devices, with numpy (default: the cluster's)")
@pass_ctx
def fl_install(c: Ctx, devices: tuple[str, ...], cluster: str | None, python: str | None) -> None:
    """Ship the FL client to devices (~/.evc/fl/client.py) and check their Python."""
    client = c.client()
    body = {**_targets(devices, cluster), **({"python": python} if python else {})}
    job = client.post("/api/v1/fl/install", json=body)
    job = _watch(c, client, job["id"])
    emit(c, client.get(f"/api/v1/jobs/{job['id']}"), _fl_results)
    _exit_by_state(job)


@fl.command("partition")
@click.option("--device", "devices", multiple=True, type=DEVICE, help="device (repeatable): device k gets shard k")
@click.option("--cluster", default=None, type=CLUSTER)
@click.option("--name", default="digits", show_default=True, help="dataset name (shard directory, test set)")
@click.option("--partition", "how", default="iid", show_default=True, type=click.Choice(["iid", "dirichlet"]))
@click.option("--alpha", default=0.5, show_default=True, help="Dirichlet concentration")
@click.option("--seed", default=42, show_default=True)
@click.option(
    "--path", default=None, help="shard path template on the devices (default ~/.evc/fl/data/{dataset}/shard.npz)"
)
@pass_ctx
def fl_partition(c: Ctx, devices: tuple[str, ...], cluster: str | None, name: str, how: str, alpha: float,
                 seed: int, path: str | None) -> None:  # fmt: skip
    """Split the digits dataset into per-device shards and push them over SFTP."""
    client = c.client()
    body = {**_targets(devices, cluster), "name": name, "partition": how, "alpha": alpha, "seed": seed}
    if path:
        body["path"] = path
    job = _watch(c, client, client.post("/api/v1/fl/partition", json=body)["id"])
    if job["state"] != "succeeded":
        emit(c, client.get(f"/api/v1/jobs/{job['id']}"), _fl_results)
        _exit_by_state(job)
    emit(c, job, lambda j: console.print(f"data path for `evc fl start --data`: {j['summary'].get('data_path')}"
                                         f"  test set: {j['summary'].get('test_set')}"))  # fmt: skip


def _fl_results(job: dict[str, Any]) -> None:
    """Per-device outcome of an install or partition job: ok, or the reason."""
    rows = [{"device": t, "ok": r.get("ok"), "why": (r.get("error") or {}).get("message", "")}
            for t, r in (job.get("results") or {}).items()]  # fmt: skip
    if rows:
        _table(rows, ["device", "ok", "why"])
