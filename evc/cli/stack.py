"""`evc up`, `evc bootstrap`, `evc flower`: run EVC here and prepare its data directory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from evc.cli.common import Ctx, console, err_console, main, pass_ctx
from evc.errors import EVCError


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

    from evc import simulator
    from evc.stack import Stack, pick_port, redacted

    if sim_devices:
        simulator.require()  # before anything starts

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
        console.print(f"  console    {s.api_url}/ui  (sign in with the admin token below, or a read token)")
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
    from evc.context import NO_QUEUE, Caller, Context
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
            boot = Context(store, settings, NO_QUEUE, Caller("bootstrap"))  # enqueues nothing
            _, tok = auth.create_operator_token(boot, "prometheus", ["read"])
            fd = os.open(read_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(tok + "\n")
            console.print(f"read token written to {read_token_file}")
