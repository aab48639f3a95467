"""Device registry service: create (and enqueue registration), filter, update, remove."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from evc import auth, jobs
from evc.context import Context
from evc.errors import Conflict
from evc.model import JSON, REGISTERING_STATES, Device, DeviceState, Job, JobKindName
from evc.store import Store, new_id, now

HIDDEN = ("token_hash",)


def public(dev: Device | JSON) -> Device:
    return cast(Device, {k: v for k, v in dev.items() if k not in HIDDEN})


def create(ctx: Context, data: JSON, *, extra_labels: dict[str, str] | None = None) -> tuple[Device, Job, str | None]:
    """Store a ``pending`` device and enqueue its registration job.

    Returns (device, job, token). With a repeated idempotency key (the context's) the first
    device and job come back and the token is None (it was shown once)."""
    store, settings, created_by, idempotency_key = ctx.store, ctx.settings, ctx.actor, ctx.idempotency_key
    idem_name, _, fingerprint = (idempotency_key or "").partition("\n")  # see jobs.scoped_key
    if idempotency_key:
        prior = store.get_json(f"idem-device:{created_by}:{idem_name}")
        if prior:
            if prior.get("fingerprint", "") != fingerprint:
                raise Conflict(
                    "this Idempotency-Key was already used to register another device; use a new key",
                    field="Idempotency-Key",
                )
            return public(store.get_device(prior["device"])), jobs.get(store, prior["job"]), None
    token = auth.make_token(auth.PREFIX_DEVICE, settings.token_bytes)
    dev = new_record(data, created_by=created_by, extra_labels=extra_labels)
    store.create_device(dev, auth.hash_token(token))
    job, _ = ctx.with_key(None).submit(JobKindName.REGISTER, targets=[dev["id"]])
    if idempotency_key:
        store.put_json(
            f"idem-device:{created_by}:{idem_name}",
            {"device": dev["id"], "job": job["id"], "fingerprint": fingerprint},
            ttl_s=settings.idempotency_ttl_s,
        )
    return public(dev), job, token


def new_record(data: JSON, *, created_by: str, extra_labels: dict[str, str] | None = None) -> Device:
    """A new ``pending`` device record from its create body (not stored yet)."""
    return {
        "id": new_id("dev"),
        "name": data["name"],
        "host": data["host"],
        "port": int(data.get("port", 22)),
        "username": data["username"],
        "labels": {**(extra_labels or {}), **(data.get("labels") or {})},
        "jump_host": data.get("jump_host"),
        "state": DeviceState.PENDING,
        "host_key": None,
        "privilege": None,
        "capabilities": [],
        "facts": {},
        "level": 0,
        "cluster_id": None,
        "health": None,
        "error": None,
        "created_at": now(),
        "created_by": created_by,
        "registered_at": None,
        "last_seen": None,
    }


def parse_selector(labels: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in labels or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            from evc.errors import ValidationError

            raise ValidationError(f"label filter {item!r} must be key=value", field="label")
        out[k] = v
    return out


def matcher(
    state: str | None = None,
    labels: dict[str, str] | None = None,
    cluster: str | None = None,
    name: str | None = None,
) -> Callable[[Mapping[str, Any]], bool] | None:
    if not (state or labels or cluster or name):
        return None

    def match(dev: Mapping[str, Any]) -> bool:
        if state and dev.get("state") != state:
            return False
        if cluster and dev.get("cluster_id") != cluster:
            return False
        if name and not str(dev.get("name", "")).startswith(name):
            return False
        have = dev.get("labels") or {}
        return all(have.get(k) == v for k, v in (labels or {}).items())

    return match


def update(store: Store, device_id: str, changes: JSON) -> Device:
    dev = store.get_device(device_id)
    if "name" in changes and changes["name"] != dev["name"]:
        store.rename_device(device_id, dev["name"], changes["name"])
    return public(store.update_device(device_id, **changes))


def change_connection(ctx: Context, device_id: str, connection: JSON) -> Job:
    """Enqueue the job that re-verifies a device at new connection details (host, port, user,
    jump host, host key) and switches to them only when the device answers there."""
    dev = ctx.store.get_device(device_id)
    if dev.get("state") in REGISTERING_STATES:
        raise Conflict("the device's registration has not finished; wait for its job", field="connection")
    job, _ = ctx.submit(JobKindName.RECONNECT, params={"connection": connection}, targets=[device_id])
    return job


def remove(store: Store, device_id: str) -> Device:
    dev = store.delete_device(device_id)
    store.log_event({"type": "device.removed", "device": device_id, "name": dev["name"]})
    return public(dev)


def retry_registration(ctx: Context, device_id: str) -> Job:
    """Register a device again after its registration failed (fixed key, address or network):
    it goes back to ``pending`` and a new registration job runs. Refused for an online device."""
    store = ctx.store
    dev = store.get_device(device_id)
    if dev.get("state") == DeviceState.ONLINE:
        raise Conflict(
            f"{dev['name']} is online already; to re-probe its facts use POST /api/v1/devices/{device_id}/facts",
            state=DeviceState.ONLINE,
        )
    store.update_device(device_id, state=DeviceState.PENDING, error=None)
    job, _ = ctx.with_key(None).submit(JobKindName.REGISTER, targets=[device_id])
    store.log_event({"type": "device.state", "device": device_id, "from": dev.get("state"), "to": DeviceState.PENDING,
                     "reason": "registration retried"})  # fmt: skip
    return job
