"""Devices: register (operator or enrollment token), list, show, update, remove, re-pin."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from evc import auth, devices, enrollment, jobs
from evc.api.deps import (
    actor,
    authenticate,
    authenticated,
    get_sender,
    get_settings,
    get_store,
    idempotency_key,
    require,
    require_device,
)
from evc.api.schemas import (
    DeviceCreatedSchema,
    DeviceCreateSchema,
    DeviceListArgs,
    DevicePageSchema,
    DeviceSchema,
    DeviceUpdateSchema,
    HeartbeatSchema,
    HostKeySchema,
    JobSchema,
    page,
)
from evc.errors import Forbidden
from evc.store import now

blp = Blueprint("devices", __name__, url_prefix="/api/v1", description="Edge devices")


@blp.route("/devices", methods=["POST"])
@authenticated
@blp.arguments(DeviceCreateSchema)
@blp.response(202, DeviceCreatedSchema)
def register(data: dict[str, Any]) -> Any:
    """Register a device: {SSH connection info, user} -> the device (pending), its registration
    job and the device's own token (shown once).

    Takes an operator token with the admin scope, or an enrollment token (one use is spent).
    Install EVC's key on the device first (GET /api/v1/ssh-key)."""
    store, settings = get_store(), get_settings()
    who = authenticate()
    extra: dict[str, str] = {}
    if who.kind == "enrollment":  # checked before a use is spent
        extra = enrollment.check_registration(store.get_enrollment(who.id), data)
        auth.use_enrollment(store, who)
    else:
        auth.check_scope(who, "admin")
    dev, job, token = devices.create(
        store, settings, get_sender(), data, created_by=actor(), extra_labels=extra,
        idempotency_key=idempotency_key(),
    )  # fmt: skip
    out: dict[str, Any] = {"device": dev, "job": job}
    if token:
        out["token"] = token
    return out


@blp.route("/devices", methods=["GET"])
@require("read")
@blp.arguments(DeviceListArgs, location="query")
@blp.response(200, DevicePageSchema)
def list_devices(args: dict[str, Any]) -> Any:
    """Devices, oldest first; filter by state, labels (key=value, repeatable), cluster, name prefix."""
    match = devices.matcher(
        args.get("state"), devices.parse_selector(args.get("label")), args.get("cluster"), args.get("name")
    )
    items, total = get_store().list_devices(args["offset"], args["limit"], match)
    return page([devices.public(d) for d in items], total, args)


@blp.route("/devices/self", methods=["GET"])
@require_device
@blp.response(200, DeviceSchema)
def device_self() -> Any:
    """The calling device's own record (device token)."""
    return devices.public(get_store().get_device(authenticate().id))


@blp.route("/devices/self/heartbeat", methods=["POST"])
@require_device
@blp.arguments(HeartbeatSchema)
@blp.response(200, DeviceSchema)
def heartbeat(data: dict[str, Any]) -> Any:
    """A device reports it is alive (for devices SSH cannot always reach)."""
    from evc import health

    return devices.public(health.record_heartbeat(get_store(), get_settings(), authenticate().id, data))


@blp.route("/devices/<id:device_id>", methods=["GET"])
@require("read")
@blp.response(200, DeviceSchema)
def show(device_id: str) -> Any:
    """One device with its facts, privilege level and what that level allows."""
    return devices.public(get_store().get_device(device_id))


@blp.route("/devices/<id:device_id>", methods=["PATCH"])
@require("admin")
@blp.arguments(DeviceUpdateSchema)
@blp.response(200, DeviceSchema)
def update(data: dict[str, Any], device_id: str) -> Any:
    """Rename a device or replace its labels."""
    return devices.update(get_store(), device_id, data)


@blp.route("/devices/<id:device_id>", methods=["DELETE"])
@require("admin")
@blp.response(200, DeviceSchema)
def remove(device_id: str) -> Any:
    """Forget a device (its token stops working). Clean it up first with the cleanup playbook."""
    return devices.remove(get_store(), device_id)


@blp.route("/devices/<id:device_id>/host-key", methods=["POST"])
@require("admin")
@blp.arguments(HostKeySchema)
@blp.response(202, JobSchema)
def repin(data: dict[str, Any], device_id: str) -> Any:
    """Re-pin a device's host key: to the key given, or to the key it presents now (a fact
    refresh job trusts it on first use)."""
    store = get_store()
    store.get_device(device_id)
    store.update_device(device_id, host_key=data.get("host_key"), repinned_at=now())
    return _facts_job(store, device_id)


@blp.route("/devices/<id:device_id>/facts", methods=["POST"])
@require("admin")
@blp.response(202, JobSchema)
def refresh(device_id: str) -> Any:
    """Re-probe a device's facts and privilege level (a job)."""
    store = get_store()
    dev = store.get_device(device_id)
    if not dev.get("host_key"):
        raise Forbidden("the device has no pinned host key yet; wait for its registration job")
    return _facts_job(store, device_id)


def _facts_job(store: Any, device_id: str) -> Any:
    """The job that (re-)probes a device's facts, privilege and, when unpinned, its host key."""
    job, _ = jobs.submit(
        store,
        get_sender(),
        "facts",
        targets=[device_id],
        created_by=actor(),
        idempotency_key=idempotency_key(),
    )
    return job
