"""Onboarding a fleet at once: an inventory's devices are created or updated, then registered as
one batch job (per-device results and reasons); re-importing the same file changes nothing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from evc import auth, devices
from evc.context import Context
from evc.inventory_import import InventoryEntry, InventoryProblem
from evc.model import JSON, DeviceState, Job, JobKindName
from evc.store import Store, now

Action = Literal["create", "update", "register", "unchanged", "invalid"]
#: what an inventory says about a device; a change to any of these is an update
FIELDS = ("host", "port", "username", "labels", "jump_host")
#: a change to one of these needs a new registration (the host key is pinned again)
CONNECTION = ("host", "port", "username", "jump_host")


@dataclass
class PlannedDevice:
    """What importing does to one device: create, update (which fields: [old, new]), register
    again (known but not online), leave unchanged, or refuse (invalid, with the reason)."""

    name: str
    action: Action
    device_id: str | None = None
    changes: dict[str, list[Any]] = field(default_factory=dict)
    reason: str = ""
    entry: InventoryEntry | None = None

    def public(self) -> JSON:
        out = asdict(self)
        out.pop("entry")
        return out


def plan(store: Store, entries: list[InventoryEntry], problems: list[InventoryProblem]) -> list[PlannedDevice]:
    """What importing *entries* would change, device by device (pure but for reading the store)."""
    out = [PlannedDevice(p.name, "invalid", reason=p.reason) for p in problems]
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            out.append(PlannedDevice(entry.name, "invalid", reason="listed more than once in the inventory"))
            continue
        seen.add(entry.name)
        dev_id = store.device_id_by_name(entry.name)
        if dev_id is None:
            out.append(PlannedDevice(entry.name, "create", entry=entry))
            continue
        dev = store.get_device(dev_id)
        want = entry.body()
        want["labels"] = {**(dev.get("labels") or {}), **want["labels"]}  # the inventory's labels win
        changes = {f: [dev.get(f), want[f]] for f in FIELDS if _norm(dev.get(f)) != _norm(want[f])}
        if changes:
            out.append(PlannedDevice(entry.name, "update", dev_id, changes, entry=entry))
        elif dev.get("state") != "online":
            reason = f"known but {dev.get('state')}: registered again"
            out.append(PlannedDevice(entry.name, "register", dev_id, reason=reason, entry=entry))
        else:
            out.append(PlannedDevice(entry.name, "unchanged", dev_id, entry=entry))
    return out


def _norm(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items() if v is not None and k != "host_key"} or None
    return value


def apply(ctx: Context, planned: list[PlannedDevice]) -> tuple[Job | None, dict[str, str]]:
    """Carry out a plan: create and update the devices, then one ``import`` job registers every
    device created, changed in how it is reached, or not online. Returns (the job or None when
    nothing needs registering, the new devices' tokens by name, shown once)."""
    store, settings, created_by = ctx.store, ctx.settings, ctx.actor
    targets: list[str] = []
    tokens: dict[str, str] = {}
    for p in planned:
        if p.entry is None or p.action in ("unchanged", "invalid"):
            continue
        body = p.entry.body()
        if p.action == "create":
            token = auth.make_token(auth.PREFIX_DEVICE, settings.token_bytes)
            dev = devices.new_record(body, created_by=created_by)
            store.create_device(dev, auth.hash_token(token))
            p.device_id, tokens[p.name] = dev["id"], token
            targets.append(dev["id"])
            continue
        assert p.device_id is not None
        if p.action == "update":
            update = {f: new for f, (_, new) in p.changes.items()}
            if any(f in CONNECTION for f in p.changes):
                update.update(state=DeviceState.PENDING, host_key=None, error=None, updated_at=now())
                targets.append(p.device_id)
            elif store.get_device(p.device_id).get("state") != DeviceState.ONLINE:
                targets.append(p.device_id)
            store.update_device(p.device_id, **update)
        else:  # register again
            store.update_device(p.device_id, state=DeviceState.PENDING, error=None)
            targets.append(p.device_id)
    if not targets:
        return None, tokens
    job, _ = ctx.with_key(None).submit(JobKindName.IMPORT, targets=targets)
    return job, tokens


__all__ = ["PlannedDevice", "apply", "plan"]
