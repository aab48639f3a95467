"""`evc job`: follow and manage jobs."""

from __future__ import annotations

import sys

import click

from evc.cli import views as cli_views
from evc.cli.common import Ctx, _finish, _table, _watch, console, emit, main, pass_ctx
from evc.cli.format import percent


@main.group()
def job() -> None:
    """Follow and manage jobs."""


@job.command("list")
@click.option("--kind", default=None)
@click.option("--state", default=None)
@click.option("--limit", default=50, show_default=True)
@click.option("--offset", default=0)
@pass_ctx
def job_list(c: Ctx, kind: str | None, state: str | None, limit: int, offset: int) -> None:
    """List jobs, newest first."""
    data = c.client().get("/api/v1/jobs", kind=kind, state=state, limit=limit, offset=offset)
    emit(
        c,
        data,
        lambda d: (
            _table(
                [{**j, "progress": percent(j.get("progress") or {})} for j in d["items"]],
                ["id", "kind", "state", "progress", "created_at", "created_by"],
            ),
            console.print(f"{len(d['items'])} of {d['total']}"),
        ),
    )


@job.command("show")
@click.argument("job_id")
@pass_ctx
def job_show(c: Ctx, job_id: str) -> None:
    """Show a job with its per-target results."""
    client = c.client()
    emit(c, client.get(f"/api/v1/jobs/{job_id}"), lambda d: cli_views.job_detail(console, client, d))


@job.command("watch")
@click.argument("job_id")
@pass_ctx
def job_watch(c: Ctx, job_id: str) -> None:
    """Follow a job's events with a progress display until it ends."""
    j = _watch(c, c.client(), job_id)
    if c.as_json:
        emit(c, j)
    sys.exit(0 if j["state"] == "succeeded" else 1)


@job.command("cancel")
@click.argument("job_id")
@pass_ctx
def job_cancel(c: Ctx, job_id: str) -> None:
    """Cancel a job."""
    emit(
        c,
        c.client().post(f"/api/v1/jobs/{job_id}/cancel"),
        lambda d: console.print(f"{d['id']}: {d['state']} (cancel requested)"),
    )


@job.command("retry")
@click.argument("job_id")
@click.option(
    "--on",
    "on",
    multiple=True,
    type=click.Choice(["failed", "unreachable"]),
    help="which host outcomes to re-run (default both)",
)
@click.option("--wait/--no-wait", default=True, show_default=True)
@pass_ctx
def job_retry(c: Ctx, job_id: str, on: tuple[str, ...], wait: bool) -> None:
    """Re-run a provisioning job on its failed and unreachable hosts only."""
    client = c.client()
    j = client.post(f"/api/v1/jobs/{job_id}/retry", {"on": list(on)} if on else {})
    _finish(c, client, j, wait)
