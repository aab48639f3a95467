"""The private system view of a simulated ``root`` device: its own mount (and UTS, IPC) namespace.

A simulated root device's commands run as uid 0, so without this a playbook that installs a
package or writes ``/etc`` on it would change the host. Instead, every command and SFTP session
of a root device is started by that device's own spawner process (see :mod:`evc.sim.spawn`),
which first enters new mount, UTS and IPC namespaces and there mounts an overlay over each of
:data:`SYSTEM_DIRS`: the host's directory is the read-only lower layer, and what the device
writes lands in an upper directory in the device's state directory
(``<simulator root>/devices/<name>/upper/...``). All of a device's commands share that one
view, so a file one command writes to ``/etc`` is seen by the next, never by the host nor by
another device; the device's hostname is its own too. The device's home stays the real
directory the simulator serves (bound back in when it lies under an overlaid directory).

What this does not isolate: the host's network, processes and ``/proc``/``/sys``, ``/tmp`` and
``/run`` (a root device is still the host's uid 0 there).
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
#: characters overlayfs's mount options cannot carry in a path
_UNSAFE = frozenset(",:\\\n")


@dataclass(frozen=True)
class Isolation:
    """The namespaces one root device's commands run in, as its spawner process sets them up.

    ``overlays``: (directory, upper, work) triples; ``keep``: directories (the device's home)
    that must stay the host's own even where they lie under an overlaid directory.
    """

    hostname: str
    overlays: tuple[tuple[str, str, str], ...]
    keep: tuple[str, ...]

    def to_arg(self) -> str:
        """One command-line argument for the spawner process (it parses it without the package)."""
        parts = [self.hostname, *("|".join(o) for o in self.overlays), *("=" + k for k in self.keep)]
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
    overlays = []
    for directory in (*SYSTEM_DIRS, *OPTIONAL_DIRS):
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        if _under(state, directory):
            if directory in SYSTEM_DIRS:
                raise ConfigError(
                    f"simulated root devices keep their private {directory} in {state}, which is inside "
                    f"{directory}; put the simulator's root directory elsewhere (for example under /root or /tmp)"
                )
            continue
        sub = directory.strip("/")
        upper, work = state / "upper" / sub, state / "work" / sub
        for d in (upper, work):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(upper, os.stat(directory).st_mode & 0o7777)  # the overlay's top takes the upper's mode
        overlays.append((directory, str(upper), str(work)))
    os.chmod(state, 0o700)
    keep = (str(home.resolve()),) if any(_under(home.resolve(), o[0]) for o in overlays) else ()
    return Isolation(hostname=name, overlays=tuple(overlays), keep=keep)
