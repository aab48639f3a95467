"""Rollouts: a deployment updated in place to another version (or variant) of its model, device
by device, and rolled back.

:func:`update` records the new version (the one it replaces becomes ``previous``) and enqueues a
``deploy`` job with ``params.rollout``; :func:`rollback` does the same towards ``previous``. The
job (:func:`run`) switches at most ``max_unavailable`` devices at a time
(:func:`evc.deployments.switch.switch`: ship beside the running version, restart on the new one,
health gate). A device failing its gate goes back to the version it ran (checked healthy again;
state ``rolled-back`` with the reason) and the rollout stops: the devices not reached yet stay on
their version. The job then ends ``partial`` (some devices updated) or ``failed`` (none: the
deployment's record is back on the version it had), naming the device and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evc.context import Context
from evc.deployments import remote, switch
from evc.errors import Conflict, DeviceError, ValidationError
from evc.jobs import JobRun, Partial
from evc.model import JSON, DeploymentDeviceState, DeploymentState, Device, EventType, Job, JobKindName
from evc.models import registry
from evc.settings import Settings
from evc.store import TERMINAL_STATES, Store

#: the fields of a deployment that name what it serves
VERSION_FIELDS = ("version", "variant", "served_version", "sha256")


def _busy(store: Store, dep: JSON) -> None:
    """Conflict while a job of the deployment is at work (deploying, rolling out, removing)."""
    if dep["state"] not in (DeploymentState.DEPLOYING, DeploymentState.REMOVING):
        return
    job_id = dep.get("remove_job") if dep["state"] == DeploymentState.REMOVING else dep.get("job")
    state = store.job_state(job_id) if job_id else None
    if dep["state"] == DeploymentState.REMOVING or (state is not None and state not in TERMINAL_STATES):
        raise Conflict(f"deployment {dep['id']} is {dep['state']} (job {job_id}); try again after it")


def _version_rec(store: Store, name: str, version: str, variant: str | None) -> JSON:
    rec = registry.get_variant(store, name, version, variant) if variant else registry.get_version(store, name, version)
    if rec.get("format", "onnx") != "onnx":
        raise ValidationError(
            f"model {name}:{version} is {rec['format']!r}: the edge server runs ONNX", field="version"
        )
    return rec


def allowed_failures(budget: float | None, devices: int) -> int | None:
    """How many devices a rollout may lose to their gate before it stops and rolls back (pure):
    None (no budget: it stops at the first failure, the updated devices stay updated), a count,
    or a fraction of the devices (0 < budget < 1, rounded down)."""
    if budget is None:
        return None
    if budget < 0 or (budget >= 1 and budget != int(budget)):
        raise ValidationError("failure_budget is a count (0, 1, 2 ...) or a fraction (0 < x < 1)",
                              field="failure_budget")  # fmt: skip
    return int(budget) if budget >= 1 or budget == 0 else int(budget * devices)


def _start(ctx: Context, dep: JSON, target: JSON, max_unavailable: int, action: str,
           failure_budget: float | None = None) -> tuple[Job, JSON]:  # fmt: skip
    """Record the rollout of *dep* to *target* (version fields) and enqueue its job."""
    store = ctx.store
    current = {k: dep.get(k) for k in VERSION_FIELDS}
    same = current["served_version"] == target["served_version"] and current["sha256"] == target["sha256"]
    previous = dep.get("previous") if same else current
    if action == "rollback":  # back to previous: the version it leaves becomes the previous one
        previous = current
    rollout = {
        "action": action, "from": current, "to": target, "max_unavailable": max_unavailable,
        "state": "running", "before": dep.get("previous"), "failed": None, "failure_budget": failure_budget,
    }  # fmt: skip
    changes: JSON = {**target, "previous": previous, "max_unavailable": max_unavailable, "rollout": rollout,
                     "state": DeploymentState.DEPLOYING}  # fmt: skip
    keep = {str(target["version"])} | ({str(previous["version"])} if previous else set())
    drop = {str(v["version"]) for v in (current, dep.get("previous")) if v}
    store.update_deployment(dep["id"], **changes)
    store.index_deployment_versions(dep["id"], dep["model"], keep, drop)
    params = {"deployment": dep["id"], "rollout": True}
    job, created = ctx.submit(JobKindName.DEPLOY, params=params, targets=list(dep["devices"]))
    if not created:  # a repeated Idempotency-Key: the first request's job; the record as it was
        store.update_deployment(dep["id"], **{k: dep.get(k) for k in changes})
        was = {str(v["version"]) for v in (current, dep.get("previous")) if v}
        store.index_deployment_versions(dep["id"], dep["model"], was, keep)
        return job, store.get_deployment(dep["id"])
    dep = store.update_deployment(dep["id"], job=job["id"])
    store.audit(ctx.actor, f"deployment.{action}", dep["id"], model=f"{dep['model']}:{dep['served_version']}",
                frm=current["served_version"], max_unavailable=max_unavailable)  # fmt: skip
    return job, dep


def update(ctx: Context, deployment_id: str, data: Mapping[str, Any]) -> Job:
    """Roll deployment *deployment_id* out to ``data['version']`` (``variant``), at most
    ``max_unavailable`` devices at a time: the ``deploy`` job."""
    from evc.deployments.service import served_version

    dep = ctx.store.get_deployment(deployment_id)
    _busy(ctx.store, dep)
    version, variant = str(data["version"]), data.get("variant") or None
    rec = _version_rec(ctx.store, dep["model"], version, variant)
    max_unavailable = int(data.get("max_unavailable") or 1)
    if max_unavailable < 1:
        raise ValidationError("max_unavailable must be at least 1", field="max_unavailable")
    target = {"version": version, "variant": variant, "served_version": served_version(version, variant),
              "sha256": rec["sha256"]}  # fmt: skip
    budget = data.get("failure_budget")
    allowed_failures(None if budget is None else float(budget), len(dep["devices"]))  # 422 when malformed
    return _start(ctx, dep, target, max_unavailable, "update", None if budget is None else float(budget))[0]


def rollback(ctx: Context, deployment_id: str, max_unavailable: int | None = None) -> Job:
    """Return every device of *deployment_id* to its previous version (a rollout towards it)."""
    dep = ctx.store.get_deployment(deployment_id)
    _busy(ctx.store, dep)
    previous = dep.get("previous")
    if not previous:
        raise Conflict(f"deployment {deployment_id} has no previous version to roll back to")
    n = int(max_unavailable or dep.get("max_unavailable") or 1)
    if n < 1:
        raise ValidationError("max_unavailable must be at least 1", field="max_unavailable")
    return _start(ctx, dep, dict(previous), n, "rollback")[0]


# ---------------------------------------------------------------------- the job
def _spec(settings: Settings, store: Store, dep: JSON, fields: JSON) -> remote.Spec:
    rec = _version_rec(store, dep["model"], str(fields["version"]), fields.get("variant"))
    data = registry.storage(settings, rec).read_verified(rec["sha256"], registry.record_ref(rec), rec.get("storage"))
    return remote.Spec(dep["id"], dep["model"], str(fields["served_version"]), data, rec["sha256"], dep["python"],
                       int(dep["port"]), int(dep.get("threads") or 0))  # fmt: skip


def _at(state: JSON | None, spec: remote.Spec) -> bool:
    """Whether a device's state says it serves *spec*, healthy."""
    if not state:
        return False
    ok = (str(DeploymentDeviceState.RUNNING), str(DeploymentDeviceState.ROLLED_BACK))
    return str(state.get("state")) in ok and state.get("sha256") == spec.sha256 and state.get("version") == spec.version


@dataclass
class _Run:
    """What the steps of one rollout job share."""

    store: Store
    settings: Settings
    job: JobRun
    dep: JSON
    rollout: JSON
    new: remote.Spec
    devices: list[Device]
    names: dict[str, str]
    ports: Mapping[str, int]
    states: dict[str, JSON]
    old_specs: dict[str, remote.Spec] = field(default_factory=dict)
    image: Any = None  # a container deployment's edge image (evc.deployments.container.Image)

    def switch(self, dev: Device, spec: remote.Spec) -> Any:
        """Switch *dev* to *spec*: as a process, or as a container of ``image``."""
        if self.image is not None:
            from evc.deployments import container

            return container.switch(self.settings, dev, spec, self.image)
        return switch.switch(self.settings, dev, spec)

    def spec_for(self, dev: Device, spec: remote.Spec) -> remote.Spec:
        return remote.Spec(spec.deployment, spec.name, spec.version, spec.model, spec.sha256, spec.python,
                           int(self.ports.get(dev["id"], spec.port)), spec.threads)  # fmt: skip

    def old_spec(self, dev_id: str) -> remote.Spec | None:
        """The version *dev_id* ran before the rollout: the one of the deployment's versions
        (the rollout's ``from``, or the previous one before it) its state names; None: none."""
        sha = (self.states.get(dev_id) or {}).get("sha256")
        known = [v for v in (self.rollout.get("from"), self.rollout.get("before")) if v and v.get("version")]
        fields = next((v for v in known if sha in (None, v.get("sha256"))), None)
        if fields is None:
            return None
        key = str(fields["sha256"])
        if key not in self.old_specs:
            self.old_specs[key] = _spec(self.settings, self.store, self.dep, fields)
        return self.old_specs[key]


def _batch(r: _Run, batch: list[Device], failed: list[tuple[str, str]]) -> None:
    """Switch *batch* to the new version; the devices that fail go back (appended to *failed*)."""
    from evc.deployments.service import _each

    dep, new = r.dep, r.new
    for d in batch:
        st = r.states.get(d["id"]) or {}
        r.store.set_deployment_device(dep["id"], d["id"], {**st, "state": DeploymentDeviceState.UPDATING})
    results = _each(r.settings, batch, "update", lambda dev: r.switch(dev, r.spec_for(dev, new)))
    back: list[Device] = []
    for dev_id, res in results:
        r.job.result(dev_id, res)
        if res["ok"]:
            r.store.set_deployment_device(dep["id"], dev_id, {k: v for k, v in res.items() if k != "ok"})
            r.job.event(f"{r.names[dev_id]}: running {new.version}", type=EventType.STEP, target=dev_id)
        else:
            failed.append((dev_id, str(res["error"]["message"])))
            back += [d for d in batch if d["id"] == dev_id]
    for dev in back:  # each failing device back to the version it ran, gated again
        _back(r, dev, dict(failed)[dev["id"]])


def _back(r: _Run, dev: Device, reason: str) -> None:
    """Return *dev*, failed with *reason*, to the version it ran (gated again)."""
    from evc.deployments.service import _each

    dep, new = r.dep, r.new
    prev = r.old_spec(dev["id"])
    if prev is None:
        gone = {"state": DeploymentDeviceState.FAILED, "reason": reason, "version": new.version,
                "sha256": new.sha256}  # fmt: skip
        r.store.set_deployment_device(dep["id"], dev["id"], gone)
        return
    ((_, res),) = _each(r.settings, [dev], "rollback", lambda d, p=prev: r.switch(d, r.spec_for(d, p)))
    if res["ok"]:
        state = {**{k: v for k, v in res.items() if k != "ok"}, "state": DeploymentDeviceState.ROLLED_BACK,
                 "reason": reason}  # fmt: skip
    else:
        reason = f"{reason}; going back to {prev.version} failed too: {res['error']['message']}"
        state = {"state": DeploymentDeviceState.FAILED, "reason": reason, "version": prev.version,
                 "sha256": prev.sha256}  # fmt: skip
    r.store.set_deployment_device(dep["id"], dev["id"], state)
    r.job.result(dev["id"], {"ok": False, "error": {"message": reason}, "rolled_back": bool(res["ok"])})
    r.job.event(f"{r.names[dev['id']]}: {state['state']} ({reason})", type=EventType.STEP, target=dev["id"])


def _finish(r: _Run, todo: list[Device], reached: int, failed: list[tuple[str, str]],
            budget: int | None = None) -> JSON | Partial:  # fmt: skip
    """The job's result: done, partial (raised: failed, the deployment back on its version)."""
    store, dep, new, names, rollout = r.store, r.dep, r.new, r.names, r.rollout
    updated = sum(1 for d in r.devices if _at(store.deployment_devices(dep["id"]).get(d["id"]), new))
    left = len(todo) - reached
    summary: JSON = {"deployment": dep["id"], "version": new.version, "updated": updated,
                     "rolled_back": [names[d] for d, _ in failed], "not_reached": left}  # fmt: skip
    if budget is not None:
        summary["failure_budget"] = budget
    if not failed:
        store.update_deployment(dep["id"], state=DeploymentState.RUNNING, rollout={**rollout, "state": "done"})
        return summary
    what = "; ".join(f"{names[d]}: {why}" for d, why in failed)
    within = budget is not None and len(failed) <= budget
    if within:
        message = (f"the rollout to {new.version} finished with {len(failed)} device(s) back on their version "
                   f"(failure budget {budget}): {what}")  # fmt: skip
    else:
        over = (
            f" (over the failure budget of {budget}: every device it updated went back)" if budget is not None else ""
        )
        message = (f"the rollout to {new.version} stopped{over}: {what}; {updated} of {len(r.devices)} device(s) on "
                   f"{new.version}, {left} not reached (still on their version)")  # fmt: skip
    rollout = {**rollout, "state": "done" if within else "stopped",
               "failed": [{"device": d, "name": names[d], "reason": w} for d, w in failed]}  # fmt: skip
    if updated:
        store.update_deployment(dep["id"], state=DeploymentState.PARTIAL, rollout=rollout)
        return Partial({**summary, "message": message}, message)
    # nothing runs the new version: the deployment is back on the one it had
    frm: JSON = rollout.get("from") or {}
    store.update_deployment(dep["id"], **frm, previous=rollout.get("before"), rollout=rollout,
                            state=DeploymentState.RUNNING)  # fmt: skip
    keep = {str(frm["version"])} | ({str(rollout["before"]["version"])} if rollout.get("before") else set())
    store.index_deployment_versions(dep["id"], dep["model"], keep, {str(dep["version"])})
    raise DeviceError(message, deployment=dep["id"])


def run(store: Store, settings: Settings, job: JobRun) -> JSON | Partial:
    """The ``deploy`` job of a rollout (``params.rollout``): see the module's docstring."""
    dep = store.get_deployment(str(job.params["deployment"]))
    rollout: JSON = dict(dep.get("rollout") or {})
    n = max(1, int(dep.get("max_unavailable") or 1))
    new = _spec(settings, store, dep, dep)
    devices = store.get_devices(job.job["targets"])
    names = {d["id"]: str(d.get("name") or d["id"]) for d in devices}
    states = store.deployment_devices(dep["id"])
    r = _Run(store, settings, job, dep, rollout, new, devices, names, dep.get("ports") or {}, states)
    if dep.get("runtime") == "container":
        from evc.deployments import container

        r.image = container.resolve(settings, dep.get("image"))
    todo = [d for d in devices if not _at(states.get(d["id"]), new)]
    for d in devices:  # already there (a rerun, or a rollback to where a device went back to)
        if d not in todo:
            store.set_deployment_device(dep["id"], d["id"], {**states[d["id"]], "state": "running", "reason": None})
    job.event(f"rolling {dep['model']} out to {new.version} on {len(todo)} of {len(devices)} device(s), "
              f"at most {n} at a time", type=EventType.STEP)  # fmt: skip
    budget = allowed_failures(rollout.get("failure_budget"), len(devices))
    failed: list[tuple[str, str]] = []
    reached = 0
    for start in range(0, len(todo), n):
        batch = todo[start : start + n]
        reached += len(batch)
        _batch(r, batch, failed)
        if failed and (budget is None or len(failed) > budget):
            if budget is not None:  # over the budget: every device this rollout updated goes back
                _revert(r, todo[:reached], f"the rollout's failure budget ({budget}) was exceeded")
            break
    return _finish(r, todo, reached, failed, budget)


def _revert(r: _Run, switched: list[Device], reason: str) -> None:
    """Return the devices of *switched* that run the new version to the version they ran."""
    states = r.store.deployment_devices(r.dep["id"])
    for dev in [d for d in switched if _at(states.get(d["id"]), r.new)]:
        _back(r, dev, reason)


__all__ = ["VERSION_FIELDS", "rollback", "run", "update"]
