"""`evc token`: operator and enrollment tokens."""

from __future__ import annotations

import click

from evc.choices import SCOPES
from evc.cli.common import Ctx, _labels, _table, console, emit, main, pass_ctx


@main.group()
def token() -> None:
    """Operator and enrollment tokens."""


@token.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, default=["read"], show_default=True, type=click.Choice(SCOPES))
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
