"""The device simulator: N simulated edge devices, each a real asyncssh server on its own port.

Each device has its own loopback port, ed25519 host key (kept in ``root_dir/keys`` so a restart
presents the same key), home directory (``root_dir/homes/<name>``) and
``~/.ssh/authorized_keys``, read again on every authentication so edits take effect at once.
(Run as root with *root_dir* inside a directory other accounts cannot enter, such as ``/root``,
homes and sudo stand-ins go to ``/var/lib/evcsim/sims/<digest of root_dir>`` instead.)
Commands run for real (:mod:`evc_sim.session`, started as :mod:`evc_sim.spawn` describes), SFTP
is served on real paths (:mod:`evc_sim.sftp`), and each device presents one privilege level
(:mod:`evc_sim.accounts`); a root device is root only in namespaces of its own, SFTP included
(:mod:`evc_sim.namespaces`), and its private files are kept in ``root_dir/devices/<name>``.
Faults are injected per device with :meth:`Simulator.set_fault`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import resource
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from evc.errors import ConfigError, NotFound
from evc_sim import cpuquota
from evc_sim.accounts import (
    ACCOUNT_HOMES,
    Account,
    Accounts,
    available_privileges,
    check_reachable,
    chown_tree,
    running_as_root,
    world_traversable,
)
from evc_sim.device import (
    FaultMode,
    Privilege,
    SimDevice,
    check_mode,
    check_privilege,
    key_identity,
    write_state,
)
from evc_sim.namespaces import Isolation, isolation_for
from evc_sim.session import NamespacedSession, process_factory
from evc_sim.sftp import sftp_factory
from evc_sim.spawn import ChildProcess, Spawner

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


class _DeviceSSHServer(asyncssh.SSHServer):
    """Per-connection authentication policy of one device: its authorized_keys, public key only."""

    def __init__(self, runtime: _Runtime) -> None:
        self._rt = runtime
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._rt.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._rt.connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        dev = self._rt.device
        if self._conn is None or dev.mode == "refuse_auth" or username != dev.username:
            return True  # authentication required, and no key will do
        with contextlib.suppress(OSError, ValueError, asyncssh.KeyImportError):
            self._conn.set_authorized_keys(str(dev.authorized_keys_path))
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def session_requested(self) -> bool | asyncssh.SSHServerSession[bytes]:
        # (asked only on a root device's listener, which passes asyncssh no process factory)
        rt = self._rt
        assert rt.spawner is not None
        handler = process_factory(rt.device, rt.account, rt.children, rt.spawner, rt.isolation)
        return NamespacedSession(handler, None, 0, False)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return True  # like sshd's AllowTcpForwarding yes: a device can serve as a jump host

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        # remote forwarding too, but privileged ports only for root devices, as with sshd
        return listen_port == 0 or listen_port >= 1024 or self._rt.device.privilege == "root"


@dataclass(eq=False)
class _Runtime:
    """What the simulator holds for one device besides its public :class:`SimDevice`."""

    device: SimDevice
    account: Account
    host_key: asyncssh.SSHKey
    sock: socket.socket | None = None
    acceptor: asyncssh.SSHAcceptor | None = None
    opening: asyncio.Task[None] | None = None
    connections: set[asyncssh.SSHServerConnection] = field(default_factory=set)
    children: set[ChildProcess] = field(default_factory=set)
    isolation: Isolation | None = None
    spawner: Spawner | None = None


class Simulator:
    """A fleet of simulated devices served by this process's event loop.

    All methods must be called from the loop that serves the devices (see
    :class:`evc_sim.SimulatorThread` to drive one from synchronous code).
    """

    def __init__(
        self,
        root_dir: Path,
        *,
        host: str = "127.0.0.1",
        authorized_keys: Sequence[str] = (),
        base_port: int = 0,
    ) -> None:
        self.root_dir = Path(root_dir)
        self.host = host
        self.authorized_keys = [k.strip() for k in authorized_keys if k.strip()]
        self.base_port = base_port
        self.share_dir = self.root_dir  # homes and sudo stand-ins: see _prepare()
        self._accounts = Accounts(self.share_dir)
        self._spawner = Spawner()
        self._devices: dict[str, _Runtime] = {}
        self._prepared = False
        self._next_port_offset = 0

    # -- reading ------------------------------------------------------------------------------

    @property
    def devices(self) -> list[SimDevice]:
        return [rt.device for rt in self._devices.values()]

    def device(self, name: str) -> SimDevice:
        return self._runtime(name).device

    def _runtime(self, name: str) -> _Runtime:
        try:
            return self._devices[name]
        except KeyError:
            raise NotFound(f"no simulated device named {name!r}") from None

    def write_state(self, path: Path) -> None:
        """Write the JSON device list (name, host, port, username, host_key, privilege, ...)."""
        write_state(path, self.devices, pid=os.getpid(), root_dir=str(self.root_dir))

    # -- adding and removing ------------------------------------------------------------------

    async def start(
        self,
        n: int,
        prefix: str = "sim",
        *,
        privileges: Privilege | Sequence[str] = "user",
        ports: Mapping[str, int] | None = None,
        cpus: Sequence[float] = (),
    ) -> list[SimDevice]:
        """Add *n* devices named ``<prefix>-0001``... and start serving them.

        *privileges* is one level or a sequence cycled through; in a sequence, levels this
        process cannot present (``root`` when not running as root) are skipped with a warning.
        *ports* gives devices the port they had before (a device whose port is taken now gets
        another one, with a warning). *cpus* gives the devices real CPU limits, cycled through
        (:mod:`evc_sim.cpuquota`; e.g. ``(0.25, 0.5, 1)``).
        """
        levels = self._privilege_cycle(privileges)
        taken = set(self._devices)
        names: list[str] = []
        i = 0
        while len(names) < n:
            i += 1
            name = f"{prefix}-{i:04d}"
            if name not in taken:
                names.append(name)
        ports = ports or {}
        out = []
        for k, name in enumerate(names):
            level = levels[k % len(levels)]
            limit = cpus[k % len(cpus)] if cpus else None
            try:
                out.append(await self.add(name, level, port=ports.get(name), cpus=limit))
            except ConfigError as exc:
                if name not in ports:
                    raise
                log.warning("%s; it gets another port", exc.message)
                out.append(await self.add(name, level, port=0, cpus=limit))
        return out

    def _privilege_cycle(self, privileges: Privilege | Sequence[str]) -> list[Privilege]:
        if isinstance(privileges, str):
            return [check_privilege(privileges)]
        wanted = [check_privilege(p) for p in privileges]
        usable = [p for p in wanted if p in available_privileges()]
        if len(usable) < len(wanted):
            log.warning("simulated root devices need the simulator to run as root; skipping them")
        if not usable:
            raise ConfigError(f"none of the privilege levels {wanted} can be presented here")
        return usable

    async def add(
        self,
        name: str,
        privilege: Privilege = "user",
        *,
        port: int | None = None,
        authorized_keys: Sequence[str] | None = None,
        cpus: float | None = None,
    ) -> SimDevice:
        """Add one device and serve it; *port* None: the next base port, or a free one; *cpus*: a
        real CPU limit for everything it runs (:mod:`evc_sim.cpuquota`)."""
        if not DEVICE_NAME.fullmatch(name):
            raise ConfigError(f"{name!r} is not a device name (letters, digits, '.', '_', '-')")
        if name in self._devices:
            raise ConfigError(f"a simulated device named {name!r} exists already")
        privilege = check_privilege(privilege)
        if cpus is not None:
            cpus = cpuquota.check_cpus(cpus)
            cpuquota.create(name, cpus)
        self._prepare()
        account = self._accounts.for_privilege(privilege)
        if port is None:
            port = self.base_port + self._next_port_offset if self.base_port else 0
            self._next_port_offset += 1
        home = self.share_dir / "homes" / name
        check_reachable(home, account)
        host_key = self._host_key(name)
        keys = self.authorized_keys if authorized_keys is None else list(authorized_keys)
        self._make_home(home, account, keys)
        device = SimDevice(
            name=name,
            host=self.host,
            port=port,
            username=account.name,
            host_key_public=" ".join(host_key.export_public_key().decode().split()[:2]),
            home=home,
            privilege=privilege,
            cpus=cpus,
        )
        rt = _Runtime(device, account, host_key, spawner=self._spawner)
        if privilege == "root":  # root only in namespaces of its own: see evc_sim.namespaces
            rt.isolation = isolation_for(name, self.root_dir / "devices" / name, home)
        self._bind(rt)
        device.port = rt.sock.getsockname()[1] if rt.sock else port
        self._devices[name] = rt
        try:
            await self._serve(rt)
        except BaseException:
            del self._devices[name]
            self._release_cgroup(device)
            raise
        return device

    def set_cpus(self, name: str, cpus: float) -> None:
        """Change the CPU limit of a device that was added with one (it applies at once, to what
        it runs now too)."""
        dev = self._runtime(name).device
        if dev.cpus is None:
            raise ConfigError(f"simulated device {name} has no CPU limit to change (add it with cpus=...)")
        cpuquota.set_quota(cpuquota.group_of(name), cpus)
        dev.cpus = cpuquota.check_cpus(cpus)

    def _release_cgroup(self, device: SimDevice) -> None:
        if device.cpus is not None:
            group = cpuquota.group_of(device.name)
            self._spawner.forget(group)
            cpuquota.remove(group)

    async def remove(self, name: str) -> None:
        """Stop serving a device and forget it (its files stay in ``root_dir``)."""
        rt = self._runtime(name)
        await self._shut(rt)
        del self._devices[name]
        self._release_cgroup(rt.device)

    def _prepare(self) -> None:
        if self._prepared:
            return
        raise_fd_limit()
        self.root_dir.mkdir(parents=True, exist_ok=True)
        (self.root_dir / "keys").mkdir(mode=0o700, exist_ok=True)
        if running_as_root():
            # The accounts behind "sudo" and "user" devices must reach their homes and stand-ins.
            if not world_traversable(self.root_dir.resolve().parent):
                digest = hashlib.sha256(str(self.root_dir.resolve()).encode()).hexdigest()[:16]
                self.share_dir = ACCOUNT_HOMES / "sims" / digest
                self._accounts = Accounts(self.share_dir)
                log.info("device homes are in %s (%s is closed to other accounts)",
                         self.share_dir, self.root_dir)  # fmt: skip
            self.share_dir.mkdir(parents=True, exist_ok=True)
            (self.share_dir / "homes").mkdir(exist_ok=True)
            for d in (self.share_dir, self.share_dir / "homes"):
                os.chmod(d, os.stat(d).st_mode | 0o111)
        else:
            (self.share_dir / "homes").mkdir(exist_ok=True)
        self._prepared = True

    def _host_key(self, name: str) -> asyncssh.SSHKey:
        path = self.root_dir / "keys" / name
        if path.exists():
            with contextlib.suppress(OSError, ValueError, asyncssh.KeyImportError):
                return asyncssh.read_private_key(str(path))
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"evcsim {name}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        return key

    @staticmethod
    def _make_home(home: Path, account: Account, keys: Sequence[str]) -> None:
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o755)
        os.chmod(ssh_dir, 0o700)
        ak = ssh_dir / "authorized_keys"
        if not ak.exists():
            ak.touch(mode=0o600)
        edit_authorized_keys(ak, add=keys)
        chown_tree(account, home, ssh_dir, ak)

    # -- listening ----------------------------------------------------------------------------

    def _bind(self, rt: _Runtime) -> None:
        """Bind and listen synchronously, so the port accepts (queues) connections at once."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, rt.device.port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"simulated device {rt.device.name} cannot listen on {self.host}:{rt.device.port}: {exc.strerror}"
            ) from exc
        sock.setblocking(False)
        rt.sock = sock

    async def _serve(self, rt: _Runtime) -> None:
        sock, rt.sock = rt.sock, None
        assert sock is not None
        dev = rt.device
        try:
            rt.acceptor = await asyncssh.listen(
                sock=sock,
                server_factory=lambda: _DeviceSSHServer(rt),
                server_host_keys=[rt.host_key],
                # a root device's sessions, SFTP included, run in its namespaces: session_requested()
                process_factory=process_factory(dev, rt.account, rt.children, self._spawner)
                if rt.isolation is None
                else None,
                sftp_factory=sftp_factory(dev, rt.account) if rt.isolation is None else None,
                allow_scp=False,  # `scp -O` runs the device's real scp instead
                encoding=None,
                line_editor=False,
                agent_forwarding=False,
                x11_forwarding=False,
                password_auth=False,
                kbdint_auth=False,
            )
        except BaseException:
            sock.close()
            raise

    def _listen_in_background(self, rt: _Runtime) -> None:
        self._bind(rt)
        rt.opening = asyncio.get_running_loop().create_task(self._serve(rt))

    async def settle(self) -> None:
        """Wait until listeners reopened by :meth:`set_fault` are serving."""
        pending = [rt.opening for rt in self._devices.values() if rt.opening is not None]
        for rt in self._devices.values():
            rt.opening = None
        if pending:
            await asyncio.gather(*pending)

    def _close_listener(self, rt: _Runtime) -> None:
        if rt.opening is not None:
            rt.opening.cancel()
            rt.opening = None
        if rt.sock is not None:
            rt.sock.close()
            rt.sock = None
        if rt.acceptor is not None:
            rt.acceptor.close()
            rt.acceptor = None

    def _cut(self, rt: _Runtime) -> None:
        """Abort every connection to the device and hang up every command it runs."""
        for conn in list(rt.connections):
            conn.abort()
        for proc in list(rt.children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    async def _shut(self, rt: _Runtime) -> None:
        acceptor = rt.acceptor
        self._close_listener(rt)
        self._cut(rt)
        if acceptor is not None:
            await acceptor.wait_closed()

    # -- faults and keys ----------------------------------------------------------------------

    def set_fault(
        self,
        name: str,
        mode: FaultMode,
        *,
        slow_s: float | None = None,
        drop_after_s: float | None = None,
    ) -> None:
        """Switch device *name* to fault *mode* (``ok`` clears it).

        ``down`` closes the listener and cuts live connections; leaving ``down`` listens again on
        the same port with the same host key (already accepting when this returns; call
        :meth:`settle` to wait until SSH is served). ``slow_s`` and ``drop_after_s`` tune the
        ``slow`` and ``drop`` faults.
        """
        rt = self._runtime(name)
        mode = check_mode(mode)
        dev = rt.device
        if slow_s is not None:
            dev.slow_s = float(slow_s)
        if drop_after_s is not None:
            dev.drop_after_s = float(drop_after_s)
        was_down = dev.mode == "down"
        dev.mode = mode
        if mode == "down" and not was_down:
            self._close_listener(rt)
            self._cut(rt)
        elif was_down and mode != "down":
            self._listen_in_background(rt)
        log.info("%s: fault mode %s", name, mode)

    def authorize(self, public_key_line: str, name: str | None = None) -> None:
        """Add a key to the authorized_keys of device *name*, or of every device."""
        for rt in self._targets(name):
            edit_authorized_keys(rt.device.authorized_keys_path, add=[public_key_line])
            chown_tree(rt.account, rt.device.authorized_keys_path)

    def deauthorize(self, public_key_line: str, name: str | None = None) -> None:
        """Remove a key (matched by type and key data) from one or every device."""
        for rt in self._targets(name):
            edit_authorized_keys(rt.device.authorized_keys_path, remove=[public_key_line])
            chown_tree(rt.account, rt.device.authorized_keys_path)

    def _targets(self, name: str | None) -> list[_Runtime]:
        return [self._runtime(name)] if name is not None else list(self._devices.values())

    # -- stopping -----------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop every device: listeners closed, connections cut, commands killed."""
        runtimes = list(self._devices.values())
        await asyncio.gather(*(self._shut(rt) for rt in runtimes), return_exceptions=True)
        # let the sessions' own clean-up (reaping their children) run
        for rt in runtimes:
            for proc in list(rt.children):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(proc.wait(), 2.0)
        await self._spawner.close()
        for rt in runtimes:
            self._release_cgroup(rt.device)

    async def __aenter__(self) -> Simulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def edit_authorized_keys(path: Path, add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
    """Add missing / remove matching keys in an authorized_keys file, atomically."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    drop = {key_identity(k) for k in remove} - {None}
    kept = [ln for ln in lines if not drop or key_identity(ln) not in drop]
    present = {key_identity(ln) for ln in kept}
    for k in add:
        k = k.strip()
        ident = key_identity(k)
        if ident is None:
            raise ConfigError(f"not a public key line: {k[:60]!r}")
        if ident not in present:
            kept.append(k)
            present.add(ident)
    if kept == lines:
        return
    tmp = path.with_name(".authorized_keys.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{ln}\n" for ln in kept))
    os.replace(tmp, path)
