"""What brings a container deployment back after its device reboots, on the device's side.

Rootless podman has no daemon: ``--restart`` policies act while podman runs, and nothing starts
a container at boot unless systemd does. So the container runs with ``--restart always`` (what
podman's own ``podman-restart.service`` starts: ``podman start --all --filter
restart-policy=always``), and after a container deployment EVC enables, where the device's
account has a systemd (user) manager:

* rootless podman: ``systemctl --user enable podman-restart.service`` and ``loginctl
  enable-linger <account>`` (the user's manager then starts at boot, without a login);
* podman as root: ``systemctl enable podman-restart.service``;
* docker: nothing (dockerd starts ``always`` containers itself when its service starts).

Best effort: the answer is recorded in the device's result (``on_boot``); where there is no
systemd, the controller's health sweep restarts the server (:mod:`evc.deployments.servers`).
"""

from __future__ import annotations

import asyncssh

from evc import ssh
from evc.settings import Settings

#: prints one line: what starts the account's podman containers at boot
_PODMAN = r"""u=$(id -un)
if [ "$(id -u)" = 0 ]; then
  if systemctl enable podman-restart.service >/dev/null 2>&1; then echo "podman-restart.service"; exit 0; fi
  echo "none: systemctl enable podman-restart.service failed (no systemd?)"; exit 0
fi
if ! systemctl --user show-environment >/dev/null 2>&1; then
  echo "none: no systemd user manager for $u"; exit 0
fi
if ! systemctl --user enable podman-restart.service >/dev/null 2>&1; then
  echo "none: systemctl --user enable podman-restart.service failed for $u"; exit 0
fi
if loginctl show-user "$u" -p Linger 2>/dev/null | grep -q '=yes' || loginctl enable-linger "$u" >/dev/null 2>&1; then
  echo "podman-restart.service (user $u, linger)"
else
  echo "podman-restart.service (user $u; no linger: from the account's first login)"
fi"""


async def enable(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, rt: str) -> str:
    """Make *rt*'s ``always`` containers start at boot where systemd can: what does it (or
    ``none: <why>``)."""
    if rt != "podman":
        return f"{rt}'s restart policy (its service)"
    res = await ssh.run(conn, _PODMAN, target, settings, check=False)
    lines = [x for x in str(res.stdout or "").splitlines() if x.strip()]
    return lines[-1] if lines else f"none: exit status {res.exit_status}"


__all__ = ["enable"]
