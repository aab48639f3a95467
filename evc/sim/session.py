"""One SSH exec/shell session on a simulated device: a real ``/bin/sh`` child, faithfully wired.

The child runs as the device's account with cwd and HOME in the device's home. Its stdin, stdout
and stderr (or a pseudo-terminal, when the client asked for one) are forwarded byte for byte,
EOF included; window-size changes and signals from the client reach it; its exit status (or the
signal that killed it) goes back to the client once its output has been drained. The ``slow``
and ``drop`` faults of the device act here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import signal
import struct
import termios
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncssh

from evc.sim.accounts import Account
from evc.sim.device import SimDevice

log = logging.getLogger(__name__)

SHELL = "/bin/sh"
CHUNK = 65536
#: variables the session sets itself; a client's env request cannot override them
RESERVED_ENV = frozenset(
    {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "MAIL", "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY"}
)

ServerProcess = asyncssh.SSHServerProcess[bytes]


class _Child:
    """A spawned command and the ends of its stdio that the session reads and writes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.outputs: list[tuple[asyncio.StreamReader, asyncssh.SSHWriter[bytes]]] = []
        self.master: int | None = None  # pty master, when the session has a terminal
        self.pty_writer: asyncio.WriteTransport | None = None
        self.pty_reader: asyncio.ReadTransport | None = None

    async def write(self, data: bytes) -> None:
        if self.pty_writer is not None:
            self.pty_writer.write(data)
        elif self.proc.stdin is not None:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()

    def write_eof(self) -> None:
        # Like sshd: EOF closes a pipe, but is ignored on a terminal (the shell reads on).
        if self.pty_writer is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def resize(self, size: tuple[int, int, int, int]) -> None:
        if self.master is not None:
            _set_winsize(self.master, size)

    def signal(self, name: str) -> None:
        sig = getattr(signal, f"SIG{name}", None)
        if isinstance(sig, signal.Signals) and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def close(self) -> None:
        for transport in (self.pty_writer, self.pty_reader):
            if transport is not None:
                transport.close()
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None


class _PtyOutput(asyncio.Protocol):
    """Feeds a pty master into a StreamReader; the EIO that ends a terminal is a plain EOF.

    (StreamReaderProtocol would turn it into an exception that hides output not yet read.)
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.reader.set_transport(transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.feed_eof()


def _set_winsize(fd: int, size: tuple[int, int, int, int]) -> None:
    width, height, pixwidth, pixheight = size
    if width and height:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixwidth, pixheight))


def _take_controlling_tty() -> None:  # pragma: no cover - runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def session_env(process: ServerProcess, device: SimDevice, account: Account) -> dict[str, str]:
    """The child's environment: the client's env requests, then what sshd sets at login."""
    env = filtered_env(process.env)
    conn = process.channel.get_connection()
    peer = conn.get_extra_info("peername") or ("", 0)
    sock = conn.get_extra_info("sockname") or ("", 0)
    env.update(
        HOME=str(device.home),
        USER=account.name,
        LOGNAME=account.name,
        SHELL=SHELL,
        PATH=account.path,
        SSH_CLIENT=f"{peer[0]} {peer[1]} {sock[1]}",
        SSH_CONNECTION=f"{peer[0]} {peer[1]} {sock[0]} {sock[1]}",
    )
    return env


async def _spawn(process: ServerProcess, device: SimDevice, account: Account) -> _Child:
    command = process.command
    term = process.term_type
    env = session_env(process, device, account)
    if command is not None:
        argv = [SHELL, "-c", command]
    else:
        argv = [SHELL, "-i"] if term else [SHELL]
    kw: dict[str, Any] = {"cwd": str(device.home), "env": env, "start_new_session": True}
    if not account.is_self:
        kw.update(user=account.uid, group=account.gid, extra_groups=list(account.groups))
    loop = asyncio.get_running_loop()
    if not term:
        p = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(*argv, stdin=p, stdout=p, stderr=p, **kw)
        child = _Child(proc)
        assert proc.stdout is not None and proc.stderr is not None
        child.outputs = [(proc.stdout, process.stdout), (proc.stderr, process.stderr)]
        return child
    master, slave = os.openpty()
    try:
        _set_winsize(master, process.term_size)
        tty_name = os.ttyname(slave)
        env.update(TERM=term, SSH_TTY=tty_name)
        if not account.is_self:  # like sshd: the session's terminal belongs to its user
            try:
                tty_gid = grp.getgrnam("tty").gr_gid
            except KeyError:
                tty_gid = -1
            os.chown(tty_name, account.uid, tty_gid)
            os.chmod(tty_name, 0o620)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=slave, stdout=slave, stderr=slave,
            preexec_fn=_take_controlling_tty, **kw,
        )  # fmt: skip
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    child = _Child(proc)
    child.master = master
    reader = asyncio.StreamReader(limit=CHUNK)
    child.pty_reader, _ = await loop.connect_read_pipe(lambda: _PtyOutput(reader), os.fdopen(os.dup(master), "rb", 0))
    child.pty_writer, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(os.dup(master), "wb", 0))
    child.outputs = [(reader, process.stdout)]
    return child


async def _forward_output(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> None:
    while True:
        data = await src.read(CHUNK)
        if not data:
            return
        try:
            dst.write(data)
            await dst.drain()
        except (BrokenPipeError, ConnectionError):
            return  # the channel is gone; the session notices and hangs up the command


async def _forward_input(process: ServerProcess, child: _Child) -> None:
    while True:
        try:
            data = await process.stdin.read(CHUNK)
        except asyncssh.TerminalSizeChanged as exc:
            child.resize(exc.term_size)
            continue
        except asyncssh.SignalReceived as exc:
            child.signal(exc.signal)
            continue
        except asyncssh.BreakReceived:
            child.signal("INT")
            continue
        if not data:
            break
        try:
            await child.write(data)
        except (BrokenPipeError, ConnectionResetError):
            return  # the command stopped reading; like sshd, drop the rest
    child.write_eof()


async def _wait_exit(child: _Child) -> int:
    """Wait until the command exited and its output is drained; return its return code."""
    pumps = [asyncio.ensure_future(_forward_output(src, dst)) for src, dst in child.outputs]
    try:
        if child.master is None:
            await asyncio.gather(*pumps)
            return await child.proc.wait()
        # On a terminal a background job may keep the pty open: stop once the shell is gone.
        rc = await child.proc.wait()
        await asyncio.wait(pumps, timeout=0.5)
        return rc
    finally:
        for t in pumps:
            t.cancel()


async def _reap(child: _Child, *, hang_up: bool) -> None:
    """Close our ends; on an abnormal end hang up the command's process group, then kill it."""
    child.close()
    if hang_up:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGHUP)
        try:
            await asyncio.wait_for(child.proc.wait(), 1.0)
        except TimeoutError:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
    await child.proc.wait()


def _report_exit(process: ServerProcess, rc: int) -> None:
    if rc >= 0:
        process.exit(rc)
        return
    try:
        name = signal.Signals(-rc).name.removeprefix("SIG")
    except ValueError:
        process.exit(128 - rc)
        return
    process.exit_with_signal(name)


async def _quietly(aws: list[asyncio.Future[Any]]) -> None:
    for t in aws:
        t.cancel()
    await asyncio.gather(*aws, return_exceptions=True)


async def run_session(
    process: ServerProcess,
    device: SimDevice,
    account: Account,
    children: set[asyncio.subprocess.Process],
) -> None:
    """asyncssh ``process_factory`` body: run the requested command or shell on the device."""
    if process.subsystem is not None:
        process.stderr.write(f"subsystem {process.subsystem!r} is not served here\n".encode())
        process.exit(1)
        return
    conn = process.channel.get_connection()
    mode, drop_after_s = device.mode, device.drop_after_s
    try:
        if mode == "slow":
            await asyncio.sleep(device.slow_s)
        child = await _spawn(process, device, account)
    except OSError as exc:
        process.stderr.write(f"sh: cannot run the command: {exc}\n".encode())
        process.exit(127)
        return
    children.add(child.proc)
    tasks: dict[str, asyncio.Future[Any]] = {
        "input": asyncio.ensure_future(_forward_input(process, child)),
        "exit": asyncio.ensure_future(_wait_exit(child)),
        "closed": asyncio.ensure_future(process.channel.wait_closed()),
    }
    if mode == "drop":
        # The command runs and its output flows, but the connection is cut before it can report
        # an exit status, however quickly it ends.
        tasks["drop"] = asyncio.ensure_future(asyncio.sleep(drop_after_s))
        watched = [tasks["drop"], tasks["closed"]]
    else:
        watched = [tasks["exit"], tasks["closed"]]
    normal_end = False
    try:
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if "drop" in tasks:
            if tasks["drop"].done():
                log.info("%s: cutting the connection mid-command (fault 'drop')", device.name)
                conn.abort()
        elif tasks["exit"].done():
            normal_end = True
            _report_exit(process, tasks["exit"].result())
    finally:
        children.discard(child.proc)
        await _quietly(list(tasks.values()))
        await _reap(child, hang_up=not normal_end)


def process_factory(
    device: SimDevice, account: Account, children: set[asyncio.subprocess.Process]
) -> Callable[[ServerProcess], Awaitable[None]]:
    """The ``process_factory`` for one device's listener."""

    async def handler(process: ServerProcess) -> None:
        try:
            await run_session(process, device, account, children)
        except Exception:
            log.exception("%s: session failed", device.name)
            with contextlib.suppress(Exception):
                process.exit(255)

    return handler


def filtered_env(env: Mapping[str, str]) -> dict[str, str]:
    """The client-supplied variables a session accepts (for callers building their own env)."""
    return {k: v for k, v in env.items() if k not in RESERVED_ENV and k.isidentifier()}
