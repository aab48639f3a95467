"""The one asyncssh adapter: connect to a device with EVC's key and its pinned host key, run
commands, and turn every failure into an :mod:`evc.errors` DeviceError with an actionable reason."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncssh

from evc.errors import (
    AuthRefused,
    CommandFailed,
    ConnectionDropped,
    DeviceError,
    HostKeyMismatch,
    JumpHostKeyMismatch,
    SSHTimeout,
    Unreachable,
)
from evc.settings import Settings


@dataclass(frozen=True)
class Target:
    """Where and as whom to connect; ``host_key`` is the pinned key (None: trust on first use)."""

    host: str
    port: int
    username: str
    host_key: str | None = None
    jump: Target | None = None
    device_id: str | None = None

    @property
    def address(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"


def target_of(device: Mapping[str, Any]) -> Target:
    jump = device.get("jump_host") or None
    jt = None
    if jump:
        jt = Target(jump["host"], int(jump.get("port", 22)), jump["username"], jump.get("host_key"))
    return Target(
        device["host"], int(device["port"]), device["username"], device.get("host_key") or None,
        jt, device.get("id"),
    )  # fmt: skip


def key_line(key: asyncssh.SSHKey) -> str:
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def _ciphers(settings: Settings) -> list[str]:
    return [c.strip() for c in settings.ssh_ciphers.split(",") if c.strip()]


def _trust(host_key: str | None) -> Any:
    if host_key is None:
        return None
    return ([asyncssh.import_public_key(host_key)], [], [])


def _map_error(exc: BaseException, target: Target, settings: Settings, stage: str) -> DeviceError:
    did = target.device_id
    where = target.address
    if isinstance(exc, DeviceError):
        return exc
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return HostKeyMismatch(
            f"the host key of {where} does not match the key pinned at registration; if the "
            "device was reinstalled, an admin can re-pin it (POST /api/v1/devices/{id}/host-key)",
            device_id=did,
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return AuthRefused(
            f"{where} refused EVC's key: install it as {target.username!r} on the device with "
            f"`curl -s {settings.api_url}/api/v1/ssh-key?format=sh | sh`, or append the key from "
            "GET /api/v1/ssh-key to ~/.ssh/authorized_keys",
            device_id=did,
        )
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return SSHTimeout(f"{where} did not answer within the time limit during {stage}", device_id=did)
    if isinstance(exc, ConnectionRefusedError):
        return Unreachable(f"{where} refused the connection (is sshd running on port {target.port}?)", device_id=did)
    if isinstance(exc, socket.gaierror):
        return Unreachable(f"cannot resolve host {target.host!r}", device_id=did)
    if isinstance(exc, asyncssh.ConnectionLost | asyncssh.DisconnectError | BrokenPipeError | ConnectionResetError):
        return ConnectionDropped(f"the connection to {where} dropped during {stage}: {exc}", device_id=did)
    if isinstance(exc, OSError):
        return Unreachable(f"cannot reach {where}: {exc.strerror or exc}", device_id=did)
    if isinstance(exc, asyncssh.Error):
        return ConnectionDropped(f"SSH error with {where} during {stage}: {exc}", device_id=did)
    return DeviceError(f"unexpected error with {where} during {stage}: {exc!r}", device_id=did)


def _map_jump_error(exc: BaseException, target: Target, settings: Settings) -> DeviceError:
    """An error on the hop to the jump host, named as the jump host's (not the device's)."""
    assert target.jump is not None
    jump = target.jump
    where = f"jump host {jump.address}"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return JumpHostKeyMismatch(
            f"the host key of {where} changed: it does not match the key pinned when "
            f"{target.address} was registered; if the jump host was reinstalled, an admin can "
            're-pin it (POST /api/v1/devices/{id}/host-key with {"jump_host_key": null})',
            device_id=target.device_id,
            jump_host=jump.address,
        )
    err = _map_error(exc, jump, settings, "connect")
    err.message = f"{where} (on the way to {target.address}): {err.message}"
    err.args = (err.message,)
    err.device_id = target.device_id
    err.details["jump_host"] = jump.address
    return err


def _unpinned_jump(target: Target) -> JumpHostKeyMismatch:
    assert target.jump is not None
    return JumpHostKeyMismatch(
        f"jump host {target.jump.address} has no pinned host key; re-pin the device "
        "(POST /api/v1/devices/{id}/host-key) to record it",
        device_id=target.device_id,
        jump_host=target.jump.address,
    )


#: seconds without traffic before a connection sends a keepalive (see SSHPool for pooled ones)
KEEPALIVE_S = 30.0


async def _open(target: Target, settings: Settings, tunnel: Any = None, **kw: Any) -> asyncssh.SSHClientConnection:
    kw.setdefault("keepalive_interval", KEEPALIVE_S)
    return await asyncio.wait_for(
        asyncssh.connect(
            target.host, target.port, username=target.username, client_keys=[str(settings.key_path)],
            known_hosts=_trust(target.host_key), agent_path=None, tunnel=tunnel,
            encryption_algs=_ciphers(settings), **kw,
        ),
        settings.ssh_connect_timeout_s,
    )  # fmt: skip


async def _open_jump(target: Target, settings: Settings, *, learn_keys: bool = False) -> asyncssh.SSHClientConnection:
    """The connection to *target*'s jump host, its key checked (learned only with *learn_keys*)."""
    assert target.jump is not None
    if target.jump.host_key is None and not learn_keys:
        raise _unpinned_jump(target)
    try:
        return await _open(target.jump, settings)
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise _map_jump_error(exc, target, settings) from exc


async def connect(
    target: Target, settings: Settings, *, learn_keys: bool = False, **kw: Any
) -> asyncssh.SSHClientConnection:
    """Open a connection with host keys pinned; raises DeviceError.

    A device key of None is trusted on first use (registration). A jump host's key is always
    checked against its pin; only with *learn_keys* (registration, re-pin) may a jump host
    without one be trusted on first use. The jump connection belongs to the device's: closing
    one closes both, so a reconnection never leaves a hop open. The key the jump host
    presented is :func:`jump_host_key` of the returned connection."""
    tunnel = await _open_jump(target, settings, learn_keys=learn_keys) if target.jump else None
    try:
        conn = await _open(target, settings, tunnel, **kw)
    except BaseException as exc:
        if tunnel is not None:
            tunnel.close()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise _map_error(exc, target, settings, "connect") from exc
    if tunnel is not None:
        jump_key = tunnel.get_server_host_key()
        conn.set_extra_info(evc_jump_host_key=key_line(jump_key) if jump_key else None)
        conn.set_tunnel(tunnel)  # asyncssh closes the tunnel with the connection
    return conn


async def check_jump_host(target: Target, settings: Settings) -> DeviceError | None:
    """Why the jump host of *target* cannot be used with its pinned key (a changed or missing
    pin, or it cannot be reached), or None when it can (or there is none). For tools that hop
    through it themselves (Ansible's ProxyJump) and say only that the device was unreachable."""
    if target.jump is None:
        return None
    try:
        conn = await _open_jump(target, settings)
    except DeviceError as exc:
        return exc
    conn.close()
    return None


def jump_host_key(conn: asyncssh.SSHClientConnection) -> str | None:
    """The host key line the jump host of *conn* presented (None: no jump host)."""
    value = conn.get_extra_info("evc_jump_host_key")
    return str(value) if value else None


@asynccontextmanager
async def session(
    target: Target, settings: Settings, *, learn_keys: bool = False
) -> AsyncIterator[asyncssh.SSHClientConnection]:
    conn = await connect(target, settings, learn_keys=learn_keys)
    try:
        yield conn
    finally:
        conn.close()
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(conn.wait_closed(), 5.0)


async def run(
    conn: asyncssh.SSHClientConnection,
    command: str,
    target: Target,
    settings: Settings,
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float | None = None,
) -> asyncssh.SSHCompletedProcess:
    """Run *command* (already quoted by the caller) and return the completed process."""
    try:
        res = await asyncio.wait_for(
            conn.run(command, input=input, check=False), timeout or settings.ssh_command_timeout_s
        )
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise _map_error(exc, target, settings, "command") from exc
    if res.exit_status is None and res.exit_signal is None:
        raise ConnectionDropped(
            f"{target.address} closed the channel before the command ended", device_id=target.device_id
        )
    if check and res.exit_status != 0:
        raise CommandFailed(
            f"command failed on {target.address} with exit status {res.exit_status}",
            exit_status=res.exit_status, stderr=str(res.stderr or ""), device_id=target.device_id,
        )  # fmt: skip
    return res
