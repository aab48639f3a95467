"""A per-job Ansible inventory built from the registry, in a private directory removed after."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evc.errors import ConfigError

log = logging.getLogger(__name__)

JSON = dict[str, Any]

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$|^[0-9A-Fa-f:.]{2,45}$")
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$")
_HOST_KEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3}$")
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_GROUP_BAD = re.compile(r"[^a-z0-9_]")

#: OpenSSH options every connection of a job uses (written to the job's ssh_config)
SSH_DEFAULTS: dict[str, str] = {
    "IdentitiesOnly": "yes",
    "GlobalKnownHostsFile": "/dev/null",
    "StrictHostKeyChecking": "yes",
    "UpdateHostKeys": "no",
    "CheckHostIP": "no",
    "BatchMode": "yes",
    "PasswordAuthentication": "no",
    "KbdInteractiveAuthentication": "no",
    "PreferredAuthentications": "publickey",
    "ServerAliveInterval": "15",
    "ServerAliveCountMax": "3",
    "LogLevel": "ERROR",
}


class BadRecord(ConfigError):
    """A registry record cannot be put into an inventory safely (a field fails its pattern)."""


def host_key_line(host_key: str) -> str:
    """``type base64`` from a pinned host key (a trailing comment dropped); refuses anything
    that could add lines or options to known_hosts."""
    text = (host_key or "").strip()
    parts = text.split()
    if "\n" in text or "\r" in text or not 2 <= len(parts) <= 3:
        raise BadRecord("the device's pinned host key is not one key line; re-pin it")
    if not _HOST_KEY.match(f"{parts[0]} {parts[1]}"):
        raise BadRecord("the device has no valid pinned host key; re-register or re-pin it")
    return f"{parts[0]} {parts[1]}"


def _check(value: Any, pattern: re.Pattern[str], what: str) -> str:
    text = str(value or "")
    if not pattern.match(text):
        raise BadRecord(f"the device's {what} {text!r} is not valid")
    return text


def _port(value: Any) -> int:
    try:
        port = int(value or 22)
    except (TypeError, ValueError):
        raise BadRecord(f"the device's port {value!r} is not valid") from None
    if not 0 < port < 65536:
        raise BadRecord(f"the device's port {port} is not valid")
    return port


def group_name(prefix: str, *parts: str) -> str:
    return _GROUP_BAD.sub("_", "_".join((prefix, *parts)).lower())[:100]


@dataclass
class Inventory:
    """The files of one job's inventory; all of them live under ``root`` (mode 0700)."""

    root: Path
    hosts: dict[str, JSON] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def inventory_path(self) -> Path:
        return self.root / "inventory" / "hosts.json"

    @property
    def internal_vars_path(self) -> Path:
        """EVC's own variables (``evc_*``), given to ansible-playbook with ``-e @path``."""
        return self.root / "inventory" / "evc_vars.yml"

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh" / "config"

    @property
    def known_hosts(self) -> Path:
        return self.root / "ssh" / "known_hosts"

    @property
    def control_dir(self) -> Path:
        return self.root / "cp"

    def ssh_args(self, control_persist_s: int = 60) -> str:
        """ANSIBLE_SSH_ARGS: the job's ssh_config plus connection sharing."""
        cfg = shlex.quote(str(self.ssh_config))
        return f"-F {cfg} -o ControlMaster=auto -o ControlPersist={control_persist_s}s"

    def env(self, connect_timeout_s: float = 10.0) -> dict[str, str]:
        """The Ansible environment for this inventory: pipelining, strict host keys, no caches."""
        return {
            "ANSIBLE_SSH_ARGS": self.ssh_args(),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control_dir),
            "ANSIBLE_SSH_CONTROL_PATH": "%(directory)s/%%C",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_GATHERING": "explicit",
            "ANSIBLE_CACHE_PLUGIN": "memory",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_TIMEOUT": str(int(max(1.0, connect_timeout_s))),
            "ANSIBLE_LOCAL_TEMP": str(self.root / "tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "ANSIBLE_SYSTEM_WARNINGS": "False",
            "ANSIBLE_INVENTORY_ENABLED": "yaml",
            "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
        }


def _quote(path: Path) -> str:
    text = str(path)
    if '"' in text or "\n" in text:
        raise ConfigError(f"path {text!r} cannot be written to an ssh_config")
    return f'"{text}"'


def _ssh_block(alias: str, options: Mapping[str, str]) -> str:
    lines = [f"Host {alias}"]
    lines += [f"  {k} {v}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def _jump_key(jump: Mapping[str, Any], registry: Iterable[Mapping[str, Any]]) -> str:
    """The pinned key of a jump host: its own record's ``host_key``, else a registered device
    at the same address and port."""
    if jump.get("host_key"):
        return host_key_line(str(jump["host_key"]))
    for dev in registry:
        if dev.get("host") == jump.get("host") and int(dev.get("port") or 22) == _port(jump.get("port")):
            if dev.get("host_key"):
                return host_key_line(str(dev["host_key"]))
    raise BadRecord(
        f"the jump host {jump.get('host')}:{_port(jump.get('port'))} has no pinned host key "
        "(register it as a device or pin its key on the device record)"
    )


def interpreter(dev: Mapping[str, Any]) -> str:
    """The device's Python 3: a recorded absolute path, else ``/usr/bin/python3``."""
    facts = dev.get("facts") or {}
    for key in ("python3_path", "python_path", "python3"):
        val = facts.get(key)
        if isinstance(val, str) and val.startswith("/") and re.match(r"^[A-Za-z0-9_./+-]+$", val):
            return val
    return "/usr/bin/python3"


def host_vars(dev: Mapping[str, Any], jump_alias: str | None) -> JSON:
    dev_id = _check(dev.get("id"), _ID, "id")
    extra = f"-o HostKeyAlias={dev_id}"
    if jump_alias:
        extra += f" -o ProxyJump={jump_alias}"
    privilege = str(dev.get("privilege") or "user")
    hv: JSON = {
        "ansible_host": _check(dev.get("host"), _HOST, "host"),
        "ansible_port": _port(dev.get("port")),
        "ansible_user": _check(dev.get("username"), _USER, "username"),
        "ansible_ssh_extra_args": extra,
        "ansible_python_interpreter": interpreter(dev),
        # become is per task, only where the account may: see the playbooks' evc_become
        "ansible_become": False,
        "evc_device_id": dev_id,
        "evc_privilege": privilege,
        "evc_become": privilege == "sudo",
        "evc_can_admin": privilege in ("root", "sudo"),
    }
    name = str(dev.get("name") or "")
    if _ID.match(name):
        hv["evc_device_name"] = name
    return hv


def render(
    devices: Iterable[Mapping[str, Any]],
    key_path: Path,
    root: Path,
    registry: Iterable[Mapping[str, Any]] = (),
    internal_vars: Mapping[str, Any] | None = None,
) -> Inventory:
    """Write the inventory, ssh_config and known_hosts for *devices* under *root*.

    A device whose record cannot be used safely (no pinned key, a bad field) is left out and
    named in ``Inventory.refused`` with the reason."""
    inv = Inventory(root)
    jumps = _Jumps(list(registry))
    known = jumps.known  # each jump host's line comes before the first device behind it
    groups: dict[str, list[str]] = {}
    for dev in devices:
        dev_id = str(dev.get("id"))
        try:
            key = host_key_line(str(dev.get("host_key") or ""))
            hv = host_vars(dev, jumps.alias(dev))
        except BadRecord as exc:
            inv.refused[dev_id] = exc.message
            continue
        known.append(f"{dev_id} {key}")
        inv.hosts[dev_id] = hv
        _add_to_groups(groups, dev, hv)
    _write_files(inv, key_path, known, jumps.blocks, groups, internal_vars)
    return inv


class _Jumps:
    """The jump hosts of one inventory: one ssh_config alias per (host, port, user), with its
    pinned key in known_hosts."""

    def __init__(self, registry: list[Mapping[str, Any]]) -> None:
        self.registry = registry
        self.aliases: dict[tuple[str, int, str], str] = {}
        self.blocks: list[str] = []  # ssh_config blocks
        self.known: list[str] = []  # known_hosts lines (render adds the devices' own)

    def alias(self, dev: Mapping[str, Any]) -> str | None:
        """The alias of *dev*'s jump host (declared on first use); None without one."""
        jump = dev.get("jump_host")
        if not jump:
            return None
        jkey = (
            _check(jump.get("host"), _HOST, "jump host"),
            _port(jump.get("port")),
            _check(jump.get("username") or dev.get("username"), _USER, "jump user"),
        )
        jump_alias = self.aliases.get(jkey)
        if jump_alias is None:
            jkey_line = _jump_key(jump, self.registry)
            jump_alias = self.aliases[jkey] = f"evc-jump-{len(self.aliases)}"
            options = {"HostName": jkey[0], "Port": str(jkey[1]), "User": jkey[2], "HostKeyAlias": jump_alias}
            self.blocks.append(_ssh_block(jump_alias, options))
            self.known.append(f"{jump_alias} {jkey_line}")
        return jump_alias


def _add_to_groups(groups: dict[str, list[str]], dev: Mapping[str, Any], hv: JSON) -> None:
    """Put the device in its privilege's, its labels' and its cluster's groups."""
    dev_id = str(dev.get("id"))
    groups.setdefault(group_name("privilege", hv["evc_privilege"]), []).append(dev_id)
    for k, v in sorted((dev.get("labels") or {}).items()):
        groups.setdefault(group_name("label", str(k), str(v)), []).append(dev_id)
    if dev.get("cluster_id"):
        groups.setdefault(group_name("cluster", str(dev["cluster_id"])), []).append(dev_id)


def _write_files(
    inv: Inventory,
    key_path: Path,
    known: list[str],
    jump_blocks: list[str],
    groups: dict[str, list[str]],
    internal_vars: Mapping[str, Any] | None,
) -> None:
    """The inventory's directories (0700) and files: ssh_config, known_hosts, hosts.json, EVC's vars."""
    for sub in ("inventory", "ssh", "cp", "tmp", "runner"):
        (inv.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    defaults = {
        **SSH_DEFAULTS,
        "IdentityFile": _quote(key_path),
        "UserKnownHostsFile": _quote(inv.known_hosts),
    }
    inv.ssh_config.write_text("".join(jump_blocks) + _ssh_block("*", defaults))
    inv.known_hosts.write_text("\n".join(known) + "\n")
    doc: JSON = {
        "all": {
            "hosts": inv.hosts,
            "children": {g: {"hosts": {h: None for h in hs}} for g, hs in sorted(groups.items())},
        }
    }
    inv.inventory_path.write_text(json.dumps(doc, indent=1))
    inv.internal_vars_path.write_text(unsafe_vars(internal_vars or {}))


def unsafe_vars(values: Mapping[str, Any]) -> str:
    """A YAML vars file in which every string is ``!unsafe``: Ansible never templates it."""
    lines = []
    for k, v in values.items():
        if not re.match(r"^evc_[a-z0-9_]+$", k):
            raise ConfigError(f"internal variable {k!r} must be named evc_*")
        text = json.dumps(v)  # a JSON scalar is a YAML flow scalar
        lines.append(f"{k}: !unsafe {text}" if isinstance(v, str) else f"{k}: {text}")
    return "\n".join(lines) + "\n" if lines else "{}\n"


def close_masters(inv: Inventory, timeout_s: float = 5.0) -> None:
    """Stop the job's ControlPersist masters so no connection outlives the job."""
    if not inv.control_dir.is_dir():
        return
    procs = []
    for sock in inv.control_dir.iterdir():
        procs.append(
            subprocess.Popen(
                ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "evc-master"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        )
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _dir_prefix(ident: str) -> str:
    return "evc-" + re.sub(r"[^A-Za-z0-9_-]", "", ident)[:24]


def remove_job_dirs(job_id: str, base_dir: Path | None = None) -> int:
    """Remove the inventories (and ansible-runner data) that killed executions of *job_id*
    left behind, their SSH masters closed first. Returns how many directories went."""
    base = Path(base_dir or tempfile.gettempdir())
    prefix = _dir_prefix(job_id)
    removed = 0
    for root in base.glob(prefix + "*"):
        if not root.is_dir() or root.is_symlink() or root.stat().st_uid != os.getuid():
            continue
        close_masters(Inventory(root))
        shutil.rmtree(root, ignore_errors=True)
        removed += 1
    return removed


#: a Unix socket's path is at most 107 bytes on Linux (104 on the BSDs); ssh's ControlPath is
#: ``<root>/cp/<40 hex of %C>`` plus the 17-character temporary suffix ssh adds while it binds
_SOCKET_PATH_MAX = 104
_CONTROL_NAME = len("/cp/") + 40 + 17
#: where job directories go when the temp dir's path is too long for the control sockets
SHORT_TMP = "/tmp"  # noqa: S108 - only its length matters; mkdtemp makes a private dir in it


def control_path_fits(root: Path) -> bool:
    """Whether ssh's control sockets fit under *root* (a job directory)."""
    return len(os.fsencode(str(root))) + _CONTROL_NAME <= _SOCKET_PATH_MAX


@contextmanager
def job_inventory(
    devices: Iterable[Mapping[str, Any]],
    key_path: Path,
    ident: str,
    registry: Iterable[Mapping[str, Any]] = (),
    internal_vars: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
) -> Iterator[Inventory]:
    """A private directory holding one job's inventory; removed, masters closed, on exit.

    The directory sits in the system temp dir by default: ControlPath sockets must stay
    under the ~104-byte limit of a Unix socket path."""
    if not key_path.is_file():
        raise ConfigError(f"EVC's SSH key {key_path} is missing (start EVC once to create it)")
    root = Path(tempfile.mkdtemp(prefix=_dir_prefix(ident) + "-", dir=base_dir))
    if base_dir is None and not control_path_fits(root) and os.access(SHORT_TMP, os.W_OK):
        root.rmdir()  # a long $TMPDIR: ssh could not make its control sockets there
        root = Path(tempfile.mkdtemp(prefix=_dir_prefix(ident) + "-", dir=SHORT_TMP))
    os.chmod(root, 0o700)
    inv: Inventory | None = None
    try:
        inv = render(devices, key_path, root, registry, internal_vars)
        yield inv
    finally:
        if inv is not None:
            close_masters(inv)
        shutil.rmtree(root, ignore_errors=True)
