"""The `evc` command: run the stack (`evc up`), the simulator, and drive the HTTP API."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from evc.client import APIError, Client
from evc.errors import EVCError
from evc.settings import load_settings

console = Console()
err_console = Console(stderr=True)


class Ctx:
    def __init__(self, url: str | None, token: str | None, as_json: bool) -> None:
        self.settings = load_settings()
        self.url = url or self.settings.api_url
        if token is None:
            f = self.settings.data_dir / "admin-token"
            token = f.read_text().strip() if f.exists() else None
        self.token = token
        self.as_json = as_json

    def client(self) -> Client:
        return Client(self.url, self.token)


pass_ctx = click.make_pass_decorator(Ctx)


def _fail(exc: Exception) -> None:
    err_console.print(f"[red]error:[/red] {exc}")
    sys.exit(2)


class EVCGroup(click.Group):
    """Print the API's message, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (APIError, EVCError) as exc:
            _fail(exc)


@click.group(cls=EVCGroup)
@click.option("--url", envvar="EVC_URL", help="EVC API URL (default: from settings, http://127.0.0.1:8080)")
@click.option("--token", envvar="EVC_TOKEN", help="bearer token (default: the local admin token)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable JSON output")
@click.pass_context
def main(ctx: click.Context, url: str | None, token: str | None, as_json: bool) -> None:
    """EVC — Edge Vision Cluster: provision, monitor, deploy to and train on edge devices over SSH."""
    ctx.obj = Ctx(url, token, as_json)


def emit(c: Ctx, data: Any, table: Callable[[Any], None] | None = None) -> None:
    if c.as_json or table is None:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        table(data)


# ----------------------------------------------------------------------------- up / sim
@main.command()
@click.option("--sim", "sim_devices", default=0, show_default=True, help="also start N simulated devices and register them")
@click.option("--flower", "flower_port", type=int, default=None, help="also start Flower on this port")
@click.option("--bind", default=None, help="API bind address (default EVC_API_BIND or 127.0.0.1:8080)")
@click.option("--api-workers", default=2, show_default=True)
@click.option("--concurrency", default=4, show_default=True, help="worker processes")
@pass_ctx
def up(c: Ctx, sim_devices: int, flower_port: int | None, bind: str | None, api_workers: int, concurrency: int) -> None:
    """Run EVC here: Redis (embedded unless EVC_REDIS_URL is set), API, worker, beat."""
    from evc.stack import Stack, pick_port

    settings = c.settings
    if bind:
        settings = settings.replace(api_bind=pick_port(bind))
    stack = Stack(settings, api_workers=api_workers, worker_concurrency=concurrency,
                  flower_port=flower_port, sim_devices=sim_devices)
    try:
        with console.status("starting EVC…"):
            stack.start()
        s = stack.settings
        console.print(f"[bold green]EVC is up[/bold green]  (data: {s.data_dir}, logs: {stack.log_dir})")
        console.print(f"  API        {s.api_url}/api/v1")
        console.print(f"  docs       {s.api_url}/api/v1/docs")
        console.print(f"  SSH key    curl -s {s.api_url}/api/v1/ssh-key?format=text")
        console.print(f"  Redis      {s.redis_url}")
        if flower_port:
            console.print(f"  Flower     http://127.0.0.1:{flower_port}")
        console.print(f"  admin token {stack.admin_token}  (also in {s.data_dir / 'admin-token'})")
        if sim_devices:
            console.print(f"  simulated fleet: {sim_devices} devices registering — try `evc device list`")
        console.print("Press Ctrl-C to stop.")
        stack.wait()
    finally:
        with console.status("stopping…"):
            stack.stop()
        console.print("stopped.")


@main.command()
@click.option("--devices", "n", default=3, show_default=True, help="how many devices")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="simulator state directory")
@click.option("--state-file", type=click.Path(path_type=Path), default=None, help="write the device list here (JSON)")
@click.option("--authorized-keys", type=click.Path(path_type=Path), default=None, help="public key file(s) to authorize")
@click.option("--privileges", default="user,sudo,root", show_default=True, help="privilege levels to cycle through")
@click.option("--prefix", default="sim", show_default=True)
@pass_ctx
def sim(c: Ctx, n: int, root: Path | None, state_file: Path | None, authorized_keys: Path | None,
        privileges: str, prefix: str) -> None:
    """Run N simulated edge devices (real SSH servers on loopback) until Ctrl-C."""
    from evc import keys
    from evc.sim import serve_forever

    root = root or c.settings.data_dir / "sim"
    state_file = state_file or root / "devices.json"
    if authorized_keys is None:
        keys.ensure_keypair(c.settings)
        authorized_keys = c.settings.key_path.with_suffix(".pub")
    serve_forever(n, root, state_file, authorized_keys, [p for p in privileges.split(",") if p], prefix=prefix)


@main.command("ssh-key")
@pass_ctx
def ssh_key(c: Ctx) -> None:
    """Print EVC's public key and the command that installs it on a device."""
    data = c.client().get("/api/v1/ssh-key")
    emit(c, data, lambda d: (click.echo(d["public_key"]), console.print(f"\n# on the device:\n{d['install_command']}")))


@main.command()
@click.option("--port", default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
@pass_ctx
def flower(c: Ctx, port: int, address: str) -> None:
    """Run Flower (Celery queue monitoring) against this EVC's broker."""
    import os

    from evc.settings import settings_env

    os.environ.update(settings_env(c.settings))
    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", "evc.workers.app", "flower",
                               f"--port={port}", f"--address={address}"])


# ----------------------------------------------------------------------------- tokens
@main.group()
def token() -> None:
    """Operator and enrollment tokens."""


@token.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, default=["read"], show_default=True, type=click.Choice(["admin", "read"]))
@click.option("--expires-in", type=int, default=None, help="seconds")
@pass_ctx
def token_create(c: Ctx, name: str, scopes: tuple[str, ...], expires_in: int | None) -> None:
    """Create an operator token (printed once)."""
    data = c.client().post("/api/v1/tokens", {"name": name, "scopes": list(scopes), "expires_in_s": expires_in})
    emit(c, data, lambda d: (console.print(f"created {d['id']} ({', '.join(d['scopes'])}); the token, shown once:"), click.echo(d["token"])))


@token.command("list")
@pass_ctx
def token_list(c: Ctx) -> None:
    """List operator tokens."""
    data = c.client().get("/api/v1/tokens", limit=500)
    emit(c, data, lambda d: _table(d["items"], ["id", "name", "scopes", "revoked", "created_by"]))


@token.command("revoke")
@click.argument("token_id")
@pass_ctx
def token_revoke(c: Ctx, token_id: str) -> None:
    """Revoke an operator token."""
    emit(c, c.client().delete(f"/api/v1/tokens/{token_id}"), lambda d: console.print(f"revoked {d['id']}"))


@token.command("enroll")
@click.option("--ttl", type=int, default=None, help="seconds the token stays valid")
@click.option("--uses", type=int, default=None, help="how many devices may register with it")
@click.option("--label", "labels", multiple=True, help="key=value given to devices registered with it")
@pass_ctx
def token_enroll(c: Ctx, ttl: int | None, uses: int | None, labels: tuple[str, ...]) -> None:
    """Create an enrollment token for device owners (printed once)."""
    body = {"ttl_s": ttl, "max_uses": uses, "labels": _labels(labels)}
    data = c.client().post("/api/v1/enrollments", body)
    emit(c, data, lambda d: (console.print(f"enrollment {d['id']}: {d['uses_left']} uses; the token, shown once:"), click.echo(d["token"])))


# ----------------------------------------------------------------------------- devices
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
def device_add(c: Ctx, name: str, host: str, port: int, username: str, labels: tuple[str, ...],
               jump: str | None, wait: bool) -> None:
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
@click.option("--cluster", default=None)
@click.option("--limit", default=100, show_default=True)
@click.option("--offset", default=0)
@pass_ctx
def device_list(c: Ctx, state: str | None, labels: tuple[str, ...], cluster: str | None, limit: int, offset: int) -> None:
    """List devices."""
    params: dict[str, Any] = {"state": state, "cluster": cluster, "limit": limit, "offset": offset}
    if labels:
        params["label"] = list(labels)
    data = c.client().get("/api/v1/devices", **params)
    emit(c, data, lambda d: (_table(d["items"], ["id", "name", "state", "host", "port", "username", "privilege", "level"]),
                             console.print(f"{len(d['items'])} of {d['total']}")))


@device.command("show")
@click.argument("device_id")
@pass_ctx
def device_show(c: Ctx, device_id: str) -> None:
    """Show a device, its facts and what its privilege level allows."""
    emit(c, c.client().get(f"/api/v1/devices/{device_id}"), _device_detail)


@device.command("rm")
@click.argument("device_id")
@pass_ctx
def device_rm(c: Ctx, device_id: str) -> None:
    """Remove a device from EVC."""
    emit(c, c.client().delete(f"/api/v1/devices/{device_id}"), lambda d: console.print(f"removed {d['id']} ({d['name']})"))


# ----------------------------------------------------------------------------- jobs
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
    emit(c, data, lambda d: (_table([{**j, "progress": f"{j['progress'].get('percent', 0)}%"} for j in d["items"]],
                                    ["id", "kind", "state", "progress", "created_by"]), console.print(f"{len(d['items'])} of {d['total']}")))


@job.command("show")
@click.argument("job_id")
@pass_ctx
def job_show(c: Ctx, job_id: str) -> None:
    """Show a job with its per-target results."""
    emit(c, c.client().get(f"/api/v1/jobs/{job_id}"), lambda d: click.echo(json.dumps(d, indent=2, default=str)))


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
    emit(c, c.client().post(f"/api/v1/jobs/{job_id}/cancel"), lambda d: console.print(f"{d['id']}: {d['state']} (cancel requested)"))


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
    t = Table(*cols)
    for r in rows:
        t.add_row(*[_cell(r.get(col)) for col in cols])
    console.print(t)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def _device_detail(d: dict[str, Any]) -> None:
    console.print(f"[bold]{d['name']}[/bold] {d['id']}  {d['username']}@{d['host']}:{d['port']}  state={d['state']}  level={d.get('level')}")
    if d.get("error"):
        console.print(f"  [red]error[/red]: {d['error'].get('message')}")
    f = d.get("facts") or {}
    if f:
        console.print(f"  {f.get('arch')}  {f.get('os')}  kernel {f.get('kernel')}  cpus {f.get('cpus')}  python {f.get('python3')}")
    if d.get("privilege"):
        console.print(f"  privilege: [bold]{d['privilege']}[/bold] — EVC can:")
        for cap in d.get("capabilities") or []:
            console.print(f"    • {cap}")


def _watch(c: Ctx, client: Client, job_id: str) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    job: dict[str, Any] = {}
    quiet = c.as_json
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, disable=quiet, transient=False) as prog:
        bar = prog.add_task(job_id, total=1)
        for job, events in client.follow(job_id):
            p = job.get("progress") or {}
            prog.update(bar, total=p.get("total") or 1, completed=p.get("done", 0),
                        description=f"{job['kind']} {job_id} [{job['state']}]")
            for e in events:
                if not quiet and e.get("message"):
                    host = e.get("host") or e.get("target") or ""
                    prog.console.print(f"  {e['seq']:>4} {host + ': ' if host else ''}{e['message']}")
    if not quiet:
        colour = {"succeeded": "green", "failed": "red"}.get(job["state"], "yellow")
        err_console.print(f"[{colour}]{job['state']}[/{colour}]" + (f": {job['error']['message']}" if job.get("error") else ""))
    return job


if __name__ == "__main__":
    main()
