"""One SSH exec/shell session on a simulated device: a real ``/bin/sh`` child, faithfully wired.

The child runs as the device's account with cwd and HOME in the device's home. Its stdin, stdout
and stderr (or a pseudo-terminal, when the client asked for one) are forwarded byte for byte,
EOF included; window-size changes and signals from the client reach it; its exit status (or the
signal that killed it) goes back to the client once its output has been drained. The ``slow``
and ``drop`` faults of the device act here.

At a thousand devices every bit of per-command work counts: the command is started by the
simulator's :class:`~evc_sim.spawn.Spawner` (no fork of the simulator, no thread per command),
and its output is forwarded by loop callbacks on the raw pipe descriptors rather than through
asyncio's subprocess transports, stream readers and one task per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import grp
import inspect
import logging
import os
import signal
import struct
import termios
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncssh
from asyncssh.constants import EXTENDED_DATA_STDERR

from evc_sim import cpuquota
from evc_sim.accounts import Account
from evc_sim.device import SimDevice
from evc_sim.namespaces import Isolation
from evc_sim.spawn import ChildProcess, Spawner

log = logging.getLogger(__name__)

SHELL = "/bin/sh"
#: OpenSSH's sftp-server, which serves SFTP inside a root device's namespaces
SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/lib/sftp-server", "/usr/libexec/openssh/sftp-server")
CHUNK = 65536
#: stop reading a command's output while the channel holds more than this unsent (asyncssh's
#: default high-water mark: above it the channel pauses the session until the client's window
#: opens again)
HIGH_WATER = 65536
#: on a terminal, how long to forward output after the shell exited (a background job may keep
#: the terminal open)
PTY_GRACE_S = 0.5
#: variables the session sets itself; a client's env request cannot override them
RESERVED_ENV = frozenset(
    {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "MAIL", "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY"}
)

ServerProcess = asyncssh.SSHServerProcess[bytes]


class _Wiring:
    """The ends of a command's stdio that the session holds, forwarded by loop callbacks.

    Output (stdout and stderr pipes, or the pty master) is read when the loop reports it
    readable and written to the channel at once; reading pauses while the channel's send buffer
    is above :data:`HIGH_WATER` (the client's window is full) until it drains. ``finished``
    resolves to the command's return code once it has exited and its output has been forwarded
    to EOF (on a terminal: once the shell has exited, waiting at most :data:`PTY_GRACE_S` for
    the rest of its output, since a background job may keep the terminal open).
    """

    def __init__(
        self,
        process: ServerProcess,
        child: ChildProcess,
        *,
        stdin: int,
        outputs: list[tuple[int, asyncssh.SSHWriter[bytes]]],
        master: int | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.child = child
        self.master = master
        self.finished: asyncio.Future[int] = self.loop.create_future()
        self._chan = process.channel
        self._stdin: int | None = stdin
        self._fds = {stdin, *(fd for fd, _ in outputs)}  # ours to close
        self._reading: dict[int, asyncssh.SSHWriter[bytes]] = dict(outputs)
        self._draining: set[asyncio.Task[None]] = set()  # waiting for the channel to drain
        self._writing = False  # waiting for room in the command's stdin
        self._grace: asyncio.TimerHandle | None = None
        for fd, writer in outputs:
            self.loop.add_reader(fd, self._readable, fd, writer)
        child.add_exit_callback(self._check_finished)

    # -- output ---------------------------------------------------------------------------------

    def _readable(self, fd: int, writer: asyncssh.SSHWriter[bytes]) -> None:
        try:
            data = os.read(fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: the terminal's other side is closed, which is its EOF
            data = b""
        if not data:
            self._stop_reading(fd)
            return
        try:
            writer.write(data)
        except OSError:  # the channel is gone; the session notices and hangs up the command
            self._stop_reading(fd)
            return
        if self._chan.get_write_buffer_size() > HIGH_WATER:
            self.loop.remove_reader(fd)
            task = self.loop.create_task(self._read_after_drain(fd, writer))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _read_after_drain(self, fd: int, writer: asyncssh.SSHWriter[bytes]) -> None:
        try:
            await writer.drain()
        except (OSError, asyncssh.Error):
            self._stop_reading(fd)
            return
        if fd in self._reading:
            self.loop.add_reader(fd, self._readable, fd, writer)

    def _stop_reading(self, fd: int) -> None:
        if self._reading.pop(fd, None) is not None:
            self.loop.remove_reader(fd)
            self._check_finished(self.child)

    def _check_finished(self, child: ChildProcess) -> None:
        rc = child.returncode
        if rc is None or self.finished.done():
            return
        if not self._reading:
            self.finished.set_result(rc)
        elif self.master is not None and self._grace is None:
            self._grace = self.loop.call_later(PTY_GRACE_S, self._give_up_output)

    def _give_up_output(self) -> None:
        if not self.finished.done() and self.child.returncode is not None:
            self.finished.set_result(self.child.returncode)

    # -- input ----------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Write all of *data* to the command's stdin (or terminal); OSError once it is gone."""
        fd = self._stdin
        if fd is None:
            raise BrokenPipeError("stdin is closed")
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except (BlockingIOError, InterruptedError):
                await self._writable(fd)
                continue
            view = view[n:]

    async def _writable(self, fd: int) -> None:
        ready = self.loop.create_future()
        self.loop.add_writer(fd, _resolve, ready)
        self._writing = True
        try:
            await ready
        finally:
            self._writing = False
            self.loop.remove_writer(fd)

    def write_eof(self) -> None:
        # Like sshd: EOF closes a pipe, but is ignored on a terminal (the shell reads on).
        if self.master is None and self._stdin is not None:
            fd, self._stdin = self._stdin, None
            self._fds.discard(fd)
            os.close(fd)

    def resize(self, size: tuple[int, int, int, int]) -> None:
        if self.master is not None:
            _set_winsize(self.master, size)

    def signal(self, name: str) -> None:
        sig = getattr(signal, f"SIG{name}", None)
        if isinstance(sig, signal.Signals) and self.child.returncode is None:
            self.child.signal_group(sig)

    def close(self) -> None:
        """Stop forwarding and close our ends (the command gets EOF / SIGPIPE / a hang-up)."""
        if self._grace is not None:
            self._grace.cancel()
        for task in self._draining:
            task.cancel()
        for fd in self._reading:
            self.loop.remove_reader(fd)
        self._reading.clear()
        if self._writing and self._stdin is not None:
            self.loop.remove_writer(self._stdin)
        self._stdin = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_winsize(fd: int, size: tuple[int, int, int, int]) -> None:
    width, height, pixwidth, pixheight = size
    if width and height:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixwidth, pixheight))


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


def sftp_server() -> str | None:
    """The path of OpenSSH's sftp-server, if it is installed."""
    return next((p for p in SFTP_SERVERS if os.access(p, os.X_OK)), None)


async def _start(
    process: ServerProcess, device: SimDevice, account: Account, spawner: Spawner, isolation: Isolation | None
) -> _Wiring:
    """Start the session's command (see :mod:`evc_sim.spawn`) and wire it to the channel."""
    env = session_env(process, device, account)
    argv, term = session_argv(process)
    cgroup = cpuquota.group_of(device.name) if device.cpus is not None else None
    start = functools.partial(spawner.spawn, argv, account, cwd=str(device.home), isolation=isolation, cgroup=cgroup)
    if not term:
        return await _start_on_pipes(process, start, env)
    return await _start_on_terminal(process, start, env, term, account, isolation)


def session_argv(process: ServerProcess) -> tuple[list[str], str | None]:
    """The session's command line and its terminal type (None: no terminal, pipes)."""
    term = process.term_type
    if process.subsystem is not None:  # sftp, on a root device (run_session checked)
        return [sftp_server() or "sftp-server"], None
    if process.command is not None:
        return [SHELL, "-c", process.command], term
    return ([SHELL, "-i"] if term else [SHELL]), term


#: :meth:`Spawner.spawn` with the command, account, cwd and namespaces given: it takes the
#: environment and stdio descriptors (keywords)
_Start = Callable[..., Awaitable[ChildProcess]]


async def _start_on_pipes(process: ServerProcess, start: _Start, env: dict[str, str]) -> _Wiring:
    fds: list[int] = []
    try:
        for _ in range(3):
            fds.extend(os.pipe())
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    in_r, in_w, out_r, out_w, err_r, err_w = fds
    ours = (in_w, out_r, err_r)
    try:
        child = await start(env=env, stdin=in_r, stdout=out_w, stderr=err_w)
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    for fd in ours:
        os.set_blocking(fd, False)
    return _Wiring(process, child, stdin=in_w, outputs=[(out_r, process.stdout), (err_r, process.stderr)])


async def _start_on_terminal(
    process: ServerProcess,
    start: _Start,
    env: dict[str, str],
    term: str,
    account: Account,
    isolation: Isolation | None,
) -> _Wiring:
    master, slave = os.openpty()
    try:
        _set_winsize(master, process.term_size)
        tty_name = os.ttyname(slave)
        env.update(TERM=term, SSH_TTY=tty_name)
        _give_terminal(tty_name, account, isolation)
        child = await start(env=env, stdin=slave, stdout=slave, stderr=slave, controlling_tty=True)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    return _Wiring(process, child, stdin=master, outputs=[(master, process.stdout)], master=master)


def _give_terminal(tty_name: str, account: Account, isolation: Isolation | None) -> None:
    """Like sshd: the session's terminal belongs to its user (on a root device, the host uid that
    is root in its user namespace)."""
    shift = isolation.uid_base if isolation is not None else 0
    if not account.is_self or shift:
        try:
            tty_gid = grp.getgrnam("tty").gr_gid + shift
        except KeyError:
            tty_gid = -1
        os.chown(tty_name, account.uid + shift, tty_gid)
        os.chmod(tty_name, 0o620)


async def _forward_input(process: ServerProcess, wiring: _Wiring) -> None:
    while True:
        try:
            data = await process.stdin.read(CHUNK)
        except asyncssh.TerminalSizeChanged as exc:
            wiring.resize(exc.term_size)
            continue
        except asyncssh.SignalReceived as exc:
            wiring.signal(exc.signal)
            continue
        except asyncssh.BreakReceived:
            wiring.signal("INT")
            continue
        if not data:
            break
        try:
            await wiring.write(data)
        except OSError:
            return  # the command stopped reading; like sshd, drop the rest
    wiring.write_eof()


async def _reap(child: ChildProcess, *, hang_up: bool) -> None:
    """On an abnormal end hang up the command's process group, then kill it; wait for it."""
    if hang_up:
        child.signal_group(signal.SIGHUP)
        try:
            await asyncio.wait_for(child.wait(), 1.0)
        except TimeoutError:
            pass
        child.signal_group(signal.SIGKILL)
        child.kill()
    if child.returncode is None:
        await child.wait()


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
    children: set[ChildProcess],
    spawner: Spawner,
    isolation: Isolation | None = None,
) -> None:
    """asyncssh ``process_factory`` body: run the requested command or shell on the device (and,
    on a root device, whose files the simulator must not touch as the host's root, SFTP: OpenSSH's
    sftp-server in the device's namespaces)."""
    if process.subsystem is not None and not (isolation is not None and process.subsystem == "sftp" and sftp_server()):
        process.stderr.write(f"subsystem {process.subsystem!r} is not served here\n".encode())
        process.exit(1)
        return
    conn = process.channel.get_connection()
    mode, drop_after_s = device.mode, device.drop_after_s
    try:
        if mode == "slow":
            await asyncio.sleep(device.slow_s)
        wiring = await _start(process, device, account, spawner, isolation)
    except OSError as exc:
        process.stderr.write(f"sh: cannot run the command: {exc}\n".encode())
        process.exit(127)
        return
    child = wiring.child
    children.add(child)
    tasks: dict[str, asyncio.Future[Any]] = {
        "input": asyncio.ensure_future(_forward_input(process, wiring)),
        "closed": asyncio.ensure_future(process.channel.wait_closed()),
    }
    if mode == "drop":
        # The command runs and its output flows, but the connection is cut before it can report
        # an exit status, however quickly it ends.
        tasks["drop"] = asyncio.ensure_future(asyncio.sleep(drop_after_s))
        watched = [tasks["drop"], tasks["closed"]]
    else:
        watched = [wiring.finished, tasks["closed"]]
    normal_end = False
    try:
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if "drop" in tasks:
            if tasks["drop"].done():
                log.info("%s: cutting the connection mid-command (fault 'drop')", device.name)
                conn.abort()
        elif wiring.finished.done():
            normal_end = True
            _report_exit(process, wiring.finished.result())
    finally:
        children.discard(child)
        await _quietly(list(tasks.values()))
        wiring.close()
        await _reap(child, hang_up=not normal_end)


def process_factory(
    device: SimDevice,
    account: Account,
    children: set[ChildProcess],
    spawner: Spawner,
    isolation: Isolation | None = None,
) -> Callable[[ServerProcess], Awaitable[None]]:
    """The ``process_factory`` for one device's listener."""

    async def handler(process: ServerProcess) -> None:
        try:
            await run_session(process, device, account, children, spawner, isolation)
        except Exception:
            log.exception("%s: session failed", device.name)
            with contextlib.suppress(Exception):
                process.exit(255)

    return handler


class NamespacedSession(asyncssh.SSHServerProcess[bytes]):
    """A session of a root device: like asyncssh's, but SFTP goes to the process factory too
    (which runs OpenSSH's sftp-server in the device's namespaces) instead of to an SFTP server in
    this process, which would act on the host's files as the host's root."""

    def subsystem_requested(self, subsystem: str) -> bool:
        return True  # (run_session refuses what it does not serve)

    def session_started(self) -> None:
        chan = self._chan
        if chan is None or chan.get_subsystem() is None:
            super().session_started()
            return
        stdin = asyncssh.SSHReader[bytes](self, chan)
        stdout = asyncssh.SSHWriter[bytes](self, chan)
        stderr = asyncssh.SSHWriter[bytes](self, chan, EXTENDED_DATA_STDERR)
        assert self._session_factory is not None and self._conn is not None
        handler = self._session_factory(stdin, stdout, stderr)
        if inspect.isawaitable(handler):
            self._conn.create_task(handler, stdin.logger)


def filtered_env(env: Mapping[str, str]) -> dict[str, str]:
    """The client-supplied variables a session accepts (for callers building their own env)."""
    return {k: v for k, v in env.items() if k not in RESERVED_ENV and k.isidentifier()}
