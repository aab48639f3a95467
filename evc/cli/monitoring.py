"""`evc events` (the fleet event log) and `evc health` (a health sweep)."""

from __future__ import annotations

import sys

import click

from evc.cli import views as cli_views
from evc.cli.common import DEVICE, Ctx, _finish, _table, _watch, console, emit, main, pass_ctx


@main.command()
@click.option("--type", "etype", default=None, help="event type or prefix, e.g. device.state")
@click.option("--device", default=None, type=DEVICE)
@click.option("--limit", default=50, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="then keep printing new events as they happen (Ctrl-C stops)")
@click.option("--for", "follow_s", type=float, default=None, help="with --follow: stop after this many seconds")
@pass_ctx
def events(c: Ctx, etype: str | None, device: str | None, limit: int, follow: bool, follow_s: float | None) -> None:
    """The fleet event log (device state changes, membership, ...), newest first."""
    client = c.client()
    data = client.get("/api/v1/events", type=etype, device=device, limit=limit)
    if follow:
        cli_views.follow_events(console, client, data["items"], etype, device, follow_s, as_json=c.as_json)
        return
    emit(c, data, lambda d: _table([cli_views.event_row(e) for e in d["items"]], cli_views.EVENT_COLUMNS))


@main.command()
@click.option("--device", "devices", multiple=True, type=DEVICE, help="only these devices (default: all)")
@click.option("--wait/--no-wait", default=True, show_default=True)
@pass_ctx
def health(c: Ctx, devices: tuple[str, ...], wait: bool) -> None:
    """Run a health sweep now (a job) and show each device's state."""
    client = c.client()
    j = client.post("/api/v1/health/sweep", {"devices": list(devices)} if devices else {})
    if not wait:
        _finish(c, client, j, wait)
        return
    j = _watch(c, client, j["id"])
    full = client.get(f"/api/v1/jobs/{j['id']}")
    emit(c, full, lambda d: cli_views.health_detail(console, client, d))
    sys.exit(0 if full["state"] == "succeeded" else 1)
