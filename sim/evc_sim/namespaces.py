"""A simulated ``root`` device is root only in namespaces of its own: it never changes the host.

Without this, a root device's commands would run as the host's uid 0, and a playbook that
installs a package or writes ``/etc`` on it would change the host. Instead, every command and
SFTP session of a root device is started by that device's own spawner process (see
:mod:`evc_sim.spawn`), which first makes, and keeps for as long as the device is served:

* a **mount namespace** with an overlay over each of :data:`SYSTEM_DIRS` (and
  :data:`OPTIONAL_DIRS`): the host's directory is the lower layer, and what the device writes
  lands in an upper directory in the device's state directory
  (``<simulator root>/devices/<name>/upper/...``). All of a device's commands share this one
  view, so a file one command writes to ``/etc`` is seen by the next one, never by the host nor
  by another device. The device's home is the real directory the simulator serves.
* a **user namespace** whose uid 0 is the host's unprivileged uid :data:`UID_BASE` (65536 ids):
  ``id -u`` prints 0 and root's powers hold over the device's own files, but the host sees an
  unprivileged uid (no writing the host's files, signalling its processes or changing its
  kernel settings). The overlays' lower layers and the home are idmapped mounts, so the host's
  root-owned files are root's inside too; the device's writes land on disk owned by the
  unprivileged uid (upper directories) or by the host's root (the home). Where the kernel or
  file system has no idmapped mounts, the device stays the host's uid 0 in its private mount
  namespace, with a warning.
* **UTS and IPC namespaces**: the device's hostname is its name, and its own to change.

Shared with the host: the network (devices reach the controller on loopback), process ids,
``/tmp`` and ``/run`` (as an unprivileged uid).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from evc.errors import ConfigError

#: where a playbook writes system-wide: each gets a private overlay
SYSTEM_DIRS: tuple[str, ...] = ("/etc", "/usr", "/var", "/opt", "/srv")
#: overlaid too, unless the simulator's own state lives under them (the default data directory
#: is under /root)
OPTIONAL_DIRS: tuple[str, ...] = ("/root", "/home")
#: the host uid (and gid) that is uid 0 in a root device's user namespace; 65536 ids from it on
UID_BASE = 0x70000000
#: characters overlayfs's mount options cannot carry in a path
_UNSAFE = frozenset(",:\\\n")


@dataclass(frozen=True)
class Isolation:
    """The namespaces one root device's commands run in, as its spawner process sets them up.

    ``uid_base``: the host uid that is root in the device's user namespace (0: no user
    namespace); ``overlays``: (directory, upper, work) triples; ``keep``: directories (the
    device's home) that stay the host's own, not overlaid, wherever they lie.
    """

    hostname: str
    uid_base: int
    overlays: tuple[tuple[str, str, str], ...]
    keep: tuple[str, ...]

    def to_arg(self) -> str:
        """One command-line argument for the spawner process (it parses it without the package)."""
        parts = [
            self.hostname,
            str(self.uid_base),
            *("|".join(o) for o in self.overlays),
            *("=" + k for k in self.keep),
        ]
        return "\n".join(parts)


def _under(path: Path, directory: str) -> bool:
    return path == Path(directory) or Path(directory) in path.parents


def isolation_for(name: str, state_dir: Path, home: Path) -> Isolation:
    """Prepare ``state_dir`` (upper and work directories) and describe device *name*'s namespaces.

    Raises ConfigError when the state directory cannot hold overlays of the system directories
    (overlayfs refuses an upper directory inside its lower one).
    """
    state = state_dir.resolve()
    if any(c in _UNSAFE for c in str(state)):
        raise ConfigError(f"the simulator's state directory {state} contains one of , : \\ (overlayfs cannot use it)")
    for directory in SYSTEM_DIRS:
        if _under(state, directory):
            raise ConfigError(
                f"simulated root devices keep their private {directory} in {state}, which is inside "
                f"{directory}; put the simulator's root directory elsewhere (for example under /root or /tmp)"
            )
    overlays = []
    for directory in (*SYSTEM_DIRS, *OPTIONAL_DIRS):
        if not os.path.isdir(directory) or os.path.islink(directory) or _under(state, directory):
            continue
        sub = directory.strip("/")
        upper, work = state / "upper" / sub, state / "work" / sub
        for d in (upper, work):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(upper, os.stat(directory).st_mode & 0o7777)  # the overlay's top takes the upper's mode
        overlays.append((directory, str(upper), str(work)))
    os.chmod(state, 0o700)
    return Isolation(hostname=name, uid_base=UID_BASE, overlays=tuple(overlays), keep=(str(home.resolve()),))
