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
  this file), that has switched to the account (supplementary groups, then gid, then uid, like
  CPython's ``extra_groups``/``group``/``user``) and starts each command the ``vfork`` way (no
  identity switch left to do) in a new session, with the working directory, environment and
  stdio descriptors (passed over a Unix socket) the simulator sends it, and reports its pid
  and, later, its wait status. Where no helper can run, ``setpriv``
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
import fcntl
import functools
import logging
import marshal
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (not imported at run time: the helper runs this file without the package)
    from evc_sim.accounts import Account
    from evc_sim.namespaces import Isolation

log = logging.getLogger(__name__)

#: a spawn request (argv, environment, working directory) larger than this goes the setpriv way
REQUEST_MAX = 128 * 1024
#: room for a batch of replies from a spawner: at most 64 of them, each holding at most a path
_REPLY_MAX = 512 * 1024
_FD_BYTES = array.array("i").itemsize
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


# -- signal dispositions of the commands ---------------------------------------------------------

#: signals that CPython's Popen already resets for its child (``restore_signals``), and SIGCHLD,
#: which the spawner handles itself
_RESTORED_BY_POPEN = frozenset({"SIGPIPE", "SIGXFZ", "SIGXFSZ", "SIGCHLD", "SIGKILL", "SIGSTOP"})


def _ignore(signum: int, frame: object) -> None:  # pragma: no cover - a signal handler
    """Ignore a signal the way a handler does: unlike ``SIG_IGN``, a handler is not inherited."""


def commands_start_with_default_signals() -> None:
    """Make the commands this thread starts begin as sshd starts them: every signal at its default
    disposition and none blocked.

    An ignored signal stays ignored across ``exec`` (``nohup`` ignores SIGHUP; a shell's
    background job ignores SIGINT and SIGQUIT) and the signal mask is inherited; a *handled*
    signal is reset to its default. So each signal this process ignores gets a handler that does
    nothing (the same for this process, not inherited), and this thread's mask is cleared. The
    ``vfork`` start keeps working: no ``preexec_fn``. Dispositions can only be changed from the
    main thread; elsewhere only the mask is cleared.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signal.Signals:
        if sig.name in _RESTORED_BY_POPEN:
            continue
        with contextlib.suppress(OSError, ValueError):
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, _ignore)


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
        start_new_session=True, preexec_fn=_take_controlling_tty if controlling_tty else None, **kw,
    )  # fmt: skip
    return _LocalChild(popen)


def _take_controlling_tty() -> None:  # pragma: no cover - runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


# -- the per-account spawner processes ------------------------------------------------------------


class _HelperUnavailable(Exception):
    """The request could not go through a spawner process: start the command here instead."""


@functools.cache
def helpers_supported() -> bool:
    """Whether spawner processes can run here (Linux, this file on disk)."""
    return (
        sys.platform.startswith("linux")
        and hasattr(socket, "SOCK_SEQPACKET")
        and bool(sys.executable)
        and __file__.endswith(".py")
        and os.path.isfile(__file__)
    )


class _Helper:
    """The simulator's end of one account's spawner process."""

    def __init__(
        self, account: Account, on_gone: Callable[[_Helper], None], isolation: Isolation | None = None
    ) -> None:
        self.account = account
        self.isolation = isolation
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
                __file__,
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
        self._helpers: dict[tuple[Account, Isolation | None], _Helper] = {}
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
    ) -> ChildProcess:
        """Start *argv* as *account* leading a new session, with the given stdio descriptors (and
        stdin as its controlling terminal, if *controlling_tty*); inside the namespaces
        *isolation* describes, if given (always through a spawner process of its own).

        The descriptors stay the caller's to close once this returns. Raises OSError when the
        command cannot start (a missing working directory, for one).
        """
        if isolation is not None:  # never started anywhere else: that would be the host's uid 0
            if not self.use_helpers:
                raise OSError(errno.ENOSYS, "a simulated root device needs spawner processes (Linux)")
            try:
                return await self._helper(account, isolation).spawn(
                    argv, cwd, env, (stdin, stdout, stderr), controlling_tty
                )
            except _HelperUnavailable:
                why = "the device's namespaces are not available (see the simulator's log)"
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

    def _helper(self, account: Account, isolation: Isolation | None = None) -> _Helper:
        key = (account, isolation)
        helper = self._helpers.get(key)
        if helper is None or helper.dead:
            try:
                helper = _Helper(account, self._helper_gone, isolation)
            except OSError as exc:
                log.warning("cannot start a spawner process for %s (%s): using setpriv", account.name, exc)
                if isolation is None:
                    self._broken.add(account)
                raise _HelperUnavailable from exc
            self._helpers[key] = helper
        return helper

    def _helper_gone(self, helper: _Helper) -> None:
        key = (helper.account, helper.isolation)
        if self._helpers.get(key) is helper:
            del self._helpers[key]
        self._retired.append(helper)
        if not helper.started and helper.isolation is None:  # it never worked: don't try again
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


# -- the spawner process itself (stdlib only: it runs as ``python -I -S spawn.py``) ---------------


def _helper_main(args: Sequence[str]) -> int:  # pragma: no cover - runs in the spawner process
    """Serve spawn requests on socket *fd* as uid/gid/groups until the simulator hangs up.

    Replies go in batches (one message per wake-up: a list of ``("s", request, pid)``,
    ``("e", request, errno, strerror, filename)``, ``("v", request, message)`` (not an OSError)
    and ``("x", pid, wait status)``), in the order things happened, so a command's start is
    always reported before its end.
    """
    fd, uid, gid = int(args[0]), int(args[1]), int(args[2])
    groups = [int(g) for g in args[3].split(",") if g]
    if len(args) > 4:  # a root device's spawner: its commands run in namespaces of their own
        _enter_namespaces(args[4])
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    sock.setblocking(False)
    # One command before switching: whatever starting one loads is loaded while the standard
    # library is still readable (it may live where the account cannot read, like /root).
    subprocess.run(["/bin/sh", "-c", ":"], stdin=subprocess.DEVNULL, cwd="/", env={}, check=False)
    if uid != os.geteuid():  # (a spawner for the simulator's own user switches nothing)
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD wakes the poll
    commands_start_with_default_signals()  # (it inherited what the simulator ignores: SIG_IGN)
    children: dict[int, subprocess.Popen[bytes]] = {}
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    ancillary = socket.CMSG_SPACE(3 * _FD_BYTES)
    while True:
        replies: list[tuple[Any, ...]] = []
        for ready, _ in poller.poll():
            if ready == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 4096):
                        pass
                _reap_all(replies, children)
                continue
            while True:
                try:
                    msg, anc, _, _ = sock.recvmsg(REQUEST_MAX + 1024, ancillary, socket.MSG_CMSG_CLOEXEC)
                except BlockingIOError:
                    break
                if not msg:
                    return 0  # the simulator hung up
                fds: list[int] = []
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", data[: len(data) - len(data) % _FD_BYTES]))
                try:
                    replies.append(_start_requested(marshal.loads(msg), fds, children))
                finally:
                    for f in fds:
                        os.close(f)
                if len(replies) >= _BATCH:
                    _send_replies(sock, replies)
        _send_replies(sock, replies)


_BATCH = 64

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x04000000, 0x08000000, 0x10000000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
# the new mount API (the same numbers on every architecture)
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC, _AT_EMPTY_PATH, _AT_FDCWD = 1, os.O_CLOEXEC, 0x1000, -100
_MOUNT_ATTR_IDMAP, _MOVE_MOUNT_F_EMPTY_PATH = 0x00100000, 4
_ID_COUNT = 65536


def _enter_namespaces(spec: str) -> None:  # pragma: no cover - runs in the spawner process
    """Enter the namespaces :class:`evc_sim.namespaces.Isolation` describes (*spec* is its
    ``to_arg()``): a new mount namespace with overlays over the system directories and the kept
    directories (the home) on top again, then (where the kernel allows) a new user namespace
    whose uid 0 is an unprivileged uid of the host, then new UTS and IPC namespaces with the
    device's hostname.

    The directories are idmapped mounts for the user namespace: a file the host's root owns is
    root's inside too, and what the device writes lands on disk as its unprivileged uid (in the
    overlays' upper directories) or as the host's root (in the home). Where idmapped mounts are
    not supported the commands stay the host's uid 0, in the private mount namespace.
    """
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> int:
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return rc

    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        rc = libc.mount(
            source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
            ctypes.c_ulong(flags), data.encode() if data else None,
        )  # fmt: skip
        check(rc, f"mount {target}")

    def idmapped_clone(path: str, userns: int) -> int:
        """A detached copy of the mount at *path* that shows the host's ids as *userns* sees them."""
        flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
        tree = check(libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, path.encode(), flags), f"open_tree {path}")
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", _MOUNT_ATTR_IDMAP, 0, 0, userns), 32)
        try:
            check(libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, attr, 32), f"idmap {path}")
        except OSError:
            os.close(tree)
            raise
        return tree

    def attach(tree: int, target: str) -> None:
        check(libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH),
              f"move_mount {target}")  # fmt: skip
        os.close(tree)

    hostname, uid_base_text, *rest = spec.split("\n")
    uid_base = int(uid_base_text)
    overlays = [r.split("|") for r in rest if not r.startswith("=")]
    keep = [r[1:] for r in rest if r.startswith("=")]
    check(libc.unshare(_CLONE_NEWNS), "unshare")
    mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing done here reaches the host
    userns = _new_user_namespace(libc, uid_base) if uid_base else -1
    trees: dict[str, int] = {}
    if userns >= 0:
        try:
            for path in [o[0] for o in overlays] + keep:
                trees[path] = idmapped_clone(path, userns)
        except OSError as exc:
            print(f"evc sim {hostname}: no idmapped mounts here ({exc}): the device's root is the host's "
                  "root, in a private mount namespace", file=sys.stderr)  # fmt: skip
            for tree in trees.values():
                os.close(tree)
            trees.clear()
            os.close(userns)
            userns = -1
    if userns < 0:  # the kept directories as they are, taken before the overlays hide them
        trees = {path: check(libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, path.encode(), _OPEN_TREE_CLONE
                                          | _OPEN_TREE_CLOEXEC), f"open_tree {path}") for path in keep}  # fmt: skip
    for directory, upper, work in overlays:
        st = os.stat(directory)  # the top of the overlay is the upper directory: the host's owner
        shift = uid_base if userns >= 0 else 0
        os.chown(upper, st.st_uid + shift, st.st_gid + shift)
        if directory in trees:
            attach(trees.pop(directory), directory)  # the lower layer: the host's, idmapped
        mount("overlay", directory, "overlay", 0, f"lowerdir={directory},upperdir={upper},workdir={work}")
    for path in keep:
        os.makedirs(path, exist_ok=True)  # (in an overlay: a copy-up, the host is untouched)
        attach(trees.pop(path), path)
    if userns >= 0:
        check(libc.setns(userns, _CLONE_NEWUSER), "setns")
        os.close(userns)
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    check(libc.unshare(_CLONE_NEWUTS | _CLONE_NEWIPC), "unshare")  # (owned by the user namespace)
    encoded = hostname.encode()
    check(libc.sethostname(encoded, ctypes.c_size_t(len(encoded))), "sethostname")


def _new_user_namespace(libc: Any, uid_base: int) -> int:  # pragma: no cover - in the spawner process
    """A user namespace whose ids 0-65535 are the host's *uid_base*... (a descriptor); -1 where
    none can be made."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that makes the namespace and waits until we hold it
        os.close(ready_r)
        os.close(done_w)
        ok = libc.unshare(_CLONE_NEWUSER) == 0
        os.write(ready_w, b"1" if ok else b"0")
        os.read(done_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            return -1
        for kind in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{kind}", "w") as f:
                f.write(f"0 {uid_base} {_ID_COUNT}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        print(f"evc sim: no user namespace ({exc})", file=sys.stderr)
        return -1
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def _send_replies(sock: socket.socket, replies: list[tuple[Any, ...]]) -> None:  # pragma: no cover - helper
    if not replies:
        return
    msg = marshal.dumps(replies)
    replies.clear()
    while True:
        try:
            sock.send(msg)
            return
        except BlockingIOError:  # the simulator is busy: wait for room
            select.select([], [sock], [])


def _start_requested(
    request: tuple[int, list[str], dict[str, str], str, bool],
    fds: list[int],
    children: dict[int, subprocess.Popen[bytes]],
) -> tuple[Any, ...]:  # pragma: no cover - runs in the spawner process
    req_id, argv, env, cwd, ctty = request
    try:
        # (CPython's vfork path, not os.posix_spawn: glibc's posix_spawn leaves its internal
        # signals 32 and 33 ignored in the command, and sshd's commands have nothing ignored;
        # a terminal session forks, this small process)
        popen = subprocess.Popen(
            argv, stdin=fds[0], stdout=fds[1], stderr=fds[2], cwd=cwd, env=env, start_new_session=True,
            preexec_fn=_take_controlling_tty if ctty else None,
        )  # fmt: skip
    except OSError as exc:
        return ("e", req_id, exc.errno or 0, exc.strerror or str(exc), exc.filename)
    except Exception as exc:  # (what Popen refuses, such as a NUL byte in an argument)
        return ("v", req_id, f"{type(exc).__name__}: {exc}")
    children[popen.pid] = popen  # (a Popen dropped while running would be reaped by the next one)
    return ("s", req_id, popen.pid)


def _reap_all(
    replies: list[tuple[Any, ...]], children: dict[int, subprocess.Popen[bytes]]
) -> None:  # pragma: no cover - runs in the spawner process
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        popen = children.pop(pid, None)
        if popen is not None:
            popen.returncode = os.waitstatus_to_exitcode(status)
        replies.append(("x", pid, status))


if __name__ == "__main__":  # pragma: no cover - the spawner process
    sys.exit(_helper_main(sys.argv[1:]))
