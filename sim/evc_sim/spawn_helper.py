"""The per-account spawner process that :mod:`evc_sim.spawn` starts, and what it shares with it.

It runs as ``python -I -S spawn_helper.py FD UID GID GROUPS [ISOLATION]``, without the package
(nothing on its path but the standard library), so this module imports the standard library
only. It switches to the account, enters a root device's namespaces first where it serves one
(:func:`_enter_namespaces`, :class:`evc_sim.namespaces.Isolation` describes them), then starts
the commands the simulator sends it over a Unix socket and reports their pids and wait statuses.
The simulator's side (requests, replies, when a spawner is used at all) is :mod:`evc_sim.spawn`.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import marshal
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
from collections.abc import Sequence
from typing import Any

#: a spawn request (argv, environment, working directory) larger than this goes the setpriv way
REQUEST_MAX = 128 * 1024
_FD_BYTES = array.array("i").itemsize


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


def take_controlling_tty() -> None:  # pragma: no cover - runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


# -- the spawner process itself ------------------------------------------------------------------


def _helper_main(args: Sequence[str]) -> int:  # pragma: no cover - runs in the spawner process
    """Serve spawn requests on socket *fd* as uid/gid/groups until the simulator hangs up.

    Replies go in batches (one message per wake-up: a list of ``("s", request, pid)``,
    ``("e", request, errno, strerror, filename)``, ``("v", request, message)`` (not an OSError)
    and ``("x", pid, wait status)``), in the order things happened, so a command's start is
    always reported before its end.
    """
    fd, uid, gid, groups, isolation = _parse_args(args)
    if isolation is not None:  # a root device's spawner: its commands run in namespaces of their own
        _enter_namespaces(isolation)
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    sock.setblocking(False)
    _switch_account(uid, gid, groups)
    wake_r = _wake_on_signals()
    return _serve(sock, wake_r)


def _parse_args(args: Sequence[str]) -> tuple[int, int, int, list[int], str | None]:
    """``FD UID GID GROUPS [ISOLATION]``: the socket, the account, and a root device's namespaces
    (:meth:`evc_sim.namespaces.Isolation.to_arg`), if any."""
    fd, uid, gid = int(args[0]), int(args[1]), int(args[2])
    groups = [int(g) for g in args[3].split(",") if g]
    return fd, uid, gid, groups, args[4] if len(args) > 4 else None


def _switch_account(uid: int, gid: int, groups: list[int]) -> None:  # pragma: no cover - spawner process
    # One command before switching: whatever starting one loads is loaded while the standard
    # library is still readable (it may live where the account cannot read, like /root).
    subprocess.run(["/bin/sh", "-c", ":"], stdin=subprocess.DEVNULL, cwd="/", env={}, check=False)
    if uid != os.geteuid():  # (a spawner for the simulator's own user switches nothing)
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)


def _wake_on_signals() -> int:  # pragma: no cover - runs in the spawner process
    """The read end of a pipe that a signal (SIGCHLD: a command ended) makes readable."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD wakes the poll
    commands_start_with_default_signals()  # (it inherited what the simulator ignores: SIG_IGN)
    return wake_r


def _serve(sock: socket.socket, wake_r: int) -> int:  # pragma: no cover - runs in the spawner process
    """Start what the simulator asks for and report starts and ends, until it hangs up (0)."""
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
            if not _take_requests(sock, ancillary, replies, children):
                return 0  # the simulator hung up
        _send_replies(sock, replies)


def _take_requests(
    sock: socket.socket, ancillary: int, replies: list[tuple[Any, ...]], children: dict[int, subprocess.Popen[bytes]]
) -> bool:  # pragma: no cover - runs in the spawner process
    """Start every request waiting on *sock*, a batch of replies sent each :data:`_BATCH`;
    False once the simulator has hung up."""
    while True:
        try:
            msg, anc, _, _ = sock.recvmsg(REQUEST_MAX + 1024, ancillary, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return True
        if not msg:
            return False
        fds = _received_fds(anc)
        try:
            replies.append(_start_requested(marshal.loads(msg), fds, children))
        finally:
            for f in fds:
                os.close(f)
        if len(replies) >= _BATCH:
            _send_replies(sock, replies)


def _received_fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors passed in a message's ancillary data (``SCM_RIGHTS``), in order."""
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % _FD_BYTES]))
    return fds


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
    kernel = _Kernel()
    hostname, uid_base, overlays, keep = _parse_spec(spec)
    kernel.check(kernel.libc.unshare(_CLONE_NEWNS), "unshare")
    kernel.mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing done here reaches the host
    userns = _new_user_namespace(kernel.libc, uid_base) if uid_base else -1
    userns, trees = _clone_trees(kernel, hostname, userns, overlays, keep)
    _mount_overlays(kernel, overlays, keep, trees, uid_base if userns >= 0 else 0)
    if userns >= 0:
        kernel.check(kernel.libc.setns(userns, _CLONE_NEWUSER), "setns")
        os.close(userns)
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    kernel.check(kernel.libc.unshare(_CLONE_NEWUTS | _CLONE_NEWIPC), "unshare")  # (owned by the user namespace)
    kernel.sethostname(hostname)


def _parse_spec(spec: str) -> tuple[str, int, list[list[str]], list[str]]:
    """:meth:`evc_sim.namespaces.Isolation.to_arg` read back: hostname, uid base, overlays
    (directory, upper, work) and kept directories."""
    hostname, uid_base_text, *rest = spec.split("\n")
    overlays = [r.split("|") for r in rest if not r.startswith("=")]
    keep = [r[1:] for r in rest if r.startswith("=")]
    return hostname, int(uid_base_text), overlays, keep


def _overlay_options(directory: str, upper: str, work: str) -> str:
    """overlayfs's mount options for *directory* overlaid in place."""
    return f"lowerdir={directory},upperdir={upper},workdir={work}"


def _id_map(uid_base: int) -> str:
    """A ``uid_map``/``gid_map``: the namespace's ids 0-65535 are the host's *uid_base*..."""
    return f"0 {uid_base} {_ID_COUNT}\n"


class _Kernel:  # pragma: no cover - runs in the spawner process
    """The libc calls entering namespaces makes, raising OSError where they fail."""

    def __init__(self) -> None:
        import ctypes

        self.libc: Any = ctypes.CDLL(None, use_errno=True)

    def check(self, rc: int, what: str) -> int:
        import ctypes

        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return rc

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        import ctypes

        rc = self.libc.mount(
            source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
            ctypes.c_ulong(flags), data.encode() if data else None,
        )  # fmt: skip
        self.check(rc, f"mount {target}")

    def clone(self, path: str) -> int:
        """A detached copy of the mount at *path* (a descriptor)."""
        flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
        return self.check(self.libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, path.encode(), flags), f"open_tree {path}")

    def idmapped_clone(self, path: str, userns: int) -> int:
        """A detached copy of the mount at *path* that shows the host's ids as *userns* sees them."""
        import ctypes
        import struct

        tree = self.clone(path)
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", _MOUNT_ATTR_IDMAP, 0, 0, userns), 32)
        try:
            self.check(self.libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, attr, 32), f"idmap {path}")
        except OSError:
            os.close(tree)
            raise
        return tree

    def attach(self, tree: int, target: str) -> None:
        self.check(self.libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH),
                   f"move_mount {target}")  # fmt: skip
        os.close(tree)

    def sethostname(self, hostname: str) -> None:
        import ctypes

        encoded = hostname.encode()
        self.check(self.libc.sethostname(encoded, ctypes.c_size_t(len(encoded))), "sethostname")


def _clone_trees(
    kernel: _Kernel, hostname: str, userns: int, overlays: list[list[str]], keep: list[str]
) -> tuple[int, dict[str, int]]:  # pragma: no cover - runs in the spawner process
    """Detached copies of the directories, by path, before the overlays hide them, and the user
    namespace (-1: none): with one, idmapped copies of the overlaid and the kept directories; where
    idmapped mounts fail (the user namespace is then given up) or without one, plain copies of the
    kept directories only."""
    trees: dict[str, int] = {}
    if userns >= 0:
        try:
            for path in [o[0] for o in overlays] + keep:
                trees[path] = kernel.idmapped_clone(path, userns)
        except OSError as exc:
            print(f"evc sim {hostname}: no idmapped mounts here ({exc}): the device's root is the host's "
                  "root, in a private mount namespace", file=sys.stderr)  # fmt: skip
            for tree in trees.values():
                os.close(tree)
            trees.clear()
            os.close(userns)
            userns = -1
    if userns < 0:  # the kept directories as they are, taken before the overlays hide them
        trees = {path: kernel.clone(path) for path in keep}
    return userns, trees


def _mount_overlays(
    kernel: _Kernel, overlays: list[list[str]], keep: list[str], trees: dict[str, int], shift: int
) -> None:  # pragma: no cover - runs in the spawner process
    """Overlay each directory in place (its idmapped copy, if any, as the lower layer), then put
    the kept directories back on top; *shift*: the uid base where the user namespace is used."""
    for directory, upper, work in overlays:
        st = os.stat(directory)  # the top of the overlay is the upper directory: the host's owner
        os.chown(upper, st.st_uid + shift, st.st_gid + shift)
        if directory in trees:
            kernel.attach(trees.pop(directory), directory)  # the lower layer: the host's, idmapped
        kernel.mount("overlay", directory, "overlay", 0, _overlay_options(directory, upper, work))
    for path in keep:
        os.makedirs(path, exist_ok=True)  # (in an overlay: a copy-up, the host is untouched)
        kernel.attach(trees.pop(path), path)


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
                f.write(_id_map(uid_base))
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
            preexec_fn=take_controlling_tty if ctty else None,
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
