"""Changing how a device is reached (host, port, user, jump host): the new details are
re-verified by a job and replace the old ones only when the device answers there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evc import ssh
from evc.errors import DeviceError
from evc.jobs import JobRun
from evc.registration import probe, record_online
from evc.settings import Settings
from evc.store import JSON, Store

#: the fields of a device record that say how to reach it
CONNECTION_FIELDS = ("host", "port", "username", "host_key", "jump_host")


def new_connection(dev: Mapping[str, Any], change: JSON) -> JSON:
    """The connection fields of *dev* after *change* (pure). Keys stay pinned where the address
    they belong to is unchanged; a new address (or a given key of None) is learned on first use,
    a key given in *change* is pinned as given."""
    out = {f: dev.get(f) for f in CONNECTION_FIELDS}
    out.update({f: change[f] for f in ("host", "port", "username") if f in change})
    if "host_key" in change:
        out["host_key"] = change["host_key"]
    elif (out["host"], int(out["port"] or 22)) != (dev.get("host"), int(dev.get("port") or 22)):
        out["host_key"] = None
    if "jump_host" in change:
        new, old = change["jump_host"], dev.get("jump_host") or {}
        if new is not None:
            new = {"port": 22, **new}
            same = (new["host"], int(new["port"])) == (old.get("host"), int(old.get("port") or 22))
            if "host_key" not in new:
                new["host_key"] = old.get("host_key") if same else None
        out["jump_host"] = new
    return out


async def reconnect(store: Store, settings: Settings, run: JobRun) -> JSON:
    """The re-verification job of changed connection details: probe the device there, and only
    when it answers replace its details (keys re-pinned, facts refreshed; id, token, labels,
    clusters and history stay). On failure the old details stay and the job fails with why."""
    device_id = run.job["targets"][0]
    dev = store.get_device(device_id)
    details = new_connection(dev, run.params.get("connection") or {})
    candidate = {**dev, **details}
    target = ssh.target_of(candidate)
    run.event(f"connecting to {target.address}", type="step", target=device_id)
    try:
        found = await probe(target, settings)
    except DeviceError as exc:
        exc.device_id = device_id
        run.result(device_id, {"ok": False, "error": exc.to_dict(), "kept": "the old connection details"})
        raise
    summary = record_online(store, run, candidate, found, first=False, also=details)
    store.log_event({"type": "device.connection", "device": device_id, "name": dev["name"],
                     "from": target_summary(dev), "to": target_summary(candidate)})  # fmt: skip
    return summary


def target_summary(dev: Mapping[str, Any]) -> str:
    """``user@host:port`` (``via user@host:port`` when behind a jump host)."""
    out = f"{dev.get('username')}@{dev.get('host')}:{dev.get('port')}"
    jump = dev.get("jump_host")
    if jump:
        out += f" via {jump.get('username')}@{jump.get('host')}:{jump.get('port', 22)}"
    return out
