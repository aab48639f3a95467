"""SFTP on a simulated device: asyncssh's SFTP server on real paths, acting as the device's account.

Nothing is chrooted: absolute paths are the host's paths, relative ones start in the device's
home (so ``sftp``, ``scp`` and Ansible's file transfer land where ``~`` is). When the device's
account is not the simulator's own user, every operation that checks permissions or creates a
file runs under that account's filesystem identity (see
:func:`evc_sim.accounts.filesystem_identity`), so files come out owned by the account and the
account's permission limits hold, exactly as with a real ``sftp-server`` started by sshd.
"""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncssh

from evc_sim.accounts import Account, filesystem_identity
from evc_sim.device import SimDevice

#: SFTPServer methods that check permissions or create files by path (file handles, once open,
#: need no identity: the kernel checked it at open time)
_PATH_METHODS = (
    "open", "open56", "lstat", "stat", "setstat", "lsetstat", "fsetstat", "remove", "mkdir",
    "rmdir", "realpath", "rename", "posix_rename", "readlink", "symlink", "link", "statvfs",
)  # fmt: skip


class DeviceSFTPServer(asyncssh.SFTPServer):
    """The SFTP subsystem of one simulated device."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], device: SimDevice, account: Account):
        super().__init__(chan)
        self._home = str(device.home).encode()
        self._account = account

    def map_path(self, path: bytes) -> bytes:
        if path.startswith(b"/"):
            return path
        return posixpath.join(self._home, path) if path not in (b"", b".") else self._home

    def exit(self) -> None:
        # Like sshd's sftp-server, report success when the client ends the session: OpenSSH's
        # scp and sftp treat a session closed without an exit status as a failure.
        self.channel.exit(0)

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        entries = super().scandir(path).__aiter__()
        while True:
            # Each step of the base scan is synchronous file-system work: it never suspends, so
            # the identity switch cannot leak into another coroutine.
            with filesystem_identity(self._account):
                try:
                    name = await entries.__anext__()
                except StopAsyncIteration:
                    return
            yield name


def _as_account(name: str) -> Callable[..., Any]:
    base = getattr(asyncssh.SFTPServer, name)

    def method(self: DeviceSFTPServer, *args: Any) -> Any:
        with filesystem_identity(self._account):
            return base(self, *args)

    method.__name__ = name
    method.__qualname__ = f"DeviceSFTPServer.{name}"
    method.__doc__ = base.__doc__
    return method


for _name in _PATH_METHODS:
    setattr(DeviceSFTPServer, _name, _as_account(_name))


def sftp_factory(device: SimDevice, account: Account) -> Callable[[asyncssh.SSHServerChannel[bytes]], DeviceSFTPServer]:
    """The ``sftp_factory`` for one device's listener."""

    def make(chan: asyncssh.SSHServerChannel[bytes]) -> DeviceSFTPServer:
        return DeviceSFTPServer(chan, device, account)

    return make
