"""`evc sim`: simulated edge devices."""

from __future__ import annotations

from pathlib import Path

import click

from evc.cli.common import Ctx, main, pass_ctx


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
@click.option(
    "--cpus",
    default="",
    help="real CPU limits cycled over the devices, e.g. 0.25,0.5,1 (cgroup CPU quotas; needs root)",
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
    cpus: str,
) -> None:
    """Run N simulated edge devices (real SSH servers on loopback) until Ctrl-C."""
    from evc import keys, simulator
    from evc.stack import read_ports

    simulator.require()  # a distribution of its own (sim/): imported only now
    from evc_sim import cpuquota, serve_forever

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
        cpus=cpuquota.parse_cpus_list(cpus),
    )
