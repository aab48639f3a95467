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

from evc import __version__, choices, cli_views, profiles
from evc.cli_format import Ref, percent, table
from evc.cli_format import show as show_table
from evc.client import TERMINAL, APIError, Client, is_local_url
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


# ----------------------------------------------------------------------------- up / sim
@main.command()
@click.option(
    "--sim", "sim_devices", default=0, show_default=True, help="also start N simulated devices and register them"
)
@click.option("--flower", "flower_port", type=int, default=None, help="also start Flower on this port")
@click.option("--bind", default=None, help="API bind address (default EVC_API_BIND or 127.0.0.1:8080)")
@click.option("--api-workers", default=2, show_default=True)
@click.option("--concurrency", default=4, show_default=True, help="worker processes")
@pass_ctx
def up(c: Ctx, sim_devices: int, flower_port: int | None, bind: str | None, api_workers: int, concurrency: int) -> None:
    """Run EVC here: Redis (embedded unless EVC_REDIS_URL is set), API, worker, beat.

    Private to you: the data directory is 0700, its files 0600, the embedded Redis has a
    password (in <data_dir>/redis/password) and listens on loopback. Refuses to start when the
    API address is taken. Exits non-zero, stopping everything, when a component dies; Ctrl-C or
    SIGTERM stops everything it started, simulated devices' programs included."""
    import signal

    from evc.stack import Stack, pick_port, redacted

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # a SIGTERM while starting still stops what was started

    signal.signal(signal.SIGTERM, interrupt)
    settings = c.settings
    if bind:
        settings = settings.replace(api_bind=pick_port(bind))
    stack = Stack(
        settings,
        api_workers=api_workers,
        worker_concurrency=concurrency,
        flower_port=flower_port,
        sim_devices=sim_devices,
        adopt_orphans=True,
    )
    try:
        with console.status("starting EVC…"):
            stack.start()
        s = stack.settings
        console.print(f"[bold green]EVC is up[/bold green]  (data: {s.data_dir}, logs: {stack.log_dir})")
        console.print(f"  API        {s.api_url}/api/v1")
        console.print(f"  docs       {s.api_url}/api/v1/docs")
        console.print(f"  SSH key    curl -s {s.api_url}/api/v1/ssh-key?format=text")
        if stack.redis:
            console.print(f"  Redis      {redacted(s.redis_url)}  (password in {stack.redis.data_dir / 'password'})")
        else:
            console.print(f"  Redis      {redacted(s.redis_url) or s.redis_sentinels}")
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
@click.option(
    "--authorized-keys", type=click.Path(path_type=Path), default=None, help="public key file(s) to authorize"
)
@click.option("--privileges", default="user,sudo,root", show_default=True, help="privilege levels to cycle through")
@click.option("--prefix", default="sim", show_default=True)
@click.option(
    "--ports-file",
    type=click.Path(path_type=Path),
    default=None,
    help="JSON {device name: port}: serve each device on the port it had before",
)
@pass_ctx
def sim(
    c: Ctx,
    n: int,
    root: Path | None,
    state_file: Path | None,
    authorized_keys: Path | None,
    privileges: str,
    prefix: str,
    ports_file: Path | None,
) -> None:
    """Run N simulated edge devices (real SSH servers on loopback) until Ctrl-C."""
    from evc import keys
    from evc.sim import serve_forever
    from evc.stack import read_ports

    root = root or c.settings.data_dir / "sim"
    state_file = state_file or root / "devices.json"
    if authorized_keys is None:
        keys.ensure_keypair(c.settings)
        authorized_keys = c.settings.key_path.with_suffix(".pub")
    serve_forever(
        n,
        root,
        state_file,
        authorized_keys,
        [p for p in privileges.split(",") if p],
        prefix=prefix,
        ports=read_ports(ports_file) if ports_file else None,
    )


@main.command("ssh-key")
@pass_ctx
def ssh_key(c: Ctx) -> None:
    """Print EVC's public key and the command that installs it on a device."""
    data = c.client().get("/api/v1/ssh-key")
    # plain echo, never rich: a wrapped install command breaks when copied and pasted
    emit(c, data, lambda d: click.echo(f"{d['public_key']}\n\n# on the device:\n{d['install_command']}"))


@main.command()
@click.option("--port", default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
@pass_ctx
def flower(c: Ctx, port: int, address: str) -> None:
    """Run Flower (Celery queue monitoring) against the running stack's broker (found in the
    data directory, or EVC_REDIS_URL), behind basic auth with a credential EVC keeps there."""
    import os

    from evc import flower as flower_

    try:
        fl = flower_.launch(c.settings, port, address)
    except EVCError as exc:
        err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(2)
    kept = c.settings.data_dir / flower_.AUTH_FILE
    err_console.print(f"Flower on {fl.url} (API: {fl.url}/api/workers, /api/tasks) — basic auth: user "
                      f"{fl.user}, password {fl.password} (kept in {kept})")  # fmt: skip
    os.execve(fl.argv[0], fl.argv, fl.env)  # noqa: S606 - an argument list, no shell: becomes Flower


# ----------------------------------------------------------------------------- tokens
@main.command()
@click.option(
    "--read-token-file",
    type=click.Path(path_type=Path),
    default=None,
    help="also create a read-only token (for Prometheus discovery) and write it here",
)
@click.option(
    "--reset-admin",
    is_flag=True,
    help="recovery: write a new admin token to <data_dir>/admin-token (when every admin token is lost or revoked)",
)
@pass_ctx
def bootstrap(c: Ctx, read_token_file: Path | None, reset_admin: bool) -> None:
    """Prepare a data directory and Redis for a deployment: EVC's SSH key pair and the first
    admin token (written to <data_dir>/admin-token, mode 0600). Idempotent.

    Lost or revoked every admin token? `evc bootstrap --reset-admin`, run by someone who can
    read the data directory and reach Redis (EVC_REDIS_URL with its password, or the embedded
    Redis of `evc up`, whose password is in <data_dir>/redis/password), writes a new admin token
    to <data_dir>/admin-token. Other tokens stay as they are; revoke them with `evc token revoke`."""
    import os

    from evc import auth, keys
    from evc.stack import local_redis
    from evc.store import Store

    keys.ensure_keypair(c.settings)
    token_file = c.settings.data_dir / "admin-token"
    with local_redis(c.settings) as settings:
        store = Store.from_settings(settings)
        store.ping()
        created = auth.ensure_admin_token(store, settings)
        if reset_admin and not created:
            rec = auth.reset_admin_token(store, settings)
            console.print(f"new admin token {rec['id']} written to {token_file}")
            console.print("  other tokens are as they were: `evc token list` shows them, `evc token revoke` ends one")
        else:
            console.print(
                f"SSH key: {settings.key_path}  admin token: "
                + ("created" if created else "exists")
                + f" ({token_file})"
            )
            console.print(
                "  lost every admin token? `evc bootstrap --reset-admin` (with access to this data "
                "directory and Redis) writes a new one there"
            )
        if read_token_file and not read_token_file.exists():
            _, tok = auth.create_operator_token(store, settings, "prometheus", ["read"], created_by="bootstrap")
            fd = os.open(read_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(tok + "\n")
            console.print(f"read token written to {read_token_file}")


@main.group()
def token() -> None:
    """Operator and enrollment tokens."""


@token.command("create")
@click.argument("name")
@click.option(
    "--scope", "scopes", multiple=True, default=["read"], show_default=True, type=click.Choice(choices.SCOPES)
)
@click.option("--expires-in", type=int, default=None, help="seconds")
@pass_ctx
def token_create(c: Ctx, name: str, scopes: tuple[str, ...], expires_in: int | None) -> None:
    """Create an operator token (printed once)."""
    data = c.client().post("/api/v1/tokens", {"name": name, "scopes": list(scopes), "expires_in_s": expires_in})
    emit(
        c,
        data,
        lambda d: (
            console.print(f"created {d['id']} ({', '.join(d['scopes'])}); the token, shown once:"),
            click.echo(d["token"]),
        ),
    )


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
@click.option(
    "--allow-network",
    "networks",
    multiple=True,
    help="CIDR devices registered with it must be in (repeatable); loopback needs e.g. 127.0.0.0/8",
)
@pass_ctx
def token_enroll(c: Ctx, ttl: int | None, uses: int | None, labels: tuple[str, ...], networks: tuple[str, ...]) -> None:
    """Create an enrollment token for device owners (printed once)."""
    body = {"ttl_s": ttl, "max_uses": uses, "labels": _labels(labels), "allow_networks": list(networks)}
    data = c.client().post("/api/v1/enrollments", body)
    emit(
        c,
        data,
        lambda d: (
            console.print(f"enrollment {d['id']}: {d['uses_left']} uses; the token, shown once:"),
            click.echo(d["token"]),
        ),
    )


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


# ----------------------------------------------------------------------------- federated learning
@job.command("retry")
@click.argument("job_id")
@click.option(
    "--on",
    "on",
    multiple=True,
    type=click.Choice(choices.RETRYABLE),
    help="which host outcomes to re-run (default both)",
)
@click.option("--wait/--no-wait", default=True, show_default=True)
@pass_ctx
def job_retry(c: Ctx, job_id: str, on: tuple[str, ...], wait: bool) -> None:
    """Re-run a provisioning job on its failed and unreachable hosts only."""
    client = c.client()
    j = client.post(f"/api/v1/jobs/{job_id}/retry", {"on": list(on)} if on else {})
    _finish(c, client, j, wait)


# ----------------------------------------------------------------------------- provisioning
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
    type=click.Choice(choices.LOCK_MODES),
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


# ----------------------------------------------------------------------------- clusters
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
@click.option("--profile", required=True, type=click.Choice(profiles.names()))
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
@click.option("--offline", type=click.Choice(choices.OFFLINE_POLICIES), default="skip", show_default=True)
@click.option("--wait/--no-wait", default=True, show_default=True)
@pass_ctx
def cluster_level(c: Ctx, cluster_id: str, target: int, check: bool, offline: str, wait: bool) -> None:
    """Raise every member to a function level (0 connected .. 4 application)."""
    client = c.client()
    j = client.post(f"/api/v1/clusters/{cluster_id}/level", {"target": target, "check": check, "offline": offline})
    _finish(c, client, j, wait)


# ----------------------------------------------------------------------------- fleet events and health
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


@main.group()
def fl() -> None:
    """Federated learning: jobs of rounds over devices, the FL client, data shards."""


def _targets(devices: tuple[str, ...], cluster: str | None) -> dict[str, Any]:
    if bool(devices) == bool(cluster):
        raise click.UsageError("give --device (repeatable) or --cluster")
    return {"cluster": cluster} if cluster else {"devices": list(devices)}


def _param(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} must be key=value", param_hint="--param")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _fl_rounds(view: dict[str, Any], last: int = 20) -> Table:
    fl_ = view.get("fl") or {}
    t = Table("round", "clients", "failed", "late", "train loss", "accuracy", "eval loss", "time",
              title=f"{view['id']}  [{view['state']}]  round {fl_.get('round', 0)}/{fl_.get('rounds_total')}"
                    f"  ({fl_.get('phase')})")  # fmt: skip
    for r in (fl_.get("rounds") or [])[-last:]:
        num = lambda v, f="{:.4f}": "-" if v is None else f.format(v)  # noqa: E731
        t.add_row(str(r["round"]), f"{r['num_clients']}/{len(r.get('selected') or [])}", str(len(r["failures"])),
                  str(len(r.get("late") or [])), num(r.get("train_loss")), num(r.get("eval_accuracy")),
                  num(r.get("eval_loss")), f"{r['duration_s'] * 1000:.0f} ms")  # fmt: skip
    return t


def _fl_watch(c: Ctx, client: Client, job_id: str, poll: float = 0.5) -> dict[str, Any]:
    """Follow an FL job with a live per-round table until it ends."""
    import time

    from rich.live import Live

    view = client.get(f"/api/v1/fl/jobs/{job_id}")
    if c.as_json:
        while view["state"] not in TERMINAL:
            time.sleep(poll)
            view = client.get(f"/api/v1/fl/jobs/{job_id}")
        return dict(view)
    with Live(_fl_rounds(view), console=console, refresh_per_second=4) as live:
        while view["state"] not in TERMINAL:
            time.sleep(poll)
            view = client.get(f"/api/v1/fl/jobs/{job_id}")
            live.update(_fl_rounds(view))
    colour = {"succeeded": "green", "failed": "red"}.get(view["state"], "yellow")
    why = f": {view['error']['message']}" if view.get("error") else ""
    why = why or (f": {view['summary']['stopped']}" if (view.get("summary") or {}).get("stopped") else "")
    err_console.print(f"[{colour}]{view['state']}[/{colour}]{why}")
    return dict(view)


@fl.command("start")
@click.option(
    "--device", "devices", multiple=True, type=DEVICE, help="device name or id (repeatable; order = client index)"
)
@click.option("--cluster", default=None, type=CLUSTER, help="train on this cluster's members")
@click.option(
    "--data", "data_path", required=True, help="shard path on each device, e.g. ~/.evc/fl/data/digits/shard.npz"
)
@click.option("--rounds", default=10, show_default=True)
@click.option("--model", default="softmax", show_default=True, help="softmax, mlp, mlp:<hidden> or module:<path>.py")
@click.option("--strategy", default="fedavg", show_default=True, type=click.Choice(choices.STRATEGIES))
@click.option("--param", "params", multiple=True, help="strategy parameter key=value (repeatable), e.g. mu=0.01")
@click.option("--fraction-fit", type=float, default=None)
@click.option("--min-fit-clients", type=int, default=None)
@click.option("--min-available-clients", type=int, default=None)
@click.option("--round-timeout", type=float, default=60.0, show_default=True)
@click.option("--local-epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--python", default=None, help="the Python on the devices (default: the cluster's, else python3)")
@click.option("--test-set", default=None, help="server-side test set to evaluate each round on")
@click.option("--queue", default="fl", show_default=True)
@click.option("--watch/--no-watch", default=True, show_default=True, help="follow the rounds live")
@pass_ctx
def fl_start(c: Ctx, devices: tuple[str, ...], cluster: str | None, data_path: str, params: tuple[str, ...],
             watch: bool, **opts: Any) -> None:  # fmt: skip
    """Start a federated learning job."""
    body = {**_targets(devices, cluster), "data": {"path": data_path}, "strategy_params": _param(params),
            **{k: v for k, v in opts.items() if v is not None}}  # fmt: skip
    client = c.client()
    job = client.post("/api/v1/fl/jobs", json=body)
    if not watch:
        emit(c, job, lambda j: console.print(f"FL job [bold]{j['id']}[/bold] queued"))
        return
    view = _fl_watch(c, client, job["id"])
    if c.as_json:
        emit(c, view)
    _exit_by_state(view)


def _exit_by_state(job: dict[str, Any]) -> None:
    """Exit 0 when the job succeeded, 1 otherwise (failed, partial, cancelled)."""
    sys.exit(0 if job["state"] == "succeeded" else 1)


@fl.command("show")
@click.argument("job_id")
@pass_ctx
def fl_show(c: Ctx, job_id: str) -> None:
    """An FL job and its per-round metrics."""
    emit(c, c.client().get(f"/api/v1/fl/jobs/{job_id}"), lambda v: console.print(_fl_rounds(v, last=10_000)))


@fl.command("watch")
@click.argument("job_id")
@pass_ctx
def fl_watch(c: Ctx, job_id: str) -> None:
    """Follow an FL job's rounds live (exit 1 unless it succeeds)."""
    view = _fl_watch(c, c.client(), job_id)
    if c.as_json:
        emit(c, view)
    _exit_by_state(view)


@fl.command("list")
@click.option("--limit", default=50, show_default=True)
@pass_ctx
def fl_list(c: Ctx, limit: int) -> None:
    """FL jobs, newest first."""
    data = c.client().get("/api/v1/fl/jobs", limit=limit)
    emit(c, data, lambda d: _table(d["items"], ["id", "state", "progress", "created_at"]))


@fl.command("stop")
@click.argument("job_id")
@pass_ctx
def fl_stop(c: Ctx, job_id: str) -> None:
    """Stop a job at its next round boundary."""
    emit(c, c.client().post(f"/api/v1/fl/jobs/{job_id}/stop"), lambda j: console.print(f"{j['id']}: stop requested"))


@fl.command("resume")
@click.argument("job_id")
@click.option("--watch/--no-watch", default=True, show_default=True)
@pass_ctx
def fl_resume(c: Ctx, job_id: str, watch: bool) -> None:
    """Resume a stopped or failed job from its last checkpoint."""
    client = c.client()
    job = client.post(f"/api/v1/fl/jobs/{job_id}/resume")
    if watch:
        job = _fl_watch(c, client, job_id)
    emit(c, job, lambda j: None)
    if watch:
        _exit_by_state(job)


@fl.command("model")
@click.argument("job_id")
@click.option("--round", "rnd", type=int, default=None, help="default: the latest")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="default: <job>-round-<N>.npz")
@pass_ctx
def fl_model(c: Ctx, job_id: str, rnd: int | None, output: Path | None) -> None:
    """Download the global model of a round (.npz: arr_0, arr_1, ... in parameter order)."""
    client = c.client()
    resp = client.session.get(f"{client.url}/api/v1/fl/jobs/{job_id}/model",
                              params={"round": rnd} if rnd is not None else None, timeout=client.timeout)  # fmt: skip
    if resp.status_code >= 400:
        raise APIError(resp.status_code, f"{resp.status_code} {resp.json().get('message', resp.reason)}")
    path = output or Path(f"{job_id}-round-{resp.headers.get('X-EVC-Round', rnd)}.npz")
    path.write_bytes(resp.content)
    console.print(f"wrote {path} (round {resp.headers.get('X-EVC-Round')}, {len(resp.content)} bytes)")


@fl.command("install")
@click.option("--device", "devices", multiple=True, type=DEVICE)
@click.option("--cluster", default=None, type=CLUSTER)
@click.option("--python", default=None, help="the Python on the devices, with numpy (default: the cluster's)")
@pass_ctx
def fl_install(c: Ctx, devices: tuple[str, ...], cluster: str | None, python: str | None) -> None:
    """Ship the FL client to devices (~/.evc/fl/client.py) and check their Python."""
    client = c.client()
    body = {**_targets(devices, cluster), **({"python": python} if python else {})}
    job = client.post("/api/v1/fl/install", json=body)
    job = _watch(c, client, job["id"])
    emit(c, client.get(f"/api/v1/jobs/{job['id']}"), _fl_results)
    _exit_by_state(job)


@fl.command("partition")
@click.option("--device", "devices", multiple=True, type=DEVICE, help="device (repeatable): device k gets shard k")
@click.option("--cluster", default=None, type=CLUSTER)
@click.option("--name", default="digits", show_default=True, help="dataset name (shard directory, test set)")
@click.option("--partition", "how", default="iid", show_default=True, type=click.Choice(choices.PARTITIONS))
@click.option("--alpha", default=0.5, show_default=True, help="Dirichlet concentration")
@click.option("--seed", default=42, show_default=True)
@click.option(
    "--path", default=None, help="shard path template on the devices (default ~/.evc/fl/data/{dataset}/shard.npz)"
)
@pass_ctx
def fl_partition(c: Ctx, devices: tuple[str, ...], cluster: str | None, name: str, how: str, alpha: float,
                 seed: int, path: str | None) -> None:  # fmt: skip
    """Split the digits dataset into per-device shards and push them over SFTP."""
    client = c.client()
    body = {**_targets(devices, cluster), "name": name, "partition": how, "alpha": alpha, "seed": seed}
    if path:
        body["path"] = path
    job = _watch(c, client, client.post("/api/v1/fl/partition", json=body)["id"])
    if job["state"] != "succeeded":
        emit(c, client.get(f"/api/v1/jobs/{job['id']}"), _fl_results)
        _exit_by_state(job)
    emit(c, job, lambda j: console.print(f"data path for `evc fl start --data`: {j['summary'].get('data_path')}"
                                         f"  test set: {j['summary'].get('test_set')}"))  # fmt: skip


def _fl_results(job: dict[str, Any]) -> None:
    """Per-device outcome of an install or partition job: ok, or the reason."""
    rows = [{"device": t, "ok": r.get("ok"), "why": (r.get("error") or {}).get("message", "")}
            for t, r in (job.get("results") or {}).items()]  # fmt: skip
    if rows:
        _table(rows, ["device", "ok", "why"])


# commands in their own modules, registered on the groups above
from evc import cli_fleet as _cli_fleet  # noqa: E402,F401

if __name__ == "__main__":
    main()
