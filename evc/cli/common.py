"""What every `evc` command shares: the root group (`main`), the context (API URL, token,
``--json``), the consoles, device/cluster references, and following a job to its end."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from evc import __version__
from evc.cli import views as cli_views
from evc.cli.format import Ref, table
from evc.cli.format import show as show_table
from evc.client import APIError, Client, is_local_url
from evc.errors import EVCError
from evc.settings import load_settings

console = Console()
err_console = Console(stderr=True)


class Ctx:
    def __init__(self, url: str | None, token: str | None, as_json: bool) -> None:
        self.settings = load_settings()
        self.url = url or self.settings.public_url or _running_api_url(self.settings.data_dir) or self.settings.api_url
        self.withheld = ""  # why the local admin token was not sent, if it was not
        if token is None:
            f = self.settings.data_dir / "admin-token"
            if f.exists() and is_local_url(self.url):
                token = f.read_text().strip()
            elif f.exists():
                self.withheld = (
                    f"the local admin token ({f}) is only sent to EVC on this machine, not to {self.url}; "
                    "give that server's token with --token or EVC_TOKEN"
                )
        self.token = token
        self.as_json = as_json

    def client(self) -> Client:
        return Client(self.url, self.token)


pass_ctx = click.make_pass_decorator(Ctx)


def _client_of(ctx: click.Context) -> Client | None:
    c = ctx.find_object(Ctx)
    if c is None and ctx.resilient_parsing:  # shell completion: the group's callback did not run
        root = ctx.find_root().params
        c = Ctx(root.get("url"), root.get("token"), False)
    return c.client() if c is not None else None


#: a device or cluster given by its id or its name
DEVICE = Ref("device", _client_of)
CLUSTER = Ref("cluster", _client_of)


def _running_api_url(data_dir: Path) -> str | None:
    """The API URL of the `evc up` running on *data_dir* (from its stack.json), if one runs."""
    try:
        state = json.loads((data_dir / "stack.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    if not Path(f"/proc/{state['pid']}").exists():
        return None
    url = state.get("api_url")
    return url if isinstance(url, str) and url else None


def _fail(exc: Exception) -> None:
    err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    sys.exit(2)


class EVCGroup(click.Group):
    """Print the API's message, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except APIError as exc:
            withheld = getattr(ctx.obj, "withheld", "")
            _fail(
                APIError(exc.status, f"{exc.message} ({withheld})", exc.body) if exc.status == 401 and withheld else exc
            )
        except EVCError as exc:
            _fail(exc)


@click.group(cls=EVCGroup)
@click.version_option(__version__, "--version", prog_name="evc", message="%(prog)s %(version)s")
@click.option(
    "--url",
    envvar="EVC_URL",
    help="EVC API URL (default: EVC_PUBLIC_URL, else the `evc up` running on the data directory, else EVC_API_BIND)",
)
@click.option("--token", envvar="EVC_TOKEN", help="bearer token (default: the local admin token)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable JSON output")
@click.pass_context
def main(ctx: click.Context, url: str | None, token: str | None, as_json: bool) -> None:
    """EVC — Edge Vision Cluster: provision, monitor, deploy to and train on edge devices over SSH.

    Devices and clusters can be given by name or id. Times are shown relative ("3m ago") or in
    the local zone; --json prints the API's raw values.

    Shell completion (bash; zsh and fish alike with zsh_source / fish_source):

        eval "$(_EVC_COMPLETE=bash_source evc)"
    """
    ctx.obj = Ctx(url, token, as_json)


def emit(c: Ctx, data: Any, table: Callable[[Any], object] | None = None) -> None:
    if c.as_json or table is None:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        table(data)


# ----------------------------------------------------------------------------- helpers
def _labels(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} must be key=value", param_hint="--label")
        out[k] = v
    return out


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    show_table(console, table(rows, cols))


def _watch(c: Ctx, client: Client, job_id: str) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    job: dict[str, Any] = {}
    quiet = c.as_json
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    ) as prog:
        bar = prog.add_task(job_id, total=1)
        running: dict[str, str] = {}  # host -> the Ansible task it is running
        names: dict[str, str] = {}  # device id (Ansible's host) -> name
        for job, events in client.follow(job_id):
            if not names and not quiet and any(e.get("type") == "ansible" for e in events):
                names = cli_views.device_names(client)
            p = job.get("progress") or {}
            total = max(int(p.get("total") or 1), 1)
            for e in events:
                if e.get("type") == "ansible" and e.get("host") and e.get("task"):
                    host = names.get(e["host"], e["host"])
                    if e.get("status") == "started":
                        running[host] = e["task"]
                    elif running.get(host) == e["task"]:
                        running.pop(host)
            tasks = "  ".join(f"{h}: {t}" for h, t in sorted(running.items())[:4])
            prog.update(
                bar,
                total=total,
                completed=min(int(p.get("done") or 0), total),  # (never past 100 %)
                description=f"{job['kind']} {job_id} [{job['state']}]" + (f"  {tasks}" if tasks else ""),
            )
            for e in events:
                if not quiet and e.get("type") == "ansible" and e.get("status") == "started" and e.get("host"):
                    host = names.get(e["host"], e["host"])
                    prog.console.print(f"  {e['seq']:>4} {host}: TASK {e.get('task', '?')}", style="dim", markup=False)
                if not quiet and e.get("message"):
                    host = e.get("host") or e.get("target") or ""
                    host = names.get(host, host)
                    prog.console.print(f"  {e['seq']:>4} {host + ': ' if host else ''}{e['message']}")
    if not quiet:
        colour = {"succeeded": "green", "failed": "red"}.get(job["state"], "yellow")
        err_console.print(
            f"[{colour}]{job['state']}[/{colour}]" + (f": {job['error']['message']}" if job.get("error") else "")
        )
    return job


def _finish(c: Ctx, client: Client, j: dict[str, Any], wait: bool) -> None:
    """Follow a job (or print it) and show its per-target results; exit 1 unless it succeeded."""
    if not wait:
        emit(c, j, lambda d: console.print(f"{d['kind']} job {d['id']} {d['state']}"))
        return
    j = _watch(c, client, j["id"])
    full = client.get(f"/api/v1/jobs/{j['id']}")
    if c.as_json:
        emit(c, full)
    else:
        results = full.get("results") or {}
        names = cli_views.device_names(client) if results else {}
        rows = [{"target": t, "name": names.get(t), **r} for t, r in results.items()]
        if rows:
            cols = [
                k
                for k in ("target", "status", "ok", "state", "level", "level_name", "changed", "stopped", "message")
                if any(k in r for r in rows)
            ]
            cols.insert(1, "name")
            _table(rows, cols)
    sys.exit(0 if full["state"] == "succeeded" else 1)
