"""`evc cluster`: clusters, interworking profiles and function levels."""

from __future__ import annotations

import json
from typing import Any

import click

from evc.cli import views as cli_views
from evc.cli.common import CLUSTER, DEVICE, Ctx, _finish, _labels, _table, console, emit, main, pass_ctx


@main.group()
def cluster() -> None:
    """Clusters, interworking profiles and function levels."""


@cluster.command("profiles")
@pass_ctx
def cluster_profiles(c: Ctx) -> None:
    """The four interworking profiles and the playbooks of each function level."""
    data = c.client().get("/api/v1/profiles")

    def show(d: dict[str, Any]) -> None:
        for p in d["profiles"]:
            console.print(f"[bold]{p['name']}[/bold]: {p['description']}")
            console.print(f"  needs: {p['requires']}")
            for lvl, spec in p["levels"].items():
                steps = ", ".join(
                    s["playbook"] + (f" ({s['role']})" if s["role"] != "all" else "") for s in spec["steps"]
                )
                console.print(f"  L{lvl} {spec['name']}: {steps or '-'}")

    emit(c, data, show)


@cluster.command("create")
@click.argument("name")
@click.option("--profile", required=True, type=click.Choice(["direct", "container", "k3s", "k8s"]))
@click.option("--level", "target_level", type=int, default=0, show_default=True, help="target function level")
@click.option("--label", "labels", multiple=True)
@click.option("--vars-json", default=None, help='per-playbook variables, e.g. \'{"k3s-server": {"artifact": "k3s"}}\'')
@pass_ctx
def cluster_create(
    c: Ctx, name: str, profile: str, target_level: int, labels: tuple[str, ...], vars_json: str | None
) -> None:
    """Create a cluster."""
    body: dict[str, Any] = {"name": name, "profile": profile, "target_level": target_level, "labels": _labels(labels)}
    if vars_json:
        body["vars"] = json.loads(vars_json)
    emit(c, c.client().post("/api/v1/clusters", body), lambda d: console.print(f"cluster {d['id']} ({d['profile']})"))


@cluster.command("list")
@pass_ctx
def cluster_list(c: Ctx) -> None:
    """List clusters."""
    data = c.client().get("/api/v1/clusters", limit=500)
    emit(c, data, lambda d: _table(d["items"], ["id", "name", "profile", "target_level", "level", "size", "server_id"]))


@cluster.command("show")
@click.argument("cluster_id", metavar="CLUSTER", type=CLUSTER)
@pass_ctx
def cluster_show(c: Ctx, cluster_id: str) -> None:
    """A cluster with its members."""
    client = c.client()
    emit(c, client.get(f"/api/v1/clusters/{cluster_id}"), lambda d: cli_views.cluster_detail(console, client, d))


@cluster.command("rm")
@click.argument("cluster_id", metavar="CLUSTER", type=CLUSTER)
@pass_ctx
def cluster_rm(c: Ctx, cluster_id: str) -> None:
    """Delete an empty cluster."""
    emit(c, c.client().delete(f"/api/v1/clusters/{cluster_id}"), lambda d: console.print(f"deleted {d['id']}"))


@cluster.command("add")
@click.argument("cluster_id", metavar="CLUSTER", type=CLUSTER)
@click.argument("device_id", metavar="DEVICE", type=DEVICE)
@click.option("--wait/--no-wait", default=True, show_default=True)
@pass_ctx
def cluster_add(c: Ctx, cluster_id: str, device_id: str, wait: bool) -> None:
    """Add a device; it is brought to the cluster's level (a job)."""
    client = c.client()
    out = client.post(f"/api/v1/clusters/{cluster_id}/devices", {"device_id": device_id})
    if out.get("job"):
        _finish(c, client, out["job"], wait)
    else:
        emit(c, out, lambda d: console.print(f"{device_id} joined {cluster_id} (already at the cluster's level)"))


@cluster.command("remove")
@click.argument("cluster_id", metavar="CLUSTER", type=CLUSTER)
@click.argument("device_id", metavar="DEVICE", type=DEVICE)
@click.option("--cleanup", is_flag=True, help="also remove what EVC installed on the device (a job)")
@pass_ctx
def cluster_remove(c: Ctx, cluster_id: str, device_id: str, cleanup: bool) -> None:
    """Remove a device from a cluster."""
    client = c.client()
    out = client.delete(f"/api/v1/clusters/{cluster_id}/devices/{device_id}?cleanup={'true' if cleanup else 'false'}")
    if out.get("job"):
        _finish(c, client, out["job"], True)
    else:
        emit(c, out, lambda d: console.print(f"{device_id} left {cluster_id}"))


@cluster.command("level")
@click.argument("cluster_id", metavar="CLUSTER", type=CLUSTER)
@click.argument("target", type=int)
@click.option("--check", is_flag=True, help="dry run: report what would change")
@click.option("--offline", type=click.Choice(["skip", "fail", "wait"]), default="skip", show_default=True)
@click.option("--wait/--no-wait", default=True, show_default=True)
@pass_ctx
def cluster_level(c: Ctx, cluster_id: str, target: int, check: bool, offline: str, wait: bool) -> None:
    """Raise every member to a function level (0 connected .. 4 application)."""
    client = c.client()
    j = client.post(f"/api/v1/clusters/{cluster_id}/level", {"target": target, "check": check, "offline": offline})
    _finish(c, client, j, wait)
