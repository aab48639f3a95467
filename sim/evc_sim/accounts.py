"""The Unix accounts behind the simulator's three privilege levels, and acting as one of them.

Run as root, the simulator presents the levels for real:

* ``root``: commands run as uid 0 inside namespaces of the device's own, where uid 0 is an
  unprivileged uid of the host and /etc, /usr, /var, ... are private overlays
  (:mod:`evc_sim.namespaces`): a root device never changes the host;
* ``sudo``: commands run as ``evcsim-sudo``, which ``/etc/sudoers.d/evcsim`` lets run anything
  through passwordless sudo;
* ``user``: commands run as ``evcsim-user``, which sudo does not know.

The two accounts are created with ``useradd --system`` the first time a device needs them and
left in place (creating them again is a no-op). Many devices share one account: each session
gets its device's home as HOME and working directory, while ``~evcsim-user`` (what Ansible
expands ``~`` to once it knows the remote user) is the account's own home,
``/var/lib/evcsim/<account>``.

When the ``sudo`` package is not installed, ``sudo`` devices get a stand-in ``sudo`` script on
their PATH that accepts sudo's usual options and runs the command *without* extra privilege:
``sudo -n true`` succeeds, which is what a privilege probe checks, but it is a simulation.
Install ``sudo`` to get the real thing.

Run as another user, nothing is created: every device runs commands as that user, ``root``
cannot be presented, ``sudo`` devices get the stand-in above and ``user`` devices get a ``sudo``
that always refuses, so the host's own sudo rights never leak into a simulated device.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from evc.errors import ConfigError
from evc_sim.device import Privilege

ACCOUNT_NAMES: dict[Privilege, str] = {"user": "evcsim-user", "sudo": "evcsim-sudo"}
ACCOUNT_HOMES = Path("/var/lib/evcsim")
SUDOERS_DROP_IN = Path("/etc/sudoers.d/evcsim")
ACCOUNT_COMMENT = "EVC device simulator"
#: PATH of a device session, as OpenSSH's sshd sets it; a sudo stand-in directory goes first
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SUDO_ALLOW = r"""#!/bin/sh
# EVC device simulator: stand-in for passwordless sudo on a simulated "sudo" device.
# It accepts sudo's usual options and runs the command as the calling user: it grants no
# privilege. The simulator uses the real sudo instead whenever the sudo package is installed.
shell=
while [ $# -gt 0 ]; do
  case "$1" in
    -u|-g|-p|-C|-D|-h|-r|-t|-U|-T|-c) shift 2 ;;
    -l|--list) echo "User $(id -un) may run the following commands:"
               echo "    (ALL : ALL) NOPASSWD: ALL"; exit 0 ;;
    -v|--validate|-k|-K|--reset-timestamp|--remove-timestamp)
               shift; [ $# -eq 0 ] && exit 0 ;;
    -s|--shell|-i|--login) shell=1; shift ;;
    -V|--version) echo "Sudo version (EVC simulator stand-in)"; exit 0 ;;
    --) shift; break ;;
    -*) shift ;;
    *) break ;;
  esac
done
if [ -n "$shell" ]; then
  [ $# -eq 0 ] && exec /bin/sh
  exec /bin/sh -c "$*"
fi
if [ $# -eq 0 ]; then echo "usage: sudo [-n] command" >&2; exit 1; fi
exec "$@"
"""

SUDO_DENY = r"""#!/bin/sh
# EVC device simulator: sudo on a simulated unprivileged ("user") device. It refuses like the
# real sudo does for an account that needs a password it cannot be given.
echo "sudo: a password is required" >&2
exit 1
"""


@dataclass(frozen=True)
class Account:
    """Who a device's commands run as, and the directory (if any) put first on its PATH."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    shim_dir: Path | None = None

    @property
    def is_self(self) -> bool:
        """True when this is the simulator's own user: no identity switch is needed."""
        return self.uid == os.geteuid()

    @property
    def path(self) -> str:
        return f"{self.shim_dir}:{DEFAULT_PATH}" if self.shim_dir else DEFAULT_PATH


def running_as_root() -> bool:
    return os.geteuid() == 0


def available_privileges() -> tuple[Privilege, ...]:
    return ("root", "sudo", "user") if running_as_root() else ("sudo", "user")


class Accounts:
    """Resolves a privilege level to an :class:`Account`, creating what it needs on first use."""

    def __init__(self, root_dir: Path) -> None:
        self.shim_root = root_dir / "shims"
        self._cache: dict[Privilege, Account] = {}
        self._lock = threading.Lock()

    def for_privilege(self, privilege: Privilege) -> Account:
        with self._lock:
            if privilege not in self._cache:
                self._cache[privilege] = self._resolve(privilege)
            return self._cache[privilege]

    def _resolve(self, privilege: Privilege) -> Account:
        if not running_as_root():
            if privilege == "root":
                raise ConfigError("a simulated root device needs the simulator to run as root (to make its namespaces)")
            me = pwd.getpwuid(os.geteuid())
            stand_in = self._shim("sudo-allow" if privilege == "sudo" else "sudo-deny")
            return Account(me.pw_name, me.pw_uid, me.pw_gid, tuple(os.getgroups()), stand_in)
        if privilege == "root":
            return Account("root", 0, 0, (0,))
        pw = ensure_user(ACCOUNT_NAMES[privilege])
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
        shim: Path | None = None
        if privilege == "sudo":
            if shutil.which("sudo", path=DEFAULT_PATH):
                ensure_sudoers(pw.pw_name)
            else:
                shim = self._shim("sudo-allow")
        return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, shim)

    def _shim(self, kind: str) -> Path:
        """A directory holding one ``sudo`` script, readable and traversable by every account."""
        directory = self.shim_root / kind
        script = directory / "sudo"
        text = SUDO_ALLOW if kind == "sudo-allow" else SUDO_DENY
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.shim_root, 0o755)
        os.chmod(directory, 0o755)
        if not script.exists() or script.read_text() != text:
            tmp = directory / ".sudo.tmp"
            tmp.write_text(text)
            os.chmod(tmp, 0o755)
            os.replace(tmp, script)
        return directory


def ensure_user(name: str) -> pwd.struct_passwd:
    """The system account *name* with its home in ``/var/lib/evcsim``, created with useradd
    when missing (root only; idempotent)."""
    home = ACCOUNT_HOMES / name
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        pw = _useradd(name, home)
    if pw.pw_gecos == ACCOUNT_COMMENT and pw.pw_dir != str(home):
        _run_tool("usermod", "--home", str(home), name)  # an account from an older layout
        pw = pwd.getpwnam(name)
    if pw.pw_gecos == ACCOUNT_COMMENT and not home.is_dir():
        ACCOUNT_HOMES.mkdir(mode=0o755, parents=True, exist_ok=True)
        home.mkdir(mode=0o755, exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
    return pw


def _useradd(name: str, home: Path) -> pwd.struct_passwd:
    ACCOUNT_HOMES.mkdir(mode=0o755, parents=True, exist_ok=True)
    err = _run_tool(
        "useradd", "--system", "--user-group", "--create-home", "--home-dir", str(home),
        "--shell", "/bin/sh", "--comment", ACCOUNT_COMMENT, name, check=False,
    )  # fmt: skip
    try:  # a concurrent simulator may have won the race: the account exists either way
        return pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"useradd could not create the account {name!r}: {err}") from None


def _run_tool(tool: str, *args: str, check: bool = True) -> str:
    """Run a shadow-utils tool; return its stderr (raise ConfigError when *check* and it fails)."""
    path = shutil.which(tool, path=DEFAULT_PATH)
    if not path:
        raise ConfigError(f"the simulator needs {tool}, which is not installed")
    proc = subprocess.run([path, *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise ConfigError(f"{tool} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stderr.strip()


def ensure_sudoers(username: str) -> None:
    """Install the sudoers drop-in that gives *username* passwordless sudo (root only)."""
    text = (
        '# Written by the EVC device simulator: its "sudo" devices run as this account.\n'
        f"{username} ALL=(ALL:ALL) NOPASSWD: ALL\n"
        f"Defaults:{username} !requiretty\n"
    )
    if SUDOERS_DROP_IN.exists() and SUDOERS_DROP_IN.read_text() == text:
        return
    SUDOERS_DROP_IN.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    tmp = SUDOERS_DROP_IN.with_name(".evcsim.tmp")  # sudo skips names containing a dot
    tmp.write_text(text)
    os.chmod(tmp, 0o440)
    visudo = shutil.which("visudo", path=DEFAULT_PATH)
    if visudo:
        check = subprocess.run([visudo, "-cqf", str(tmp)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"visudo rejected the simulator's sudoers drop-in: {check.stderr}")
    os.replace(tmp, SUDOERS_DROP_IN)


def check_reachable(path: Path, account: Account) -> None:
    """Raise ConfigError when *account* cannot traverse every directory above *path*."""
    if account.is_self or account.uid == 0:
        return
    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        if st.st_uid == account.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in account.groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise ConfigError(
                f"{parent} (mode {stat.S_IMODE(st.st_mode):o}) keeps the simulator account "
                f"{account.name!r} out of {path}; put the simulator's root directory somewhere "
                "every account can traverse (for example a tempfile.mkdtemp() directory)"
            )


def world_traversable(path: Path) -> bool:
    """True when any account can traverse *path* and every directory above it."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def chown_tree(account: Account, *paths: Path) -> None:
    """Give *paths* to *account* (no-op when the account is the simulator's own user)."""
    if account.is_self:
        return
    for p in paths:
        os.chown(p, account.uid, account.gid, follow_symlinks=False)


_libc: ctypes.CDLL | None = None


def _setfs(uid: int, gid: int) -> tuple[int, int]:
    """Set this thread's filesystem uid/gid (Linux); return the previous pair."""
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            raise ConfigError("acting as another account over SFTP needs Linux (setfsuid)")
        _libc = ctypes.CDLL(None, use_errno=True)
    old_gid = int(_libc.setfsgid(gid))
    old_uid = int(_libc.setfsuid(uid))
    return old_uid, old_gid


@contextmanager
def filesystem_identity(account: Account) -> Iterator[None]:
    """Make file-system checks and new files' ownership those of *account* in this thread.

    This is how NFS servers act for a client: ``setfsuid``/``setfsgid`` change only the identity
    the kernel checks file access against, for this thread, until restored. The simulator's own
    supplementary groups stay in effect. The body must not yield to the event loop.
    """
    if account.is_self:
        yield
        return
    old_uid, old_gid = _setfs(account.uid, account.gid)
    try:
        yield
    finally:
        _setfs(old_uid, old_gid)
