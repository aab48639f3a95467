"""`evc infer joint|split`: collaborative inference — joint (cascade) edge → cloud, and split computing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from evc.cli.common import DEVICE, Ctx, _table, _watch, console, emit, pass_ctx
from evc.cli.infer import infer


def _dataset(c: Ctx, file: Path) -> str:
    """Upload a labelled .npz (X, y) once; its digest."""
    with open(file, "rb") as f:
        data = c.client().request(
            "POST", "/api/v1/eval-sets", files={"file": (file.name, f, "application/octet-stream")}
        )
    return str(data["sha256"])


def _run(c: Ctx, path: str, body: dict[str, Any], show: Any) -> None:
    client = c.client()
    job = client.post(path, {k: v for k, v in body.items() if v is not None})
    job = _watch(c, client, job["id"])
    emit(c, job, lambda j: show(j.get("summary") or {}) if j["state"] == "succeeded" else console.print(
        f"{j['kind']} job {j['id']} {j['state']}: {(j.get('error') or {}).get('message', '')}"))  # fmt: skip
    sys.exit(0 if job["state"] == "succeeded" else 1)


def _show_joint(s: dict[str, Any]) -> None:
    t = s.get("threshold")
    console.print(f"{s['items']} items, {s['score']} < {t if t is None else round(t, 4)} (batch {s['batch']})")
    rows = [
        {"route": r, "accuracy": f"{s[r]['accuracy']:.4f}", "offload": f"{s[r]['offload']:.3f}",
         "bytes sent": f"{s[r]['bytes_sent']:,}", "p50 ms": s[r]["latency_ms"]["p50"]}
        for r in ("edge_only", "joint", "cloud_only")
    ]  # fmt: skip
    _table(rows, ["route", "accuracy", "offload", "bytes sent", "p50 ms"])


def _show_split(s: dict[str, Any]) -> None:
    link = s["link"]
    console.print(
        f"link {link['bandwidth_mbit']} Mbit/s, fixed cost {link['rtt_ms']} ms; picked {s['chosen']}: {s['why']}"
    )
    cols = ["cut", "tensor", "bytes_per_item", "device_ms", "link_ms", "cloud_ms", "predicted_ms"]
    _table(s["candidates"], cols + (["measured_ms"] if "best_measured" in s else []))
    if "run" in s:
        console.print(
            f"run: {s['run']['items']} items, accuracy {s['run']['accuracy']}, p50 {s['run']['latency_ms']['p50']} ms"
        )


_edge = [
    click.option("--deployment", required=True, help="a running deployment (the edge tier)"),
    click.option("--device", default=None, type=DEVICE, help="its device to use (default: the first running)"),
    click.option("--endpoint", default=None, help="host:port to reach the edge server through (default its own)"),
    click.option("--batch", type=int, default=None, help="items per request"),
]


def _edge_options(f: Any) -> Any:
    for opt in reversed(_edge):
        f = opt(f)
    return f


@infer.command("joint")
@_edge_options
@click.option(
    "--cloud", "cloud", default=None, metavar="NAME:VERSION", help="the cloud tier's model (the worker runs it)"
)
@click.option("--cloud-deployment", default=None, help="or: the cloud tier is this running deployment (a device)")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help=".npz X, y")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="labelled .npz")
@click.option("--score", default="max-prob", type=click.Choice(["entropy", "margin", "max-prob"]))
@click.option("--threshold", type=float, default=None, help="offload items whose score is below it")
@click.option("--target-accuracy", type=float, default=None, help="tune the threshold for this accuracy")
@click.option("--target-offload", type=float, default=None, help="tune the threshold for at most this offload")
@pass_ctx
def joint(c: Ctx, deployment: str, device: str | None, endpoint: str | None, batch: int | None, cloud: str | None,
          cloud_deployment: str | None, data: Path, calibration: Path | None, score: str, threshold: float | None,
          target_accuracy: float | None, target_offload: float | None) -> None:  # fmt: skip
    """Joint inference: the deployment's light model on the device, hard items to the cloud model."""
    if bool(cloud) == bool(cloud_deployment):
        raise click.UsageError("give --cloud NAME:VERSION or --cloud-deployment")
    name, _, version = (cloud or "").partition(":")
    if cloud and (not name or not version):
        raise click.BadParameter(f"{cloud!r}: expected NAME:VERSION", param_hint="--cloud")
    tier = {"deployment": cloud_deployment} if cloud_deployment else {"model": name, "version": version}
    body = {
        "deployment": deployment, "device": device, "endpoint": endpoint, "batch": batch,
        "cloud": tier, "data": _dataset(c, data),
        "calibration": _dataset(c, calibration) if calibration else None, "score": score, "threshold": threshold,
        "target_accuracy": target_accuracy, "target_offload": target_offload,
    }  # fmt: skip
    _run(c, "/api/v1/inference/joint", body, _show_joint)


@infer.command("split")
@_edge_options
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="a labelled .npz to run")
@click.option("--cut", type=int, default=None, help="use this cut (default: the one EVC picks)")
@click.option("--measure-all", is_flag=True, help="measure every cut end to end too")
@click.option("--rounds", type=int, default=None, help="requests per measurement")
@pass_ctx
def split(c: Ctx, deployment: str, device: str | None, endpoint: str | None, batch: int | None, data: Path | None,
          cut: int | None, measure_all: bool, rounds: int | None) -> None:  # fmt: skip
    """Split computing: the deployment's model cut between device and cloud where EVC predicts the least latency."""
    body = {
        "deployment": deployment, "device": device, "endpoint": endpoint, "batch": batch, "cut": cut,
        "measure_all": measure_all, "rounds": rounds, "data": _dataset(c, data) if data else None,
    }  # fmt: skip
    _run(c, "/api/v1/inference/split", body, _show_split)
