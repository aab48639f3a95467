"""`evc deploy` and `evc deployment`: models served on devices by EVC's edge inference server."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from evc.cli.common import CLUSTER, DEVICE, Ctx, _table, _watch, console, emit, main, pass_ctx
from evc.cli.views import device_names


def _model_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition(":")
    if not name or not sep or not version:
        raise click.BadParameter(f"{ref!r}: expected NAME:VERSION", param_hint="NAME:VERSION")
    return name, version


def _targets_view(dep: dict[str, Any], names: dict[str, str]) -> None:
    rows = [
        {"device": names.get(t["device"], t["device"]), "state": t.get("state"), "version": t.get("version") or "",
         "endpoint": t.get("endpoint") or "", "reason": t.get("reason") or "", "image": t.get("delivery") or ""}
        for t in dep.get("targets") or []
    ]  # fmt: skip
    columns = ["device", "state", "version", "endpoint", "reason"]
    _table(rows, columns + (["image"] if dep.get("runtime") == "container" else []))


def _show(dep: dict[str, Any], names: dict[str, str]) -> None:
    variant = f" ({dep['variant']})" if dep.get("variant") else ""
    console.print(
        f"deployment {dep['id']}: {dep['model']}:{dep['version']}{variant} {dep['state']} "
        f"(runtime {dep['runtime']}, port {dep['port']}, python {dep['python']})"
    )
    if dep.get("image"):
        console.print(f"image {dep['image']} (id {str(dep.get('image_id') or '')[:12]})")
    rollout = dep.get("rollout") or {}
    if rollout:
        frm, to = (rollout.get("from") or {}).get("served_version"), (rollout.get("to") or {}).get("served_version")
        console.print(f"last {rollout.get('action', 'rollout')}: {frm} -> {to} {rollout.get('state')}")
    _targets_view(dep, names)


def _shower(client: Any) -> Callable[[dict[str, Any]], None]:
    """:func:`_show` with the devices named (their names fetched only for the human view)."""
    return lambda dep: _show(dep, device_names(client))


def parse_pairs(values: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    """``KEY=VALUE`` items, comma separated and/or repeated (pure)."""
    out = []
    for item in (x.strip() for v in values for x in v.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise click.BadParameter(f"{item!r}: expected {what}")
        out.append((key.strip(), value.strip()))
    return out


def _ports(c: Ctx, values: tuple[str, ...]) -> dict[str, int]:
    """``--ports dev=port,...``: device names or ids -> ports (names resolved to ids)."""
    out: dict[str, int] = {}
    for dev, port in parse_pairs(values, "DEVICE=PORT"):
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise click.BadParameter(f"{dev}={port}: the port must be 1..65535", param_hint="--ports")
        out[DEVICE.convert(dev, None, click.get_current_context())] = int(port)
    return out


@main.command("deploy")
@click.argument("ref", metavar="NAME:VERSION")
@click.option("--variant", default=None, help="deploy this variant of the version (e.g. int8)")
@click.option("--cluster", default=None, type=CLUSTER, help="every member of this cluster")
@click.option("--device", "devices", multiple=True, type=DEVICE, help="device name or id (repeatable)")
@click.option("--label", "labels", multiple=True,
              help="KEY=VALUE: the devices with these labels, followed as labels change (repeatable)")  # fmt: skip
@click.option("--port", type=int, default=None, help="the edge server's port on the devices (default 8500)")
@click.option("--ports", "ports", multiple=True, help="per-device ports: DEVICE=PORT,... (devices sharing an address)")
@click.option("--python", default=None, help="the devices' Python, with numpy and onnxruntime (default: the cluster's)")
@click.option(
    "--runtime",
    default="process",
    type=click.Choice(["process", "container"]),
    help="process (a supervised user-space server) or container (podman or docker on the devices)",
)
@click.option(
    "--image", default=None, help="with --runtime container: the edge server's image (default: EVC's edge_image)"
)
@click.option("--ensure-level/--no-ensure-level", default=True, show_default=True,
              help="raise the cluster's level first where devices are below what the runtime needs")  # fmt: skip
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per model (default: its own)")
@click.option("--wait", is_flag=True, help="follow the job and show each device's state")
@pass_ctx
def deploy(
    c: Ctx, ref: str, variant: str | None, cluster: str | None, devices: tuple[str, ...], labels: tuple[str, ...],
    port: int | None, ports: tuple[str, ...], python: str | None, runtime: str, image: str | None,
    ensure_level: bool, threads: int | None, wait: bool,
) -> None:  # fmt: skip
    """Deploy model NAME:VERSION to a cluster, devices or the devices with some labels (the edge
    inference server, health-gated)."""
    name, version = _model_ref(ref)
    if (bool(devices) + bool(labels) + bool(cluster) != 1 and not (labels and cluster)) or (devices and labels):
        raise click.UsageError("give --device (repeatable), --cluster or --label (with --cluster: its members)")
    body: dict[str, Any] = {"model": name, "version": version, "runtime": runtime, "ensure_level": ensure_level}
    if labels:
        body["selector"] = {
            "labels": dict(parse_pairs(labels, "KEY=VALUE")),
            **({"cluster": cluster} if cluster else {}),
        }
    else:
        body.update({"cluster": cluster} if cluster else {"devices": list(devices)})
    if image and runtime != "container":
        raise click.UsageError("--image goes with --runtime container")
    opts = {"variant": variant, "port": port, "python": python, "threads": threads, "image": image}
    body.update({k: v for k, v in opts.items() if v is not None})
    if ports:
        body["ports"] = _ports(c, ports)
    client = c.client()
    job = client.post("/api/v1/deployments", body)
    dep_id = job["params"]["deployment"]
    if not wait:
        emit(c, job, lambda j: console.print(f"deployment {dep_id}: {j['kind']} job {j['id']} {j['state']}"))
        return
    job = _watch(c, client, job["id"])
    dep = client.get(f"/api/v1/deployments/{dep_id}")
    emit(c, dep, _shower(client))
    sys.exit(0 if job["state"] == "succeeded" else 1)


@main.group()
def deployment() -> None:
    """Deployments: list, show, update (rollout), rollback, remove."""


@deployment.command("list")
@pass_ctx
def deployment_list(c: Ctx) -> None:
    """Deployments and how many of their devices run."""
    data = c.client().get("/api/v1/deployments", limit=500)

    def show(d: dict[str, Any]) -> None:
        rows = []
        for dep in d["items"]:
            targets = dep.get("targets") or []
            running = sum(1 for t in targets if t.get("state") == "running")
            rows.append({"id": dep["id"], "model": f"{dep['model']}:{dep['version']}", "state": dep["state"],
                         "running": f"{running}/{len(targets)}", "port": dep["port"]})  # fmt: skip
        _table(rows, ["id", "model", "state", "running", "port"])

    emit(c, data, show)


@deployment.command("show")
@click.argument("deployment_id", metavar="ID")
@pass_ctx
def deployment_show(c: Ctx, deployment_id: str) -> None:
    """A deployment with each device's state, version and endpoint."""
    client = c.client()
    dep = client.get(f"/api/v1/deployments/{deployment_id}")
    emit(c, dep, _shower(client))


@deployment.command("rm")
@click.argument("deployment_id", metavar="ID")
@click.option("--wait", is_flag=True, help="follow the job")
@pass_ctx
def deployment_rm(c: Ctx, deployment_id: str, wait: bool) -> None:
    """Stop a deployment's servers and remove their folders (a job)."""
    client = c.client()
    job = client.delete(f"/api/v1/deployments/{deployment_id}")
    if wait:
        job = _watch(c, client, job["id"])
    emit(c, job, lambda j: console.print(f"{j['kind']} job {j['id']} {j['state']}"))
    if wait:
        sys.exit(0 if job["state"] == "succeeded" else 1)


def _job_message(job: dict[str, Any]) -> str:
    return str((job.get("error") or {}).get("message") or (job.get("summary") or {}).get("message") or "")


def _rollout(c: Ctx, client: Any, job: dict[str, Any], deployment_id: str, wait: bool) -> None:
    if not wait:
        emit(c, job, lambda j: console.print(f"deployment {deployment_id}: {j['kind']} job {j['id']} {j['state']}"))
        return
    job = _watch(c, client, job["id"])
    dep = client.get(f"/api/v1/deployments/{deployment_id}")
    emit(c, dep, _shower(client))
    if job["state"] != "succeeded" and not c.as_json:
        console.print(f"{job['kind']} job {job['id']} {job['state']}: {_job_message(job)}")
    sys.exit(0 if job["state"] == "succeeded" else 1)


@deployment.command("update")
@click.argument("deployment_id", metavar="ID")
@click.option("--version", required=True, help="the model version to roll out")
@click.option("--variant", default=None, help="a variant of that version (e.g. int8)")
@click.option("--max-unavailable", type=click.IntRange(min=1), default=1, show_default=True,
              help="devices switched at a time")  # fmt: skip
@click.option("--failure-budget", type=click.FloatRange(min=0), default=None,
              help="devices (a count, or a fraction < 1) that may fail before the rollout stops and "
              "every device it updated goes back (default: stop at the first failure)")  # fmt: skip
@click.option("--wait", is_flag=True, help="follow the job and show each device's state")
@pass_ctx
def deployment_update(
    c: Ctx, deployment_id: str, version: str, variant: str | None, max_unavailable: int,
    failure_budget: float | None, wait: bool,
) -> None:  # fmt: skip
    """Roll a deployment out to another version, device by device, each health-gated; a device
    failing its gate goes back to its version and the rollout stops (or goes on, within
    --failure-budget)."""
    body: dict[str, Any] = {"version": version, "max_unavailable": max_unavailable}
    if variant:
        body["variant"] = variant
    if failure_budget is not None:
        body["failure_budget"] = failure_budget
    client = c.client()
    _rollout(c, client, client.patch(f"/api/v1/deployments/{deployment_id}", body), deployment_id, wait)


@deployment.command("rollback")
@click.argument("deployment_id", metavar="ID")
@click.option("--max-unavailable", type=click.IntRange(min=1), default=None,
              help="devices switched at a time (default: the deployment's)")  # fmt: skip
@click.option("--wait", is_flag=True, help="follow the job and show each device's state")
@pass_ctx
def deployment_rollback(c: Ctx, deployment_id: str, max_unavailable: int | None, wait: bool) -> None:
    """Return every device of a deployment to its previous version."""
    body: dict[str, Any] = {"max_unavailable": max_unavailable} if max_unavailable else {}
    client = c.client()
    _rollout(c, client, client.post(f"/api/v1/deployments/{deployment_id}/rollback", body), deployment_id, wait)


@deployment.command("converge")
@click.argument("deployment_id", metavar="ID")
@click.option("--wait", is_flag=True, help="follow the jobs")
@pass_ctx
def deployment_converge(c: Ctx, deployment_id: str, wait: bool) -> None:
    """Re-resolve a deployment's devices (cluster, labels) and make each serve its version,
    doing only what is missing; devices that left are cleaned up."""
    client = c.client()
    jobs = client.post(f"/api/v1/deployments/{deployment_id}/converge", {})["items"]
    if wait:
        jobs = [_watch(c, client, j["id"]) for j in jobs]
    emit(c, {"items": jobs}, lambda d: [console.print(f"{j['kind']} job {j['id']} {j['state']}") for j in d["items"]])
    if wait:
        sys.exit(0 if all(j["state"] == "succeeded" for j in jobs) else 1)
