"""`evc model profile`, `evc model recommend`, `evc device calibrate`: model recommendation
from measurements (:mod:`evc.recommend`)."""

from __future__ import annotations

import sys
from typing import Any

import click

from evc.cli.common import CLUSTER, DEVICE, Ctx, _table, _watch, console, emit, pass_ctx
from evc.cli.devices import device
from evc.cli.models import _ref, model


def _targets(cluster: str | None, devices: tuple[str, ...]) -> dict[str, Any]:
    if bool(devices) == bool(cluster):
        raise click.UsageError("give --device (repeatable) or --cluster")
    return {"cluster": cluster} if cluster else {"devices": list(devices)}


def _finish(c: Ctx, client: Any, job: dict[str, Any], wait: bool) -> None:
    if not wait:
        emit(c, job, lambda j: console.print(f"{j['kind']} job {j['id']} {j['state']}"))
        return
    job = _watch(c, client, job["id"])
    emit(c, job, lambda j: console.print(f"{j['kind']} job {j['id']} {j['state']}: {j.get('summary') or ''}"))
    sys.exit(0 if job["state"] == "succeeded" else 1)


_TARGETS = [
    click.option("--cluster", default=None, type=CLUSTER, help="every member of this cluster"),
    click.option("--device", "devices", multiple=True, type=DEVICE, help="device name or id (repeatable)"),
]


def _with(options: list[Any]) -> Any:
    def wrap(fn: Any) -> Any:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return wrap


@model.command("profile")
@click.argument("ref", metavar="NAME[:VERSION]")
@_with(_TARGETS)
@click.option("--variant", "variants", multiple=True, help="variant to measure (base: the version); default all")
@click.option("--batch", "batches", multiple=True, type=int, help="batch size (repeatable; default 1)")
@click.option("--warmup", type=int, default=None, help="warm-up inferences per batch size (default 5)")
@click.option("--timed", type=int, default=None, help="timed inferences per batch size (default 50)")
@click.option("--python", default=None, help="the devices' Python, with numpy and onnxruntime")
@click.option("--one-at-a-time", is_flag=True, help="measure one device at a time (devices sharing a host)")
@click.option("--wait", is_flag=True, help="follow the job")
@pass_ctx
def model_profile(c: Ctx, ref: str, cluster: str | None, devices: tuple[str, ...], variants: tuple[str, ...],
                  batches: tuple[int, ...], warmup: int | None, timed: int | None, python: str | None,
                  one_at_a_time: bool, wait: bool) -> None:  # fmt: skip
    """Measure a model's variants on devices: p50/p95 latency, throughput, peak memory, load."""
    name, version = _ref(ref, need_version=False)
    body: dict[str, Any] = {**_targets(cluster, devices), "one_at_a_time": one_at_a_time}
    extra = {"version": version, "variants": list(variants) or None, "batches": list(batches) or None,
             "warmup": warmup, "timed": timed, "python": python}  # fmt: skip
    body.update({k: v for k, v in extra.items() if v is not None})
    client = c.client()
    _finish(c, client, client.post(f"/api/v1/models/{name}/profile", body), wait)


@device.command("calibrate")
@_with(_TARGETS)
@click.option("--python", default=None, help="the devices' Python, with numpy and onnxruntime")
@click.option("--one-at-a-time", is_flag=True, help="calibrate one device at a time (devices sharing a host)")
@click.option("--wait", is_flag=True, help="follow the job")
@pass_ctx
def device_calibrate(c: Ctx, cluster: str | None, devices: tuple[str, ...], python: str | None, one_at_a_time: bool,
                     wait: bool) -> None:  # fmt: skip
    """Run the short calibration micro-benchmark (GFLOP/s, element and node costs, CPU quota)."""
    body: dict[str, Any] = {**_targets(cluster, devices), "one_at_a_time": one_at_a_time}
    if python:
        body["python"] = python
    client = c.client()
    _finish(c, client, client.post("/api/v1/devices/calibrate", body), wait)


def recommendation_rows(d: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per device: the variant, its figures and source, and why the others lost."""
    rows = []
    for x in d.get("devices") or []:
        f = x.get("figures") or {}
        unc = f"±{round(100 * f['uncertainty'])}%" if f.get("source") == "predicted" else ""
        acc = x.get("accuracy")
        rows.append({
            "device": x.get("name") or x["device"], "variant": x["label"],
            "accuracy": f"{acc:.3f}" if isinstance(acc, float) else "", "p50 ms": f"{f.get('p50_ms', 0):.3g}",
            "p95 ms": f"{f.get('p95_ms', 0):.3g}", "per s": f"{f.get('throughput_ips', 0):.4g}",
            "source": f"{f.get('source')} {unc}".strip(), "others": "; ".join(x.get("rejected") or []),
        })  # fmt: skip
    for u in d.get("unable") or []:
        rows.append({"device": u.get("name") or u["device"], "variant": "-", "others": u.get("reason") or ""})
    return rows


@model.command("recommend")
@click.argument("ref", metavar="NAME[:VERSION]")
@_with(_TARGETS)
@click.option("--objective", type=click.Choice(["accuracy", "latency", "throughput"]), default="accuracy")
@click.option("--max-latency-ms", type=float, default=None, help="the p95 latency bound")
@click.option("--min-accuracy", type=float, default=None)
@click.option("--batch", type=int, default=1)
@pass_ctx
def model_recommend(c: Ctx, ref: str, cluster: str | None, devices: tuple[str, ...], objective: str,
                    max_latency_ms: float | None, min_accuracy: float | None, batch: int) -> None:  # fmt: skip
    """Per device, the variant that meets the constraints and best meets the objective."""
    name, version = _ref(ref, need_version=False)
    params = {**_targets(cluster, devices), "version": version, "objective": objective, "batch": batch,
              "max_latency_ms": max_latency_ms, "min_accuracy": min_accuracy}  # fmt: skip
    data = c.client().get(f"/api/v1/models/{name}/recommend", **params)

    def show(d: dict[str, Any]) -> None:
        cols = ["device", "variant", "accuracy", "p50 ms", "p95 ms", "per s", "source", "others"]
        _table(recommendation_rows(d), cols)
        p = d.get("predictor") or {}
        if p.get("pairs"):
            share, err = 100 * p["within_20pct"], 100 * p["median_abs_error"]
            console.print(f"predictor: {p['profiles']} profile(s); held-out p50 within ±20 %: {share:.0f} % of "
                          f"{p['pairs']} pairs, median error {err:.1f} %")  # fmt: skip

    emit(c, data, show)
