"""Devices: register (operator or enrollment token), list, show, update, remove, re-pin."""

from __future__ import annotations

from typing import Any

from evc.api.deps import (
    authenticate,
    authenticated,
    context,
    get_settings,
    get_store,
    require,
    require_device,
)
from evc.api.schemas import (
    DeviceCreatedSchema,
    DeviceCreateSchema,
    DeviceImportResultSchema,
    DeviceImportSchema,
    DeviceListArgs,
    DevicePageSchema,
    DeviceSchema,
    DeviceUpdatedSchema,
    DeviceUpdateSchema,
    HeartbeatSchema,
    HostKeySchema,
    JobSchema,
    page,
)
from flask_smorest import Blueprint

from evc import auth, devices, enrollment
from evc.deployments import converge
from evc.errors import Conflict, Forbidden
from evc.model import Job, JobKindName, PrincipalKind, Scope
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
    store = get_store()
    who = authenticate()
    extra: dict[str, str] = {}
    if who.kind == PrincipalKind.ENROLLMENT:  # checked before a use is spent
        extra = enrollment.check_registration(store.get_enrollment(who.id), data)
        auth.use_enrollment(store, who)
    else:
        auth.check_scope(who, Scope.ADMIN)
    dev, job, token = devices.create(context(idempotent=True), data, extra_labels=extra)
    out: dict[str, Any] = {"device": dev, "job": job}
    if token:
        out["token"] = token
    return out


@blp.route("/devices/import", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(DeviceImportSchema)
@blp.response(200, DeviceImportResultSchema)
def import_devices(data: dict[str, Any]) -> Any:
    """Onboard a fleet: an Ansible inventory (INI or YAML: ansible_host, ansible_port,
    ansible_user, groups as labels ``<group>=true``, a jump host from ``-o ProxyJump=…`` in
    ansible_ssh_common_args) or a CSV (name,host,port,user,labels,jump).

    New devices are created, known ones updated (by name; never duplicated), then one ``import``
    job registers every device that is new, reached differently or not online, with per-device
    results. Hosts that cannot become devices are listed with the reason. ``dry_run``: only say
    what would change."""
    from evc import device_import, inventory_import

    inv = inventory_import.parse(
        data["content"], data.get("format"), data.get("filename") or "", default_user=data.get("default_user")
    )
    entries: list[inventory_import.InventoryEntry] = []
    problems = list(inv.problems)
    for entry in inv.entries:
        errors = DeviceCreateSchema().validate(entry.body())
        if errors:
            problems.append(inventory_import.InventoryProblem(entry.name, _first_error(errors)))
        else:
            entries.append(entry)
    store = get_store()
    planned = device_import.plan(store, entries, problems)
    job: Job | None = None
    tokens: dict[str, str] = {}
    if not data["dry_run"]:
        job, tokens = device_import.apply(context(), planned)
    return {"dry_run": data["dry_run"], "devices": [p.public() for p in planned], "job": job, "tokens": tokens}


def _first_error(errors: dict[str, Any]) -> str:
    """marshmallow's error dict as one sentence: ``host: must be a host name …``."""
    parts = []
    for field_name, msgs in errors.items():
        text = msgs if isinstance(msgs, str) else "; ".join(
            m if isinstance(m, str) else str(m) for m in (msgs.values() if isinstance(msgs, dict) else msgs)
        )  # fmt: skip
        parts.append(f"{field_name}: {text}")
    return ", ".join(parts)


@blp.route("/devices/<id:device_id>/register", methods=["POST"])
@require(Scope.ADMIN)
@blp.response(202, JobSchema)
def retry_registration(device_id: str) -> Any:
    """Register a device again after its registration failed (its key installed since, its
    address fixed, its network back): it returns to ``pending`` and a new job probes it."""
    return devices.retry_registration(context(), device_id)


@blp.route("/devices", methods=["GET"])
@require(Scope.READ)
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
@require(Scope.READ)
@blp.response(200, DeviceSchema)
def show(device_id: str) -> Any:
    """One device with its facts, privilege level and what that level allows."""
    return devices.public(get_store().get_device(device_id))


@blp.route("/devices/<id:device_id>", methods=["PATCH"])
@require(Scope.ADMIN)
@blp.arguments(DeviceUpdateSchema)
@blp.response(200, DeviceUpdatedSchema)
@blp.alt_response(202, schema=DeviceUpdatedSchema, description="connection details change: the re-verification job")
def update(data: dict[str, Any], device_id: str) -> Any:
    """Rename a device, replace its labels, or change how it is reached (``connection``: host,
    port, user, jump host). New connection details are probed by a job and replace the old ones
    only when the device answers there (keys re-pinned, facts refreshed; its id, token, labels,
    clusters and history stay)."""
    store = get_store()
    connection = data.pop("connection", None)
    dev = devices.update(store, device_id, data) if data else devices.public(store.get_device(device_id))
    if "labels" in data:  # deployments on a label selector follow the device's labels
        converge.reconcile_device(context(), device_id)
    if connection is None:
        return dev
    job = devices.change_connection(context(idempotent=True), device_id, connection)
    return {**dev, "job": job}, 202


@blp.route("/devices/<id:device_id>", methods=["DELETE"])
@require(Scope.ADMIN)
@blp.response(200, DeviceSchema)
def remove(device_id: str) -> Any:
    """Forget a device (its token stops working). Clean it up first with the cleanup playbook."""
    return devices.remove(get_store(), device_id)


@blp.route("/devices/<id:device_id>/host-key", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(HostKeySchema)
@blp.response(202, JobSchema)
def repin(data: dict[str, Any], device_id: str) -> Any:
    """Re-pin a device's host key: to the key given, or to the key it presents now (a fact
    refresh job trusts it on first use). With ``jump_host_key`` its jump host is re-pinned too."""
    store = get_store()
    dev = store.get_device(device_id)
    changes: dict[str, Any] = {"host_key": data.get("host_key"), "repinned_at": now()}
    if "jump_host_key" in data:
        jump = dev.get("jump_host")
        if not jump:
            raise Conflict("the device has no jump host", field="jump_host_key")
        changes["jump_host"] = {**jump, "host_key": data["jump_host_key"]}
    store.update_device(device_id, **changes)
    return _facts_job(device_id)


@blp.route("/devices/<id:device_id>/facts", methods=["POST"])
@require(Scope.ADMIN)
@blp.response(202, JobSchema)
def refresh(device_id: str) -> Any:
    """Re-probe a device's facts and privilege level (a job)."""
    store = get_store()
    dev = store.get_device(device_id)
    if not dev.get("host_key"):
        raise Forbidden("the device has no pinned host key yet; wait for its registration job")
    return _facts_job(device_id)


def _facts_job(device_id: str) -> Any:
    """The job that (re-)probes a device's facts, privilege and, when unpinned, its host key."""
    job, _ = context(idempotent=True).submit(JobKindName.FACTS, targets=[device_id])
    return job
