"""What brings a deployment back after its device reboots, on the device's side.

Rootless podman has no daemon: ``--restart`` policies act while podman runs, and nothing starts
a container at boot unless systemd does. So the container runs with ``--restart always`` (what
podman's own ``podman-restart.service`` starts: ``podman start --all --filter
restart-policy=always``), and after a container deployment EVC enables, where the device's
account has a systemd (user) manager:

* rootless podman: ``systemctl --user enable podman-restart.service`` and ``loginctl
  enable-linger <account>`` (the user's manager then starts at boot, without a login);
* podman as root: ``systemctl enable podman-restart.service``;
* docker: nothing (dockerd starts ``always`` containers itself when its service starts).

A process deployment (runtime ``process``) gets a unit of its own,
``evc-infer-<deployment>.service`` (``Type=oneshot``, ``RemainAfterExit``: ``supervise.sh
start`` at boot, ``stop`` at shutdown), enabled with ``systemctl --user`` and linger for an
account, or in ``/etc/systemd/system`` as root; removing the deployment disables and removes it
(:func:`remove_unit_command`).

Best effort: the answer is recorded in the device's result (``on_boot``); where there is no
systemd, the controller's health sweep restarts the server (:mod:`evc.deployments.servers`).
"""

from __future__ import annotations

import re

import asyncssh

from evc import ssh
from evc.settings import Settings

#: the account's user manager kept running without a login; prints what starts $unit at boot
_LINGER = r"""
if loginctl show-user "$u" -p Linger 2>/dev/null | grep -q '=yes' || loginctl enable-linger "$u" >/dev/null 2>&1; then
  echo "$unit (user $u, linger)"
else
  echo "$unit (user $u; no linger: from the account's first login)"
fi"""

#: prints one line: what starts the account's podman containers at boot
_PODMAN = (
    r"""u=$(id -un) unit=podman-restart.service
if [ "$(id -u)" = 0 ]; then
  if ! systemctl show-environment >/dev/null 2>&1; then echo "none: no systemd manager for $u"; exit 0; fi
  if systemctl enable $unit >/dev/null 2>&1; then echo "$unit"; exit 0; fi
  echo "none: systemctl enable $unit failed (no systemd?)"; exit 0
fi
if ! systemctl --user show-environment >/dev/null 2>&1; then
  echo "none: no systemd user manager for $u"; exit 0
fi
if ! systemctl --user enable $unit >/dev/null 2>&1; then
  echo "none: systemctl --user enable $unit failed for $u"; exit 0
fi"""
    + _LINGER
)

#: installs and enables a process deployment's unit; __UNIT__ and __DIR__ (the deployment's
#: folder relative to the home) are replaced; prints what starts it at boot
_PROCESS = (
    r"""u=$(id -un) unit=__UNIT__
if [ "$(id -u)" = 0 ]; then d=/etc/systemd/system sc= want=multi-user.target
else d=$HOME/.config/systemd/user sc=--user want=default.target; fi
if ! systemctl $sc show-environment >/dev/null 2>&1; then echo "none: no systemd${sc:+ user} manager for $u"; exit 0; fi
if ! { mkdir -p "$d" && printf '%s\n' '[Unit]' 'Description=EVC edge inference server (__UNIT__)' '[Service]' \
    'Type=oneshot' 'RemainAfterExit=yes' 'ExecStart=/bin/sh %h/__DIR__/supervise.sh start' \
    'ExecStop=/bin/sh %h/__DIR__/supervise.sh stop' '[Install]' "WantedBy=$want" > "$d/$unit" \
    && systemctl $sc daemon-reload && systemctl $sc enable "$unit" >/dev/null 2>&1; }; then
  echo "none: systemctl $sc enable $unit failed for $u"; exit 0
fi
if [ -z "$sc" ]; then echo "$unit"; exit 0; fi"""
    + _LINGER
)

_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


def unit_name(deployment_id: str) -> str:
    if not _SAFE.match(deployment_id):
        raise ValueError(f"not a deployment id: {deployment_id!r}")
    return f"evc-infer-{deployment_id}.service"


def process_command(deployment_id: str, folder: str) -> str:
    """The shell command that installs and enables a process deployment's unit (*folder*: its
    folder relative to the home, e.g. ``.evc/deploy/<id>``). Pure."""
    if not all(_SAFE.match(part) for part in folder.split("/")):
        raise ValueError(f"not a folder under the home: {folder!r}")
    return _PROCESS.replace("__UNIT__", unit_name(deployment_id)).replace("__DIR__", folder)


def remove_unit_command(deployment_id: str) -> str:
    """Disable and remove a process deployment's unit, wherever it is (none: fine). Pure."""
    unit = unit_name(deployment_id)
    return (
        'if [ "$(id -u)" = 0 ]; then d=/etc/systemd/system sc=; else d=$HOME/.config/systemd/user sc=--user; fi; '
        f'if [ -f "$d/{unit}" ]; then systemctl $sc disable {unit} >/dev/null 2>&1; rm -f "$d/{unit}"; '
        "systemctl $sc daemon-reload >/dev/null 2>&1; fi; true"
    )


async def _answer(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, cmd: str) -> str:
    res = await ssh.run(conn, cmd, target, settings, check=False)
    lines = [x for x in str(res.stdout or "").splitlines() if x.strip()]
    return lines[-1] if lines else f"none: exit status {res.exit_status}"


async def enable(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, rt: str) -> str:
    """Make *rt*'s ``always`` containers start at boot where systemd can: what does it (or
    ``none: <why>``)."""
    if rt != "podman":
        return f"{rt}'s restart policy (its service)"
    return await _answer(conn, target, settings, _PODMAN)


async def enable_process(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings,
                         deployment_id: str, folder: str) -> str:  # fmt: skip
    """Make a process deployment's supervisor start at boot where systemd can: what does it."""
    return await _answer(conn, target, settings, process_command(deployment_id, folder))


__all__ = ["enable", "enable_process", "process_command", "remove_unit_command", "unit_name"]
