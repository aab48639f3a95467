"""`evc` commands for running a fleet day to day: import an inventory, retry a registration,
cluster variables, enrollment tokens, the audit log. Registered on the groups of :mod:`evc.cli`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from evc.cli.clusters import cluster as cluster_group
from evc.cli.common import CLUSTER, DEVICE, Ctx, _finish, _table, _watch, console, emit, err_console, main, pass_ctx
from evc.cli.devices import device
from evc.cli.tokens import token as token_group
from evc.cli.views import job_detail
from evc.inventory_import import FORMATS

ACTION_COLOURS = {"create": "green", "update": "yellow", "register": "cyan", "invalid": "red", "unchanged": "dim"}


# ----------------------------------------------------------------------------- devices
@device.command("import")
@click.argument("inventory", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="default: detected")
@click.option("--user", "default_user", default=None, help="the account for hosts that name no ansible_user")
@click.option("--dry-run", is_flag=True, help="show what would change; change nothing")
@click.option("--wait/--no-wait", default=True, show_default=True, help="follow the registration job")
@pass_ctx
def device_import(
    c: Ctx, inventory: Path, fmt: str | None, default_user: str | None, dry_run: bool, wait: bool
) -> None:
    """Onboard a fleet from an Ansible inventory (INI or YAML) or a CSV, as one batch job.

    From an inventory: ansible_host, ansible_port, ansible_user; each group becomes a label
    <group>=true; a jump host from -o ProxyJump=user@host[:port] in ansible_ssh_common_args.
    A CSV has a header: name,host,port,user,labels,jump (labels k=v;k=v, jump user@host[:port]).
    Re-importing updates devices by name, never duplicates them. Exits 1 when a host could not
    be imported or a device did not register."""
    body = {"content": inventory.read_text(), "filename": inventory.name, "format": fmt, "dry_run": dry_run}
    if default_user:
        body["default_user"] = default_user
    client = c.client()
    out = client.post("/api/v1/devices/import", body)
    job = out.get("job")
    if job and wait and not dry_run:
        _watch(c, client, job["id"])
        out["job"] = job = client.get(f"/api/v1/jobs/{job['id']}")
    if c.as_json:
        emit(c, out)
    else:
        rows = [{**d, "changes": _changes(d.get("changes") or {}), "reason": d.get("reason")} for d in out["devices"]]
        for r in rows:
            colour = ACTION_COLOURS.get(r["action"], "white")
            r["action"] = f"[{colour}]{r['action']}[/{colour}]"
        _table(rows, ["name", "action", "device_id", "changes", "reason"])
        counts: dict[str, int] = {}
        for d in out["devices"]:
            counts[d["action"]] = counts.get(d["action"], 0) + 1
        verb = "would" if dry_run else "will"
        console.print(
            ", ".join(f"{n} {a}" for a, n in counts.items()) + (" (dry run: nothing changed)" if dry_run else "")
        )
        if out.get("tokens"):
            console.print("device tokens (shown once; a device sends heartbeats with its own):")
            for name, tok in out["tokens"].items():
                click.echo(f"{name} {tok}")
        if job and wait and not dry_run:
            job_detail(console, client, job)
        elif job:
            console.print(f"registration job {job['id']} {verb} register {len(job['targets'])} device(s)")
    failed = any(d["action"] == "invalid" for d in out["devices"]) or (job is not None and job["state"] == "failed")
    sys.exit(1 if failed else 0)


def _changes(changes: dict[str, list[Any]]) -> str:
    return "; ".join(f"{k}: {_short(old)} → {_short(new)}" for k, (old, new) in changes.items())


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items() if x is not None) or "-"
    return "-" if v is None else str(v)


@device.command("retry")
@click.argument("device_id", metavar="DEVICE", type=DEVICE)
@click.option("--wait/--no-wait", default=True, show_default=True)
@pass_ctx
def device_retry(c: Ctx, device_id: str, wait: bool) -> None:
    """Register a device again after its registration failed (no remove-and-add)."""
    client = c.client()
    _finish(c, client, client.post(f"/api/v1/devices/{device_id}/register"), wait)


# ----------------------------------------------------------------------------- clusters
@cluster_group.command("vars")
@click.argument("cluster_id", metavar="CLUSTER", type=CLUSTER)
@click.option("--set", "sets", multiple=True, metavar="PLAYBOOK.KEY=VALUE", help="value parsed as JSON if it can be")
@click.option("--unset", "unsets", multiple=True, metavar="PLAYBOOK.KEY")
@pass_ctx
def cluster_vars(c: Ctx, cluster_id: str, sets: tuple[str, ...], unsets: tuple[str, ...]) -> None:
    """Show a cluster's per-playbook variables, or change some (--set/--unset, repeatable)."""
    client = c.client()
    cl = client.get(f"/api/v1/clusters/{cluster_id}")
    variables: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (cl.get("vars") or {}).items()}
    for item in sets:
        path, sep, raw = item.partition("=")
        playbook, dot, key = path.partition(".")
        if not (sep and dot and playbook and key):
            raise click.BadParameter(f"{item!r} must be PLAYBOOK.KEY=VALUE", param_hint="--set")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        variables.setdefault(playbook, {})[key] = value
    for path in unsets:
        playbook, dot, key = path.partition(".")
        if not dot or key not in variables.get(playbook, {}):
            raise click.BadParameter(f"{path!r} is not set", param_hint="--unset")
        del variables[playbook][key]
        if not variables[playbook]:
            del variables[playbook]
    if sets or unsets:
        cl = client.patch(f"/api/v1/clusters/{cluster_id}", {"vars": variables})
    rows = [
        {"playbook": p, "key": k, "value": json.dumps(v)}
        for p, kv in (cl.get("vars") or {}).items()
        for k, v in kv.items()
    ]
    emit(
        c,
        cl.get("vars") or {},
        lambda d: _table(rows, ["playbook", "key", "value"]) if rows else console.print("no vars"),
    )


# ----------------------------------------------------------------------------- enrollments, audit
@token_group.command("enrollments")
@click.option("--limit", default=100, show_default=True)
@pass_ctx
def enrollment_list(c: Ctx, limit: int) -> None:
    """Enrollment tokens: uses left, expiry, labels given, revoked."""
    data = c.client().get("/api/v1/enrollments", limit=limit)
    emit(c, data, lambda d: _table(d["items"], ["id", "uses_left", "expires_at", "labels", "revoked", "created_at"]))


@token_group.command("revoke-enrollment")
@click.argument("enrollment_id")
@pass_ctx
def enrollment_revoke(c: Ctx, enrollment_id: str) -> None:
    """Revoke an enrollment token: no more devices register with it."""
    out = c.client().delete(f"/api/v1/enrollments/{enrollment_id}")
    emit(c, out, lambda d: console.print(f"revoked enrollment {d['id']}"))


@main.command()
@click.option("--limit", default=50, show_default=True)
@click.option("--offset", default=0)
@pass_ctx
def audit(c: Ctx, limit: int, offset: int) -> None:
    """The audit log: who did what, when, from where (every change made through the API)."""
    data = c.client().get("/api/v1/audit", limit=limit, offset=offset)

    def show(d: dict[str, Any]) -> None:
        _table(d["items"], ["ts", "actor", "action", "target", "ip"])
        err_console.print(f"{len(d['items'])} of {d['total']}")

    emit(c, data, show)
