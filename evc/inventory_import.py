"""Read a fleet to onboard from an Ansible inventory (INI or YAML, parsed by Ansible) or a CSV.

The result is data: the devices found (name, connection, labels, jump host) and, for each host
that cannot become a device, the reason. Nothing here touches the store or the network.

* Ansible inventories are parsed by Ansible's own ``ini``/``yaml`` inventory plugins through
  ``InventoryData`` and ``DataLoader`` (no script or plugin-config sources: an inventory is data,
  never code). Variables are taken raw, never templated, so ``{{ lookup('pipe', …) }}`` stays a
  string (and is refused as a host name). Group variables apply as Ansible applies them.
* ``ansible_host``, ``ansible_port``, ``ansible_user`` give the connection; every group a host
  is in (but ``all``/``ungrouped``) becomes a label ``<group>=true``; a host variable
  ``evc_labels`` (a mapping) adds labels; a jump host comes from ``-o ProxyJump=…`` or ``-J …``
  in ``ansible_ssh_common_args``/``ansible_ssh_extra_args``.
* A CSV has a header row: ``name,host[,port][,user|username][,labels][,jump]``; labels are
  ``k=v`` separated by ``;`` or spaces; jump is ``user@host[:port]``.
"""

from __future__ import annotations

import csv
import io
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from evc.errors import ValidationError

Format = Literal["ini", "yaml", "csv"]
FORMATS: tuple[Format, ...] = ("ini", "yaml", "csv")
#: groups every Ansible host is in; they say nothing about the device
_IMPLICIT_GROUPS = {"all", "ungrouped"}


@dataclass(frozen=True)
class InventoryEntry:
    """One device as an inventory describes it (the API's device-create body, as a dict)."""

    name: str
    host: str
    username: str
    port: int = 22
    labels: dict[str, str] = field(default_factory=dict)
    jump_host: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "labels": dict(self.labels),
            "jump_host": dict(self.jump_host) if self.jump_host else None,
        }


@dataclass(frozen=True)
class InventoryProblem:
    """A host that cannot become a device, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Inventory:
    entries: list[InventoryEntry]
    problems: list[InventoryProblem]


def detect_format(content: str, filename: str = "") -> Format:
    """csv by file name; yaml when the text is a YAML mapping; ini otherwise."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".yml", ".yaml"):
        return "yaml"
    if suffix in (".ini", ".cfg"):
        return "ini"
    try:
        loaded = yaml.safe_load(content)
    except yaml.YAMLError:
        return "ini"
    return "yaml" if isinstance(loaded, dict) else "ini"


def parse(content: str, fmt: Format | None = None, filename: str = "", default_user: str | None = None) -> Inventory:
    """The devices *content* describes. Raises ValidationError when the file as a whole cannot be
    read; a host that cannot become a device is an :class:`InventoryProblem` instead."""
    fmt = fmt or detect_format(content, filename)
    if fmt not in FORMATS:
        raise ValidationError(f"unknown inventory format {fmt!r}: use one of {', '.join(FORMATS)}", field="format")
    hosts = _csv_hosts(content) if fmt == "csv" else _ansible_hosts(content, fmt)
    entries: list[InventoryEntry] = []
    problems: list[InventoryProblem] = []
    for name, hostvars, groups in hosts:
        try:
            entries.append(_entry(name, hostvars, groups, default_user))
        except ValueError as exc:
            problems.append(InventoryProblem(name, str(exc)))
    return Inventory(entries, problems)


# -- Ansible inventories ---------------------------------------------------------------------------


def _ansible_hosts(content: str, fmt: Format) -> list[tuple[str, dict[str, Any], list[str]]]:
    from ansible.errors import AnsibleError
    from ansible.inventory.data import InventoryData
    from ansible.inventory.helpers import get_group_vars
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import inventory_loader
    from ansible.utils.vars import combine_vars

    plugin = inventory_loader.get(fmt)
    if plugin is None:  # pragma: no cover - both plugins ship with ansible-core
        raise ValidationError(f"Ansible's {fmt} inventory plugin is not available here")
    data = InventoryData()
    with tempfile.TemporaryDirectory(prefix="evc-inventory-") as tmp:
        path = Path(tmp) / f"inventory.{'yml' if fmt == 'yaml' else 'ini'}"
        path.write_text(content)
        try:
            plugin.parse(data, DataLoader(), str(path), cache=False)
            data.reconcile_inventory()
        except AnsibleError as exc:
            message = str(getattr(exc, "message", exc)).replace(str(path), "the inventory")
            raise ValidationError(f"cannot read the inventory as {fmt}: {message}", field="content") from exc
    out = []
    for name, host in data.hosts.items():
        groups = [g for g in host.get_groups() if g.name not in _IMPLICIT_GROUPS]
        hostvars = combine_vars(get_group_vars(host.get_groups()), host.get_vars())
        out.append((name, dict(hostvars), sorted(g.name for g in groups)))
    return out


# -- CSV -------------------------------------------------------------------------------------------


def _csv_hosts(content: str) -> list[tuple[str, dict[str, Any], list[str]]]:
    reader = csv.DictReader(io.StringIO(content.lstrip("\ufeff")))
    cols = {c.strip().lower() for c in reader.fieldnames or []}
    if not {"name", "host"} <= cols:
        raise ValidationError("a CSV inventory needs a header row with at least: name,host", field="content")
    out: list[tuple[str, dict[str, Any], list[str]]] = []
    for row in reader:
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not any(r.values()):
            continue
        hostvars: dict[str, Any] = {"ansible_host": r.get("host")}
        if r.get("port"):
            hostvars["ansible_port"] = r["port"]
        if r.get("user") or r.get("username"):
            hostvars["ansible_user"] = r.get("user") or r.get("username")
        if r.get("labels"):
            hostvars["evc_labels"] = _labels_text(r["labels"])
        if r.get("jump"):
            hostvars["ansible_ssh_common_args"] = f"-o ProxyJump={r['jump']}"
        out.append((r.get("name", ""), hostvars, []))
    return out


def _labels_text(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.replace(";", " ").split():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValidationError(f"label {item!r} must be key=value", field="labels")
        out[k] = v
    return out


# -- one host --------------------------------------------------------------------------------------


def _entry(name: str, hostvars: dict[str, Any], groups: list[str], default_user: str | None) -> InventoryEntry:
    host = str(hostvars.get("ansible_host") or name)
    user = hostvars.get("ansible_user") or hostvars.get("ansible_ssh_user") or default_user
    if not user:
        raise ValueError("no user: set ansible_user for it (or its group), or give a default user")
    port = _port(hostvars.get("ansible_port") or hostvars.get("ansible_ssh_port") or 22)
    labels = {g: "true" for g in groups}
    extra = hostvars.get("evc_labels") or {}
    if not isinstance(extra, dict):
        raise ValueError("evc_labels must be a mapping of label keys to values")
    labels.update({str(k): str(v) for k, v in extra.items()})
    jump = None
    for var in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        jump = jump or jump_host_of(str(hostvars.get(var) or ""))
    return InventoryEntry(name=name, host=host, username=str(user), port=port, labels=labels, jump_host=jump)


def _port(value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"port {value!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (1-65535)")
    return port


def jump_host_of(ssh_args: str) -> dict[str, Any] | None:
    """The jump host in OpenSSH arguments (``-o ProxyJump=u@h:p``, ``-o ProxyJump u@h``,
    ``-J u@h``), as ``{"username", "host", "port"}``; None when there is none.

    Raises ValueError for what EVC cannot follow: a chain of jumps, or a ProxyCommand."""
    try:
        words = shlex.split(ssh_args)
    except ValueError as exc:
        raise ValueError(f"cannot split the SSH arguments {ssh_args!r}: {exc}") from None
    spec = None
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        option = ""
        if word == "-o":
            option = nxt
        elif word.startswith("-o"):
            option = word[2:]
        elif word == "-J":
            spec = nxt
        elif word.startswith("-J"):
            spec = word[2:]
        key, _, value = option.replace(" ", "=", 1).partition("=")
        if key.lower() == "proxyjump":
            spec = value
        elif key.lower() == "proxycommand":
            raise ValueError("a ProxyCommand is not supported: use ProxyJump=user@host[:port]")
    if not spec or spec.lower() == "none":
        return None
    if "," in spec:
        raise ValueError(f"a chain of jump hosts ({spec}) is not supported: one jump host at most")
    spec = spec.removeprefix("ssh://")
    user, at, hostport = spec.rpartition("@")
    if not at or not user:
        raise ValueError(f"the jump host {spec!r} needs a user: user@host[:port]")
    host, port = hostport, "22"
    if hostport.startswith("["):  # [v6]:port
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":") or "22"
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    return {"username": user, "host": host, "port": _port(port)}


__all__ = [
    "FORMATS",
    "Format",
    "Inventory",
    "InventoryEntry",
    "InventoryProblem",
    "detect_format",
    "jump_host_of",
    "parse",
]
