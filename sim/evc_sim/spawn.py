"""Starting a session's command cheaply, as the device's account, and noticing when it ends.

The simulator is one big process (a thousand listeners, their connections and keys) serving
many commands a second, so how it starts them matters:

* **No fork of the simulator.** CPython starts a child with ``vfork`` (nothing copied) only when
  there is no ``preexec_fn`` and no ``user``/``group``/``extra_groups``; with them it
  ``fork``\\ s, copying the page tables of the whole simulator, and the loop blocks until the
  child has ``exec``\\ ed. Commands of the simulator's own user start with ``vfork`` directly.
  Commands (and SFTP) of a ``root`` device always go to a spawner of that device's own, which
  first enters the device's namespaces (:mod:`evc_sim.namespaces`) so that its commands
  inherit them; they never start any other way.
  Commands of another account (the ``user`` and ``sudo`` devices of a simulator run as root)
  go to a **spawner**: a small helper process per account, started once (``python -I -S`` on
  :mod:`evc_sim.spawn_helper`), that has switched to the account (supplementary groups, then
  gid, then uid, like CPython's ``extra_groups``/``group``/``user``) and starts each command the
  ``vfork`` way (no identity switch left to do) in a new session, with the working directory,
  environment and stdio descriptors (passed over a Unix socket) the simulator sends it, and
  reports its pid and, later, its wait status. Where no helper can run, ``setpriv``
  (util-linux; same switch, one ``exec`` more per command) is used; failing that, ``fork``.
  A terminal session's shell must take its terminal as controlling terminal between ``fork``
  and ``exec`` (a ``preexec_fn``): a spawner does that too, forking itself (a small process), for
  every account, the simulator's own included.
* **No thread per child.** asyncio's default child watcher in Python 3.11 starts a thread per
  child to wait for it. A local child is watched through a pidfd (Linux 5.3+) registered with
  the loop that started it: no thread, and no process-wide watcher (a global
  ``PidfdChildWatcher`` is attached to one loop and would break subprocesses on every other
  loop of the process). Without pidfds, one waiting thread per child, as asyncio does.

Either way a command keeps its pid (the process group and session it leads), so the simulator
signals and kills it as before; it is root, so it may signal any account's processes.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import errno
import functools
import logging
import marshal
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evc_sim import cpuquota, spawn_helper
from evc_sim.spawn_helper import REQUEST_MAX, commands_start_with_default_signals, take_controlling_tty

if TYPE_CHECKING:
    from evc_sim.accounts import Account
    from evc_sim.namespaces import Isolation

__all__ = [
    "HELPERS_ENV",
    "REQUEST_MAX",
    "ChildProcess",
    "Spawner",
    "commands_start_with_default_signals",
    "helpers_supported",
    "launch_options",
    "setpriv_prefix",
    "spawn_here",
]

log = logging.getLogger(__name__)

#: room for a batch of replies from a spawner: at most 64 of them, each holding at most a path
_REPLY_MAX = 512 * 1024
#: environment variable: ``0`` turns the per-account spawner processes off (setpriv instead)
HELPERS_ENV = "EVC_SIM_SPAWN_HELPERS"


class ChildProcess:
    """A started command: its pid and, once it has ended and been reaped, its return code.

    The return code is CPython's: the exit status, or minus the number of the signal that
    killed it. Created on, and used from, the thread of the loop that watches it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def _ended(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self._exited.set_result(returncode)

    def add_exit_callback(self, callback: Callable[[ChildProcess], object]) -> None:
        """Call ``callback(self)`` from the loop once the command has ended (soon, if it has)."""
        self._exited.add_done_callback(lambda _: callback(self))

    async def wait(self) -> int:
        """The return code, once the command has ended (cancelling the wait leaves it watched)."""
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        """SIGKILL the command itself, unless it was reaped already (its pid may be reused)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        """Send *sig* to the command's process group (it leads its own session)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


class _LocalChild(ChildProcess):
    """A child of this process, reaped when its pidfd turns readable."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        super().__init__(popen.pid)
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self._pidfd = -1
        if _pidfds_work():
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(self.pid)
        if self._pidfd >= 0:
            self._loop.add_reader(self._pidfd, self._pidfd_ready)
        else:  # pragma: no cover - only without pidfds
            threading.Thread(target=self._wait_in_thread, name=f"evc-sim-wait-{self.pid}", daemon=True).start()

    def _pidfd_ready(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: the status is lost
            pid, status = self.pid, 255 << 8
        if pid == 0:  # pragma: no cover - a readable pidfd means the process has ended
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._set_status(status)

    def _wait_in_thread(self) -> None:  # pragma: no cover - only without pidfds
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 255 << 8
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._set_status, status)

    def _set_status(self, status: int) -> None:
        rc = os.waitstatus_to_exitcode(status)
        self._popen.returncode = rc  # so that Popen neither reaps nor warns
        self._ended(rc)


@functools.cache
def _pidfds_work() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


# -- starting commands here (vfork; setpriv or fork for another account) -------------------------


def _identity_kw(account: Account) -> dict[str, Any]:
    return {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}


@functools.cache
def _setpriv() -> str | None:
    from evc_sim.accounts import DEFAULT_PATH

    return shutil.which("setpriv", path=DEFAULT_PATH)


def setpriv_prefix(account: Account) -> list[str] | None:
    """``setpriv`` arguments that run a command as *account*; None where setpriv is missing."""
    setpriv = _setpriv()
    if setpriv is None:
        return None
    groups = f"--groups={','.join(str(g) for g in account.groups)}" if account.groups else "--clear-groups"
    return [setpriv, f"--reuid={account.uid}", f"--regid={account.gid}", groups, "--"]


_launch_cache: dict[Account, tuple[tuple[str, ...], dict[str, Any]]] = {}
_launch_lock = threading.Lock()


def launch_options(account: Account) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(argv prefix, Popen keywords) that start a command as *account* from this process.

    The account itself: nothing. Another account: the ``setpriv`` prefix, once a trial run has
    shown that it works here; otherwise CPython's ``user``/``group``/``extra_groups``.
    """
    if account.is_self:
        return (), {}
    with _launch_lock:
        if account not in _launch_cache:
            _launch_cache[account] = _choose_launch(account)
        return _launch_cache[account]


def _choose_launch(account: Account) -> tuple[tuple[str, ...], dict[str, Any]]:
    prefix = setpriv_prefix(account)
    if prefix is None:
        log.info("setpriv is not installed: commands of %s start the slow way (fork)", account.name)
        return (), _identity_kw(account)
    probe = [*prefix, "/bin/sh", "-c", 'test "$(id -u):$(id -g)" = "$0"', f"{account.uid}:{account.gid}"]
    try:
        ok = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("setpriv cannot run here (%s): commands of %s start the slow way (fork)", exc, account.name)
        return (), _identity_kw(account)
    if ok.returncode != 0:
        log.warning("setpriv does not switch to %s here (%s): commands start the slow way (fork)",
                    account.name, ok.stderr.decode(errors="replace").strip())  # fmt: skip
        return (), _identity_kw(account)
    return tuple(prefix), {}


def spawn_here(
    argv: Sequence[str],
    account: Account,
    *,
    cwd: str,
    env: Mapping[str, str],
    stdin: int,
    stdout: int,
    stderr: int,
    controlling_tty: bool = False,
) -> ChildProcess:
    """Start *argv* as a child of this process, as *account*, leading a new session (and with
    its stdin as controlling terminal, if *controlling_tty*).

    Raises OSError when it cannot start (a missing working directory, for one).
    """
    if controlling_tty:  # fork anyway: switch identity there, without an extra exec
        prefix: tuple[str, ...] = ()
        kw = {} if account.is_self else _identity_kw(account)
    else:
        prefix, kw = launch_options(account)
    popen = subprocess.Popen(
        [*prefix, *argv], stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
        start_new_session=True, preexec_fn=take_controlling_tty if controlling_tty else None, **kw,
    )  # fmt: skip
    return _LocalChild(popen)


# -- the per-account spawner processes ------------------------------------------------------------


class _HelperUnavailable(Exception):
    """The request could not go through a spawner process: start the command here instead."""


@functools.cache
def helpers_supported() -> bool:
    """Whether spawner processes can run here (Linux, :mod:`evc_sim.spawn_helper` on disk)."""
    return (
        sys.platform.startswith("linux")
        and hasattr(socket, "SOCK_SEQPACKET")
        and bool(sys.executable)
        and spawn_helper.__file__.endswith(".py")
        and os.path.isfile(spawn_helper.__file__)
    )


class _Helper:
    """The simulator's end of one account's spawner process."""

    def __init__(
        self,
        account: Account,
        on_gone: Callable[[_Helper], None],
        isolation: Isolation | None = None,
        cgroup: Path | None = None,
    ) -> None:
        self.account = account
        self.isolation = isolation
        self.cgroup = cgroup
        self.loop = asyncio.get_running_loop()
        self.started = 0  # commands started through it
        self.dead = False
        self._on_gone = on_gone
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            groups = ",".join(str(g) for g in account.groups)
            argv = [
                sys.executable,
                "-I",
                "-S",
                spawn_helper.__file__,
                str(theirs.fileno()),
                str(account.uid),
                str(account.gid),
                groups,
                *([isolation.to_arg()] if isolation is not None else []),
            ]
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), start_new_session=True,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if cgroup is not None:  # before it is asked for anything: its children inherit the group
            try:
                cpuquota.add_pid(cgroup, popen.pid)
            except OSError:
                popen.kill()
                popen.wait()
                ours.close()
                raise
        ours.setblocking(False)
        self.sock = ours
        self.process = _LocalChild(popen)
        self._next_id = 0
        self._queue: collections.deque[tuple[int, bytes, tuple[int, int, int]]] = collections.deque()
        self._writing = False
        self._starting: dict[int, asyncio.Future[ChildProcess]] = {}
        self._running: dict[int, ChildProcess] = {}
        self._buf = bytearray(_REPLY_MAX)
        self.loop.add_reader(ours.fileno(), self._readable)

    async def spawn(
        self, argv: Sequence[str], cwd: str, env: Mapping[str, str], fds: tuple[int, int, int], ctty: bool
    ) -> ChildProcess:
        """Have the helper start *argv*; *fds* (stdin, stdout, stderr) stay the caller's to close."""
        if self.dead:
            raise _HelperUnavailable
        self._next_id += 1
        req_id = self._next_id
        payload = marshal.dumps((req_id, list(argv), dict(env), cwd, ctty))
        if len(payload) > REQUEST_MAX:
            raise _HelperUnavailable
        started: asyncio.Future[ChildProcess] = self.loop.create_future()
        self._starting[req_id] = started
        self._queue.append((req_id, payload, fds))
        self._flush()
        try:
            return await started
        finally:
            if not started.done():  # cancelled: the helper must not start it, or must kill it
                started.cancel()
                if any(q[0] == req_id for q in self._queue):  # not sent yet
                    self._queue = collections.deque(q for q in self._queue if q[0] != req_id)
                    del self._starting[req_id]

    def _flush(self) -> None:
        while self._queue and not self.dead:
            req_id, payload, fds = self._queue[0]
            try:
                self.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError as exc:
                self._gone(f"cannot write to it: {exc}")
                return
            self._queue.popleft()
        if self._writing and not self.dead:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        while not self.dead:
            try:
                size = self.sock.recv_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._gone(f"cannot read from it: {exc}")
                return
            if not size:
                self._gone("it exited")
                return
            for reply in marshal.loads(self._buf[:size]):
                self._reply(reply)

    def _reply(self, reply: tuple[Any, ...]) -> None:
        kind = reply[0]
        if kind == "x":  # (x, pid, wait status): a command ended
            child = self._running.pop(reply[1], None)
            if child is not None:
                child._ended(os.waitstatus_to_exitcode(reply[2]))
        elif kind == "s":  # (s, request, pid): started
            child = ChildProcess(reply[2])
            self._running[child.pid] = child
            self.started += 1
            started = self._starting.pop(reply[1], None)
            if started is None or started.done():  # its session went away meanwhile
                child.signal_group(signal.SIGKILL)
            else:
                started.set_result(child)
        elif kind in ("e", "v"):  # (e, request, errno, strerror, filename) / (v, request, what)
            started = self._starting.pop(reply[1], None)
            if started is not None and not started.done():
                started.set_exception(OSError(*reply[2:]) if kind == "e" else ValueError(reply[2]))

    def _gone(self, why: str) -> None:
        """The helper is gone: fail what waits on it and kill what it started."""
        if self.dead:
            return
        self.dead = True
        log.warning("spawner process of %s (pid %d): %s", self.account.name, self.process.pid, why)
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self._queue.clear()
        for started in self._starting.values():
            if not started.done():
                started.set_exception(_HelperUnavailable())
        self._starting.clear()
        for child in self._running.values():  # nobody can reap them for us any more
            child.signal_group(signal.SIGKILL)
            child._ended(-signal.SIGKILL)
        self._running.clear()
        self.process.kill()
        self._on_gone(self)

    def close(self) -> None:
        """Let the helper go (it exits when its socket closes)."""
        if not self.dead:
            self.dead = True
            self.loop.remove_reader(self.sock.fileno())
            if self._writing:
                self.loop.remove_writer(self.sock.fileno())
            self.sock.close()


class Spawner:
    """Starts the session commands of one simulator; use it from the loop that serves it.

    *helpers* None: spawner processes unless the environment variable ``EVC_SIM_SPAWN_HELPERS``
    is ``0``.
    """

    def __init__(self, *, helpers: bool | None = None) -> None:
        if helpers is None:
            helpers = os.environ.get(HELPERS_ENV, "1") != "0"
        self.use_helpers = helpers and helpers_supported()
        commands_start_with_default_signals()
        self._helpers: dict[tuple[Account, Isolation | None, Path | None], _Helper] = {}
        self._retired: list[_Helper] = []
        self._broken: set[Account] = set()

    async def spawn(
        self,
        argv: Sequence[str],
        account: Account,
        *,
        cwd: str,
        env: Mapping[str, str],
        stdin: int,
        stdout: int,
        stderr: int,
        controlling_tty: bool = False,
        isolation: Isolation | None = None,
        cgroup: Path | None = None,
    ) -> ChildProcess:
        """Start *argv* as *account* leading a new session, with the given stdio descriptors (and
        stdin as its controlling terminal, if *controlling_tty*); inside the namespaces
        *isolation* describes, if given (always through a spawner process of its own); in the
        cgroup *cgroup* (:mod:`evc_sim.cpuquota`), if given (through a spawner process of its own,
        moved into that cgroup when it starts, so the command and its children are in it).

        The descriptors stay the caller's to close once this returns. Raises OSError when the
        command cannot start (a missing working directory, for one).
        """
        if isolation is not None or cgroup is not None:  # isolated: never the host's uid 0
            if not self.use_helpers:
                why = "a simulated root device or CPU quota needs spawner processes (Linux)"
                raise OSError(errno.ENOSYS, why)
            try:
                return await self._helper(account, isolation, cgroup).spawn(
                    argv, cwd, env, (stdin, stdout, stderr), controlling_tty
                )
            except _HelperUnavailable:
                why = "the device's namespaces or cgroup are not available (see the simulator's log)"
                raise OSError(errno.EAGAIN, why) from None
        if (controlling_tty or not account.is_self) and self.use_helpers and account not in self._broken:
            try:
                return await self._helper(account).spawn(argv, cwd, env, (stdin, stdout, stderr), controlling_tty)
            except _HelperUnavailable:
                pass
        return spawn_here(
            argv, account, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
            controlling_tty=controlling_tty,
        )  # fmt: skip

    def _helper(self, account: Account, isolation: Isolation | None = None, cgroup: Path | None = None) -> _Helper:
        key = (account, isolation, cgroup)
        helper = self._helpers.get(key)
        if helper is None or helper.dead:
            try:
                helper = _Helper(account, self._helper_gone, isolation, cgroup)
            except OSError as exc:
                log.warning("cannot start a spawner process for %s (%s): using setpriv", account.name, exc)
                if isolation is None:
                    self._broken.add(account)
                raise _HelperUnavailable from exc
            self._helpers[key] = helper
        return helper

    def forget(self, cgroup: Path) -> None:
        """Stop the spawner processes that start commands in *cgroup* (a device going away)."""
        for key, helper in list(self._helpers.items()):
            if key[2] == cgroup:
                del self._helpers[key]
                self._retired.append(helper)
                helper.close()

    def _helper_gone(self, helper: _Helper) -> None:
        key = (helper.account, helper.isolation, helper.cgroup)
        if self._helpers.get(key) is helper:
            del self._helpers[key]
        self._retired.append(helper)
        if not helper.started and helper.isolation is None and helper.cgroup is None:  # never worked
            log.warning("commands of %s start through setpriv from now on", helper.account.name)
            self._broken.add(helper.account)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the spawner processes (commands they started are not waited for)."""
        helpers = [*self._helpers.values(), *self._retired]
        self._helpers.clear()
        self._retired.clear()
        for helper in helpers:
            helper.close()
        for helper in helpers:
            try:
                await asyncio.wait_for(helper.process.wait(), timeout)
            except TimeoutError:
                helper.process.kill()
                await helper.process.wait()
