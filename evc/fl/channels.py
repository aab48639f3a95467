"""FL on the device over SSH: long-lived client channels, and shipping files (client, shards).

A :class:`ClientChannel` is one ``<python> ~/.evc/fl/client.py --data <shard>`` process on a
device, started once over an SSH channel of the connection :mod:`evc.pool` keeps for that
device, and spoken to with the line-delimited JSON protocol of :mod:`evc.fl.protocol` for the
whole job. The :class:`~evc.fl.registry.ChannelRegistry` keeps them per (job, device) on the
worker process's event-loop thread; the process's :class:`~evc.runtime.WorkerRuntime` owns it
(:func:`registry_for`), so they outlive the Celery task that opened them.

The trade-off: a Celery prefork worker runs each task in one of its N child processes, and a
channel cannot move between processes. A round's task that lands in a process holding no channel
for its (job, device) opens one there, so a job pays at most one client start per (job, device,
worker process) -- N per device in the worst case, usually in the first rounds -- where Flower's
deployment runtime starts processes for every round (~17 s per round for 10 clients on a 2-core
machine). Channels unused for ``fl_channel_idle_s`` close, and so do, within a few seconds, the
channels of a job that is no longer running (the registry asks ``job_alive``).

Replies carry the request's ``id``; a reply to an earlier request (a fit that outlived its round)
is discarded when it is read and handed back as *late*, so a slow device never desynchronises the
stream. Every failure is an :mod:`evc.errors` DeviceError with the client's last stderr lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import posixpath
import shlex
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncssh

from evc import pool as pooling
from evc import ssh
from evc.errors import (
    CommandFailed,
    ConnectionDropped,
    DeviceError,
    SSHTimeout,
    ValidationError,
)
from evc.fl.protocol import CLIENT_MODELS_PATH, CLIENT_PATH, decode_message, encode_message
from evc.runtime import WorkerRuntime
from evc.settings import Settings
from evc.store import JSON

if TYPE_CHECKING:
    from evc.fl.registry import ChannelRegistry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: where the FL client lives on a device, relative to the account's home
REMOTE_DIR = ".evc/fl"
REMOTE_CLIENT = f"{REMOTE_DIR}/client.py"


# ---------------------------------------------------------------------- commands and paths
def python_hint(python: str, where: str, error: str) -> str:
    """Why *python* on the device *where* cannot run the FL client (*error*: its last stderr
    line), and what to do about it."""
    if "numpy" in error:
        return (
            f"{python} on {where} has no numpy; raise the cluster to L1 (its devenv provides "
            "numpy) or set python (`evc fl install/start --python`, the cluster's fl-client "
            f"python var) to an interpreter that has it ({error})"
        )
    if "not found" in error or "No such file" in error:
        return (
            f"{python} on {where} does not exist; raise the cluster to L1 or set python to an "
            f"interpreter the device has ({error})"
        )
    return f"{python} on {where} cannot run the FL client: {error}"


def how_it_ended(exit_status: int | None, exit_signal: object = None) -> str:
    """How a device process ended, in words: ``exit status 3``, or for a signal (SSH's
    exit-signal, or a shell's status 128+n) ``killed by SIGKILL — out of memory?`` (the kernel's
    OOM killer sends SIGKILL). Pure."""
    name = ""
    if exit_signal:
        raw = str(exit_signal[0] if isinstance(exit_signal, tuple | list) else exit_signal)
        name = raw if raw.startswith("SIG") else f"SIG{raw}"
    elif exit_status is not None and 128 < exit_status < 128 + 65:
        try:
            name = signal.Signals(exit_status - 128).name
        except ValueError:
            name = ""
    if not name:
        return f"exit status {exit_status}" if exit_status is not None else "ended without an exit status"
    hint = " — out of memory?" if name == "SIGKILL" else ""
    return f"killed by {name}{hint}"


def shell_path(path: str) -> str:
    """*path* for a POSIX shell command line: ``~/x`` keeps ``$HOME`` expansion, the rest quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def sftp_path(path: str) -> str:
    """*path* for SFTP, where relative paths start in the home: ``~/x`` becomes ``x``."""
    if path.startswith("~/"):
        return path[2:]
    if path.startswith("~"):
        raise ValidationError(f"only ~/ paths are supported, got {path!r}")
    return path


def client_command(python: str, data_path: str, client_path: str = "~/" + REMOTE_CLIENT) -> str:
    """The command that runs the FL client for one job on a device."""
    return f"exec {shell_path(python)} {shell_path(client_path)} --data {shell_path(data_path)}"


@dataclass(frozen=True)
class ClientSpec:
    """How to start a job's client on one device: interpreter, client file and data shard."""

    python: str
    data_path: str
    client_path: str = "~/" + REMOTE_CLIENT

    @property
    def command(self) -> str:
        return client_command(self.python, self.data_path, self.client_path)


# ---------------------------------------------------------------------- one channel
class ClientChannel:
    """One running client process on a device, spoken to one request at a time."""

    def __init__(self, key: tuple[str, str], process: asyncssh.SSHClientProcess[bytes], spec: ClientSpec) -> None:
        self.key = key
        self.process = process
        self.spec = spec
        self.lock = asyncio.Lock()
        self.started = time.time()
        self.last_used = time.monotonic()
        self.dead = False
        self.pid: int | None = None
        self.device_name = key[1]  # the device's name where known, for messages
        self.num_examples: int | None = None
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._stderr = asyncio.ensure_future(self._drain_stderr())

    @property
    def device_id(self) -> str:
        return self.key[1]

    async def _drain_stderr(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                line = await self.process.stderr.readline()
                if not line:
                    return
                self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())

    async def request(self, message: Mapping[str, Any], deadline: float, late: list[JSON]) -> dict[str, Any]:
        """Send *message* (with an ``id``) and return the reply carrying that id.

        Replies to earlier requests are appended to *late*. *deadline* is in
        ``loop.time()``; past it :class:`SSHTimeout` is raised and the channel stays usable.
        """
        loop = asyncio.get_running_loop()
        self.last_used = time.monotonic()
        try:
            self.process.stdin.write(encode_message(message))
            await asyncio.wait_for(self.process.stdin.drain(), max(0.001, deadline - loop.time()))
        except TimeoutError:
            raise SSHTimeout(
                f"the FL client did not take {message.get('op')!r} in time", device_id=self.device_id
            ) from None
        except (BrokenPipeError, ConnectionError, asyncssh.Error) as exc:
            self.dead = True
            raise ConnectionDropped(
                f"the SSH channel to the FL client dropped: {exc}", device_id=self.device_id
            ) from exc
        return await self.reply(message.get("id"), deadline, late, op=str(message.get("op")))

    async def reply(self, rid: Any, deadline: float, late: list[JSON], op: str = "request") -> dict[str, Any]:
        """Read replies until the one with id *rid*; earlier ones go to *late*."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                line = await asyncio.wait_for(self.process.stdout.readline(), remaining)
                if not line or not line.endswith(b"\n"):
                    self.dead = True
                    raise await self._ended()
                reply = decode_message(line, device_id=self.device_id)
                if reply.get("id") != rid:
                    late.append({"id": reply.get("id"), "op": reply.get("op"),
                                 "round": reply.get("round")})  # fmt: skip
                    continue
                self.last_used = time.monotonic()
                return reply
        except TimeoutError:
            raise SSHTimeout(f"the FL client did not answer {op!r} in time", device_id=self.device_id) from None
        except (BrokenPipeError, ConnectionError, asyncssh.Error) as exc:
            self.dead = True
            raise ConnectionDropped(
                f"the SSH channel to the FL client dropped: {exc}", device_id=self.device_id
            ) from exc

    async def _ended(self) -> DeviceError:
        """The error for a client whose output ended: exit status and last stderr lines."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.process.wait_closed(), 1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._stderr, 0.5)
        status = self.process.exit_status
        tail = "\n".join(self.stderr_tail)
        last = self.stderr_tail[-1] if self.stderr_tail else ""
        if status is None and self.process.exit_signal is None:
            return ConnectionDropped(
                "the FL client's channel closed before it exited (device or connection lost)",
                device_id=self.device_id,
            )
        signalled = self.process.exit_signal
        what = how_it_ended(None if signalled else status, signalled)  # asyncssh: status -1 on a signal
        if status in (126, 127) or "No module named 'numpy'" in last:  # it never started
            return CommandFailed(python_hint(self.spec.python, self.device_name, last or what),
                                 exit_status=status, stderr=tail, device_id=self.device_id)  # fmt: skip
        message = f"the FL client was {what}" if what.startswith("killed") else f"the FL client exited ({what})"
        return CommandFailed(
            message + (f": {last}" if last else ""), exit_status=None if signalled else status, stderr=tail,
            device_id=self.device_id,
        )  # fmt: skip

    def close(self) -> None:
        """End the client: EOF on its stdin makes it exit; the channel is closed after that."""
        self.dead = True
        with contextlib.suppress(Exception):
            self.process.stdin.write_eof()
        with contextlib.suppress(Exception):
            self.process.close()
        self._stderr.cancel()


# ---------------------------------------------------------------------- this process's channels
def registry_for(
    settings: Settings,
    job_alive: Callable[[str], bool] | None = None,
    on_late: Callable[[str, str, JSON], None] | None = None,
) -> ChannelRegistry:
    """This process's registry for *settings* (created on first use; a fork starts afresh):
    the one of :class:`~evc.runtime.WorkerRuntime`."""
    return WorkerRuntime.current().channels(settings, job_alive, on_late)


def local_registries() -> list[ChannelRegistry]:
    """The registries this process has created (none are created here)."""
    rt = WorkerRuntime.peek()
    return rt.registries() if rt is not None else []


def close_registries(timeout: float = 5.0) -> None:
    """Close every channel of this process (worker process shutdown); best effort."""
    rt = WorkerRuntime.peek()
    if rt is not None:
        rt.close_channels(timeout)


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Start *coro* on this process's loop thread; the caller waits on the future."""
    return asyncio.run_coroutine_threadsafe(coro, pooling.process_loop().loop)


def wait(
    future: concurrent.futures.Future[T],
    deadline: float,
    tick: Callable[[], bool] | None = None,
    interval: float = 1.0,
) -> T:
    """Wait for *future* until *deadline* (``time.time()``), calling *tick* every *interval*
    seconds (a lease refresh, a stop check): when it returns False the future is cancelled
    and :class:`concurrent.futures.CancelledError` raised."""
    try:
        while True:
            remaining = deadline - time.time()
            try:
                return future.result(max(0.0, min(interval, remaining)))
            except concurrent.futures.TimeoutError:
                if remaining <= interval:
                    raise SSHTimeout("no reply by the round deadline") from None
                if tick is not None and not tick():
                    future.cancel()
                    raise concurrent.futures.CancelledError() from None
    except BaseException:
        future.cancel()
        raise


# ---------------------------------------------------------------------- shipping files
async def put_file(conn: asyncssh.SSHClientConnection, path: str, data: bytes) -> str:
    """Write *data* to *path* on the device atomically (temp file + rename), creating the
    directories; ``~/`` paths are in the home. Returns the SFTP path written."""
    target = sftp_path(path)
    async with conn.start_sftp_client() as sftp:
        parent = posixpath.dirname(target)
        if parent:
            await sftp.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(target)}.{os.getpid()}.tmp")
        async with sftp.open(tmp, "wb") as fh:
            await fh.write(data)
        try:
            await sftp.posix_rename(tmp, target)
        except (asyncssh.SFTPOpUnsupported, asyncssh.SFTPFailure):
            with contextlib.suppress(asyncssh.SFTPError):
                await sftp.remove(target)
            await sftp.rename(tmp, target)
    return target


async def push(settings: Settings, device: Mapping[str, Any], path: str, data: bytes) -> str:
    """:func:`put_file` over the device's pooled connection."""

    async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> str:
        try:
            return await put_file(conn, path, data)
        except asyncssh.SFTPError as exc:
            raise CommandFailed(
                f"cannot write {path} on {target.address}: {exc.reason}", device_id=target.device_id
            ) from exc

    return await pooling.pool_for(settings).use(device, op)


#: run by the configured python on the device: numpy present, and the client's own version
_CHECK = (
    "import sys, numpy; sys.path.insert(0, sys.argv[1]); import client; client.models_module(); "
    "print(sys.version.split()[0], numpy.__version__, client.PROTOCOL_VERSION)"
)


async def install_client(settings: Settings, device: Mapping[str, Any], python: str = "python3") -> JSON:
    """Ship the FL client to ``~/.evc/fl/client.py`` (``fl_models.py`` beside it) and check *python* runs it with numpy.

    Returns what to record on the device as ``fl_client``. Raises :class:`CommandFailed`
    naming what is missing (python, numpy) and how to fix it.
    """
    data = CLIENT_PATH.read_bytes()
    await push(settings, device, f"~/{REMOTE_DIR}/fl_models.py", CLIENT_MODELS_PATH.read_bytes())
    await push(settings, device, "~/" + REMOTE_CLIENT, data)

    async def check(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
        cmd = f"{shell_path(python)} -c {shlex.quote(_CHECK)} {shell_path('~/' + REMOTE_DIR)}"
        res = await ssh.run(conn, cmd, target, settings, check=False)
        if res.exit_status != 0:
            err = str(res.stderr or "").strip().splitlines()
            last = err[-1] if err else how_it_ended(None if res.exit_signal else res.exit_status, res.exit_signal)
            where = str(device.get("name") or target.address)
            raise CommandFailed(
                f"cannot run the FL client: {python_hint(python, where, last)}",
                exit_status=res.exit_status, stderr=str(res.stderr or ""),
                device_id=target.device_id,
            )  # fmt: skip
        py, np_version, proto = str(res.stdout).split()[:3]
        return {
            "path": "~/" + REMOTE_CLIENT,
            "python": python,
            "python_version": py,
            "numpy": np_version,
            "protocol": int(proto),
            "sha256": hashlib.sha256(data).hexdigest(),
            "installed_at": time.time(),
        }

    return await pooling.pool_for(settings).use(device, check)


__all__ = [
    "REMOTE_CLIENT",
    "REMOTE_DIR",
    "ClientChannel",
    "ClientSpec",
    "client_command",
    "close_registries",
    "install_client",
    "python_hint",
    "local_registries",
    "push",
    "put_file",
    "registry_for",
    "sftp_path",
    "shell_path",
    "submit",
    "wait",
]
