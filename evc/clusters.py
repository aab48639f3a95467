"""Clusters: a profile, a target function level and members; joining converges a device to the
cluster's level, leaving can clean it up. Every change is an ordinary job in the one job model."""

from __future__ import annotations

from typing import cast

from evc import profiles, vault
from evc.context import Context
from evc.errors import Conflict, EVCError, PreconditionFailed, StoreUnavailable, ValidationError
from evc.model import JSON, OFFLINE_STATES, Cluster, ClusterView, DeviceState, Job, JobKindName, OfflinePolicy
from evc.settings import Settings
from evc.store import Store, new_id, now

HIDDEN = ("join_token",)


def _check_vars(profile: profiles.Profile, values: JSON) -> None:
    unknown = set(values) - profile.playbooks()
    if unknown:
        raise ValidationError(
            f"vars name playbooks the {profile.name} profile does not run: {sorted(unknown)}", field="vars"
        )


def _sealed_vars(settings: Settings, values: JSON, stored: JSON | None = None) -> JSON:
    """Cluster vars as stored: each parameter its playbook's schema marks secret is sealed; a
    masked value sent back (as the API shows it) keeps the secret already stored."""
    from evc.provisioning.catalog import Catalog
    from evc.provisioning.params import secret_names

    catalog = Catalog.from_settings(settings)
    box: vault.Vault | None = None
    out: JSON = {}
    for playbook, given in values.items():
        names = set(secret_names(catalog.get(playbook).schema)) if isinstance(given, dict) else set()
        if not names:
            out[playbook] = given
            continue
        before = (stored or {}).get(playbook) or {}
        sealed = dict(given)
        for name in names & set(given):
            if given[name] == vault.MASK:
                if not vault.is_sealed(before.get(name)):
                    raise ValidationError(f"vars.{playbook}.{name} is a secret: give its value", field="vars")
                sealed[name] = before[name]
            elif given[name] not in (None, ""):
                box = box or vault.Vault.from_settings(settings)
                sealed[name] = box.seal(given[name])
        out[playbook] = sealed
    return out


def public(store: Store, cl: Cluster | JSON) -> ClusterView:
    out: JSON = {k: v for k, v in cl.items() if k not in HIDDEN}
    out["vars"] = {p: vault.masked(v) if isinstance(v, dict) else v for p, v in (cl.get("vars") or {}).items()}
    members = store.cluster_members(cl["id"])
    devs = store.get_devices(members)
    levels = [int(d.get("level") or 0) for d in devs]
    return cast(
        ClusterView,
        {
            **out,
            "members": members,
            "size": len(members),
            "level": min(levels) if levels else cl.get("target_level", 0),
            "states": {s: sum(1 for d in devs if d.get("state") == s) for s in {d.get("state") for d in devs}},
        },
    )


def create(ctx: Context, data: JSON) -> Cluster:
    store, settings, created_by = ctx.store, ctx.settings, ctx.actor
    profile = profiles.get(data["profile"])
    _check_vars(profile, data.get("vars") or {})
    cl: Cluster = {
        "id": new_id("cl"),
        "name": data["name"],
        "profile": profile.name,
        "target_level": int(data.get("target_level") or 0),
        "labels": data.get("labels") or {},
        "vars": _sealed_vars(settings, data.get("vars") or {}),
        "server_id": None,
        "created_at": now(),
        "created_by": created_by,
    }
    store.create_cluster(cl)
    store.log_event({"type": "cluster.created", "cluster": cl["id"], "profile": profile.name})
    return cl


def update(store: Store, cluster_id: str, changes: JSON, *, settings: Settings) -> Cluster:
    cl = store.get_cluster(cluster_id)
    if "vars" in changes:
        _check_vars(profiles.get(cl["profile"]), changes["vars"])
        changes = {**changes, "vars": _sealed_vars(settings, changes["vars"], cl.get("vars"))}
    if "name" in changes and changes["name"] != cl["name"]:
        store.rename_cluster(cluster_id, cl["name"], changes["name"])
    if "server_id" in changes:
        sid = changes["server_id"]
        if not profiles.get(cl["profile"]).server_role:
            raise ValidationError(f"profile {cl['profile']!r} has no server node", field="server_id")
        if sid not in store.cluster_members(cluster_id):
            raise ValidationError("the server node must be a member of the cluster", field="server_id")
        store.log_event({"type": "cluster.server", "cluster": cluster_id, "from": cl.get("server_id"), "to": sid})
    return store.update_cluster(cluster_id, **changes)


def delete(store: Store, cluster_id: str) -> Cluster:
    members = store.cluster_members(cluster_id)
    if members:
        raise Conflict(f"the cluster still has {len(members)} member(s); remove them first", members=members)
    cl = store.delete_cluster(cluster_id)
    store.log_event({"type": "cluster.deleted", "cluster": cluster_id})
    return cl


def add_device(ctx: Context, cluster_id: str, device_id: str) -> tuple[Cluster, Job | None]:
    """Join *device_id* to the cluster and enqueue the job that brings it to the cluster's level.
    Returns (cluster, the convergence job or None when the device is already there)."""
    store = ctx.store
    cl = store.get_cluster(cluster_id)
    dev = store.get_device(device_id)
    if dev.get("state") in (DeviceState.PENDING, DeviceState.UNREACHABLE, DeviceState.FAILED):
        raise PreconditionFailed(f"device {dev['name']} is {dev['state']}: register it successfully first")
    profile = profiles.get(cl["profile"])
    why = profile.requires.unmet(dev)
    if why:
        raise PreconditionFailed(f"{dev['name']} cannot join a {profile.name} cluster: " + "; ".join(why), reasons=why)
    holder = store.claim_membership(cluster_id, device_id)
    if holder:
        raise Conflict(f"device {dev['name']} already belongs to cluster {holder}", cluster=holder)
    if profile.server_role and not cl.get("server_id"):
        cl = store.update_cluster(cluster_id, server_id=device_id)
    store.log_event({"type": "cluster.joined", "cluster": cluster_id, "device": device_id})
    job = None
    if int(cl.get("target_level") or 0) > int(dev.get("level") or 0):
        job, _ = ctx.with_key(None).submit(
            JobKindName.LEVEL,
            targets=[device_id],
            params={"cluster_id": cluster_id, "target": cl["target_level"], "reason": "join"},
        )
    return cl, job


def remove_device(ctx: Context, cluster_id: str, device_id: str, *, cleanup: bool) -> Job | None:
    """Leave the cluster; with *cleanup*, a job removes what EVC installed on the device."""
    store = ctx.store
    cl = store.get_cluster(cluster_id)
    members = store.cluster_members(cluster_id)
    if device_id not in members:
        raise Conflict(f"device {device_id} is not a member of cluster {cl['name']}")
    if cl.get("server_id") == device_id:
        if len(members) > 1:
            raise PreconditionFailed(
                "this device is the cluster's server node; make another member the server first "
                f'(PATCH /api/v1/clusters/{cluster_id} {{"server_id": ...}})'
            )
        store.update_cluster(cluster_id, server_id=None)
    store.release_membership(cluster_id, device_id)
    store.update_device(device_id, level=0, level_detail={})
    store.log_event({"type": "cluster.left", "cluster": cluster_id, "device": device_id, "cleanup": cleanup})
    if not cleanup:
        return None
    from evc.provisioning.service import ProvisionRequest, submit_provision

    job, _ = submit_provision(ctx.with_key(None), ProvisionRequest(playbook="cleanup", targets=(device_id,)))
    return job


def raise_level(
    ctx: Context,
    cluster_id: str,
    target: int,
    *,
    check: bool = False,
    offline: str = OfflinePolicy.SKIP,
    offline_ttl_s: float = 300.0,
) -> Job:
    """The job that raises every member to *target* (the cluster's target level is set too)."""
    store = ctx.store
    cl = store.get_cluster(cluster_id)
    if not 0 <= target <= profiles.MAX_LEVEL:
        raise ValidationError(f"target is 0..{profiles.MAX_LEVEL}", field="target")
    members = store.cluster_members(cluster_id)
    if not members:
        raise PreconditionFailed(f"cluster {cl['name']} has no members")
    if not check:
        store.update_cluster(cluster_id, target_level=target)
    job, _ = ctx.submit(
        JobKindName.LEVEL,
        targets=members,
        params={
            "cluster_id": cluster_id,
            "target": target,
            "check": check,
            "reason": "request",
            "offline": offline,
            "offline_ttl_s": offline_ttl_s,
        },
    )
    return job


def converge(ctx: Context, device_id: str, reason: str) -> Job | None:
    """After a device recovers: check its cluster's steps and re-apply only where it drifted.
    The job is EVC's own (``evc:health``), whoever the context's caller is."""
    store = ctx.store
    dev = store.get_device(device_id)
    cid = dev.get("cluster_id")
    if not cid:
        return None
    cl = store.get_cluster(cid)
    if int(cl.get("target_level") or 0) <= 0:
        return None
    own = ctx.acting_as("evc:health").with_key(None)
    job, _ = own.submit(
        JobKindName.LEVEL,
        targets=[device_id],
        params={"cluster_id": cid, "target": cl["target_level"], "converge": True, "reason": reason},
    )
    return job


def reconverge_recovered(ctx: Context, changes: list[JSON]) -> list[Job]:
    """Devices a sweep saw come back (offline/unreachable -> online): their clusters re-converge
    them (check mode first, apply only where they drifted)."""
    out = []
    for ch in changes:
        if ch.get("to") == DeviceState.ONLINE and ch.get("from") in OFFLINE_STATES and ch.get("device"):
            try:
                job = converge(ctx, ch["device"], reason=f"recovered from {ch['from']}")
            except StoreUnavailable:
                raise  # the sweep's task retries; a device is not skipped for a Redis outage
            except EVCError:
                continue
            if job:
                out.append(job)
    return out
