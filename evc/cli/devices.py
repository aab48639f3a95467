"""`evc device` (register and inspect devices) and `evc ssh-key`."""

from __future__ import annotations

import sys
from typing import Any

import click

from evc.cli.common import CLUSTER, DEVICE, Ctx, _labels, _table, _watch, console, emit, main, pass_ctx


@main.group()
def device() -> None:
    """Register and inspect devices."""


@device.command("add")
@click.argument("name")
@click.option("--host", required=True)
@click.option("--port", default=22, show_default=True)
@click.option("--user", "username", required=True, help="the account EVC uses on the device")
@click.option("--label", "labels", multiple=True, help="key=value (repeatable)")
@click.option("--jump", default=None, help="jump host as user@host[:port]")
@click.option("--wait/--no-wait", default=True, show_default=True, help="follow the registration job")
@pass_ctx
def device_add(
    c: Ctx, name: str, host: str, port: int, username: str, labels: tuple[str, ...], jump: str | None, wait: bool
) -> None:
    """Register a device (install EVC's key on it first: `evc ssh-key`)."""
    body: dict[str, Any] = {"name": name, "host": host, "port": port, "username": username, "labels": _labels(labels)}
    if jump:
        juser, _, jhp = jump.partition("@")
        jhost, _, jport = jhp.partition(":")
        body["jump_host"] = {"username": juser, "host": jhost, "port": int(jport or 22)}
    client = c.client()
    data = client.post("/api/v1/devices", body)
    if not c.as_json:
        console.print(f"device {data['device']['id']} registered as pending; device token (shown once):")
        click.echo(data["token"])
    if wait:
        job = _watch(c, client, data["job"]["id"])
        data["job"] = job
        data["device"] = client.get(f"/api/v1/devices/{data['device']['id']}")
    if c.as_json:
        emit(c, data)
    elif wait:
        _device_detail(data["device"])
        if data["job"]["state"] != "succeeded":
            sys.exit(1)


@device.command("list")
@click.option("--state", default=None)
@click.option("--label", "labels", multiple=True, help="key=value filter (repeatable)")
@click.option("--cluster", default=None, type=CLUSTER)
@click.option("--limit", default=100, show_default=True)
@click.option("--offset", default=0)
@pass_ctx
def device_list(
    c: Ctx, state: str | None, labels: tuple[str, ...], cluster: str | None, limit: int, offset: int
) -> None:
    """List devices."""
    params: dict[str, Any] = {"state": state, "cluster": cluster, "limit": limit, "offset": offset}
    if labels:
        params["label"] = list(labels)
    data = c.client().get("/api/v1/devices", **params)
    emit(
        c,
        data,
        lambda d: (
            _table(d["items"], ["id", "name", "state", "host", "port", "username", "privilege", "level"]),
            console.print(f"{len(d['items'])} of {d['total']}"),
        ),
    )


@device.command("show")
@click.argument("device_id", metavar="DEVICE", type=DEVICE)
@pass_ctx
def device_show(c: Ctx, device_id: str) -> None:
    """Show a device, its facts and what its privilege level allows."""
    emit(c, c.client().get(f"/api/v1/devices/{device_id}"), _device_detail)


@device.command("rm")
@click.argument("device_id", metavar="DEVICE", type=DEVICE)
@pass_ctx
def device_rm(c: Ctx, device_id: str) -> None:
    """Remove a device from EVC."""
    emit(
        c,
        c.client().delete(f"/api/v1/devices/{device_id}"),
        lambda d: console.print(f"removed {d['id']} ({d['name']})"),
    )


@main.command("ssh-key")
@pass_ctx
def ssh_key(c: Ctx) -> None:
    """Print EVC's public key and the command that installs it on a device."""
    data = c.client().get("/api/v1/ssh-key")
    # plain echo, never rich: a wrapped install command breaks when copied and pasted
    emit(c, data, lambda d: click.echo(f"{d['public_key']}\n\n# on the device:\n{d['install_command']}"))


def _device_detail(d: dict[str, Any]) -> None:
    console.print(
        f"[bold]{d['name']}[/bold] {d['id']}  {d['username']}@{d['host']}:{d['port']}  "
        f"state={d['state']}  level={d.get('level')}"
    )
    if d.get("error"):
        console.print(f"  [red]error[/red]: {d['error'].get('message')}")
    f = d.get("facts") or {}
    if f:
        console.print(
            f"  {f.get('arch')}  {f.get('os')}  kernel {f.get('kernel')}  cpus {f.get('cpus')}  "
            f"python {f.get('python3')}"
        )
    if d.get("privilege"):
        console.print(f"  privilege: [bold]{d['privilege']}[/bold] — EVC can:")
        for cap in d.get("capabilities") or []:
            console.print(f"    • {cap}")
