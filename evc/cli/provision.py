"""`evc playbook` (the catalog) and `evc provision` (run a playbook on devices as a job)."""

from __future__ import annotations

import json
from typing import Any

import click

from evc.cli.common import CLUSTER, DEVICE, Ctx, _finish, _labels, _table, emit, main, pass_ctx


@main.group()
def playbook() -> None:
    """The playbook catalog."""


@playbook.command("list")
@pass_ctx
def playbook_list(c: Ctx) -> None:
    """Playbooks EVC can run, with the privilege level each needs."""
    data = c.client().get("/api/v1/playbooks")
    emit(c, data, lambda d: _table(d["items"], ["name", "min_privilege", "check_mode", "source", "description"]))


@playbook.command("show")
@click.argument("name")
@pass_ctx
def playbook_show(c: Ctx, name: str) -> None:
    """A playbook's description and parameters."""
    emit(c, c.client().get(f"/api/v1/playbooks/{name}"), lambda d: click.echo(json.dumps(d, indent=2)))


@main.command()
@click.argument("playbook_name", metavar="PLAYBOOK")
@click.option("--device", "devices", multiple=True, type=DEVICE, help="device name or id (repeatable)")
@click.option("--label", "labels", multiple=True, help="select devices by key=value (repeatable)")
@click.option("--cluster", default=None, type=CLUSTER, help="every member of a cluster")
@click.option("--var", "var_items", multiple=True, help="extra variable key=value (value parsed as JSON if it can be)")
@click.option("--check", is_flag=True, help="dry run with diff: report drift, change nothing")
@click.option("--forks", type=int, default=None)
@click.option(
    "--lock",
    type=click.Choice(["wait", "fail"]),
    default="wait",
    show_default=True,
    help="a device busy with another job: wait behind it, or refuse",
)
@click.option("--retry", "retries", type=int, default=0, help="re-run failed/unreachable hosts up to N times")
@click.option("--wait/--no-wait", default=True, show_default=True, help="follow the job with a progress display")
@pass_ctx
def provision(
    c: Ctx,
    playbook_name: str,
    devices: tuple[str, ...],
    labels: tuple[str, ...],
    cluster: str | None,
    var_items: tuple[str, ...],
    check: bool,
    forks: int | None,
    lock: str,
    retries: int,
    wait: bool,
) -> None:
    """Run a catalog playbook on devices (ids, a label selector or a cluster) as a job."""
    body: dict[str, Any] = {"playbook": playbook_name, "extra_vars": _vars(var_items), "check": check, "lock": lock}
    if devices:
        body["targets"] = list(devices)
    else:
        sel: dict[str, Any] = {"labels": _labels(labels)}
        if cluster:
            sel["cluster"] = cluster
        body["selector"] = sel
    if forks:
        body["forks"] = forks
    if retries:
        body["retry"] = {"max": retries}
    client = c.client()
    _finish(c, client, client.post("/api/v1/provision", body), wait)


def _vars(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} must be key=value", param_hint="--var")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
