"""Re-convergence of deployments: keep each deployment on the devices it should be on.

- A device the health checks lose (offline) shows ``unreachable`` in every deployment it serves
  (with the reason; a ``deployment.device`` webhook event); the deployment is ``partial``.
- A device that comes back (offline -> online, :func:`on_health`, called after each sweep like
  :func:`evc.clusters.reconverge_recovered`) gets a ``deploy`` job with ``params.converge``: it
  is made to serve the deployment's version again, doing only what is missing
  (:func:`evc.deployments.ensure.ensure`: nothing shipped when the digest matches, the server
  restarted only when it does not run or fails its gate).
- A deployment on a cluster (or on a ``selector``) is re-resolved when membership or labels
  change (:func:`reconcile_device`): a device that joins is deployed to (after the level job
  that brings it to the cluster's level, ``params.after``); one that leaves is reported and
  cleaned up (a ``deploy-remove`` job with ``params.leave``: server stopped, folder removed).
- ``POST /deployments/{id}/converge`` (:func:`reconcile`) does all of that for one deployment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from evc.context import Context
from evc.deployments import ensure, events, remote
from evc.errors import Conflict, DeviceError, EVCError, NotFound, StoreUnavailable, ValidationError
from evc.jobs import JobRun, Partial
from evc.model import (
    JSON,
    OFFLINE_STATES,
    RUNNABLE_STATES,
    DeploymentDeviceState,
    DeploymentState,
    DeviceState,
    EventType,
    Job,
    JobKindName,
)  # fmt: skip
from evc.settings import Settings
from evc.store import TERMINAL_STATES, Store, now

#: EVC's own jobs (re-convergence) act as this caller
ACTOR = "evc:deployments"
#: a re-convergence job waits at most this long for the job it follows (a level job, a rollout)
WAIT_S = 1800.0
#: per-device states that serve the deployment
SERVING = (str(DeploymentDeviceState.RUNNING), str(DeploymentDeviceState.ROLLED_BACK))
#: deployment states a re-convergence may change (not while a job of it deploys or removes)
SETTLED = (str(DeploymentState.RUNNING), str(DeploymentState.PARTIAL), str(DeploymentState.FAILED))


# ---------------------------------------------------------------------- pure
def overall(states: Mapping[str, Mapping[str, Any]], devices: Sequence[str]) -> str:
    """A deployment's state from its devices': running (all serve), partial (some), failed (none)."""
    ok = sum(1 for d in devices if str((states.get(d) or {}).get("state")) in SERVING)
    if ok == len(devices):
        return str(DeploymentState.RUNNING)
    return str(DeploymentState.PARTIAL if ok else DeploymentState.FAILED)


def wanted(store: Store, dep: Mapping[str, Any]) -> list[str] | None:
    """The devices *dep* should be on now: its selector's matches or its cluster's members;
    None for a deployment on devices named one by one (not re-resolved)."""
    from evc.provisioning.request import resolve_targets

    if dep.get("selector"):
        try:
            return resolve_targets(store, (), dep["selector"])
        except (ValidationError, NotFound):
            return []
    if dep.get("cluster"):
        try:
            return list(store.cluster_members(str(dep["cluster"])))
        except NotFound:
            return []
    return None


def _deployments(store: Store) -> list[JSON]:
    out = []
    for dep_id in store.deployment_ids()[0]:
        try:
            out.append(store.get_deployment(dep_id))
        except NotFound:  # removed meanwhile
            continue
    return out


def _settle(store: Store, dep_id: str) -> None:
    """Recompute a settled deployment's state from its devices'."""
    dep = store.get_deployment(dep_id)
    if dep["state"] in SETTLED:
        state = overall(store.deployment_devices(dep_id), dep["devices"])
        if state != dep["state"]:
            store.update_deployment(dep_id, state=state)


# ---------------------------------------------------------------------- health
def mark_unreachable(store: Store, settings: Settings, device_id: str, reason: str) -> list[JSON]:
    """*device_id* was lost: ``unreachable`` in every deployment it is in; the webhook events."""
    out: list[JSON] = []
    for dep in _deployments(store):
        if device_id not in dep["devices"]:
            continue
        states = store.deployment_devices(dep["id"])
        old = states.get(device_id) or {}
        if old.get("state") in (DeploymentDeviceState.REMOVED, DeploymentDeviceState.UNREACHABLE):
            continue
        store.set_deployment_device(dep["id"], device_id, {**old, "state": DeploymentDeviceState.UNREACHABLE,
                                                            "reason": reason})  # fmt: skip
        _settle(store, dep["id"])
        after = (store.get_deployment(dep["id"]), store.deployment_devices(dep["id"]))
        out += events.changes("deploy", (dep, states), after, _names(store, [device_id]))
    events.publish(settings, out)
    return out


def _names(store: Store, ids: Iterable[str]) -> dict[str, str]:
    return {str(d["id"]): str(d.get("name") or d["id"]) for d in store.device_fields(list(ids), ("name",)) if d}


def on_health(ctx: Context, changes: list[JSON], after: Mapping[str, str] | None = None) -> list[Job]:
    """After a sweep: devices lost are marked ``unreachable``; devices back are re-converged
    (each after the job *after* names for it: its cluster's level re-convergence)."""
    jobs: list[Job] = []
    for ch in changes:
        device_id, to, frm = ch.get("device"), ch.get("to"), ch.get("from")
        if not device_id:
            continue
        try:
            if to in OFFLINE_STATES:
                mark_unreachable(ctx.store, ctx.settings, device_id, f"device {to}: {ch.get('reason') or 'no answer'}")
            elif to == DeviceState.ONLINE and frm in OFFLINE_STATES:
                jobs += reconcile_device(ctx, device_id, recovered=True, after=(after or {}).get(device_id))
        except StoreUnavailable:
            raise  # the sweep's task retries
        except EVCError:
            continue
    return jobs


# ---------------------------------------------------------------------- membership, selectors
def _own(ctx: Context) -> Context:
    return ctx.acting_as(ACTOR).with_key(None)


def _converge(ctx: Context, dep: JSON, devices: list[str], reason: str, after: str | None = None) -> Job:
    params: JSON = {"deployment": dep["id"], "converge": True, "reason": reason}
    if after:
        params["after"] = after
    job, _ = _own(ctx).submit(JobKindName.DEPLOY, params=params, targets=devices)
    return job


def _leave(ctx: Context, dep: JSON, devices: list[str]) -> Job:
    job, _ = _own(ctx).submit(JobKindName.DEPLOY_REMOVE, params={"deployment": dep["id"], "leave": True},
                              targets=devices)  # fmt: skip
    return job


def _join(store: Store, dep: JSON, devices: list[str], reason: str) -> None:
    store.update_deployment(dep["id"], devices=[*dep["devices"], *[d for d in devices if d not in dep["devices"]]])
    for d in devices:
        store.set_deployment_device(dep["id"], d, {"state": DeploymentDeviceState.PENDING, "reason": reason})


def reconcile_device(ctx: Context, device_id: str, *, recovered: bool = False, after: str | None = None) -> list[Job]:
    """Put *device_id* where the deployments' targets say: deployed to where it joined (after
    job *after*, e.g. its level job), cleaned up where it left, re-converged where it is
    (*recovered*: it came back)."""
    jobs = []
    for dep in _deployments(ctx.store):
        if dep["state"] == DeploymentState.REMOVING:
            continue
        want, has = wanted(ctx.store, dep), device_id in dep["devices"]
        if want is not None and device_id in want and not has:
            _join(ctx.store, dep, [device_id], "joined: deploying")
            jobs.append(_converge(ctx, dep, [device_id], "joined", after))
        elif want is not None and has and device_id not in want:
            jobs.append(_leave(ctx, dep, [device_id]))
        elif has and recovered:
            jobs.append(_converge(ctx, dep, [device_id], "recovered", after))
    return jobs


def reconcile(ctx: Context, deployment_id: str) -> list[Job]:
    """Re-resolve the deployment's targets and converge it: deploy where missing or not
    serving (only what is missing), clean up devices that left."""
    store = ctx.store
    dep = store.get_deployment(deployment_id)
    if dep["state"] == DeploymentState.REMOVING:
        raise Conflict(f"deployment {deployment_id} is being removed")
    want = wanted(store, dep)
    gone = [d for d in dep["devices"] if want is not None and d not in want]
    new = [d for d in (want or []) if d not in dep["devices"]]
    if new:
        _join(store, dep, new, "joined: deploying")
        dep = store.get_deployment(deployment_id)
    jobs = [_leave(ctx, dep, gone)] if gone else []
    keep = [d for d in dep["devices"] if d not in gone]
    if keep:
        jobs.append(_converge(ctx, dep, keep, "requested"))
    store.audit(ctx.actor, "deployment.converge", deployment_id, joined=len(new), left=len(gone))
    return jobs


# ---------------------------------------------------------------------- the jobs
def blocker(store: Store, run: JobRun) -> str | None:
    """The job a ``deploy`` job waits for: its ``after`` jobs (level jobs), or, re-converging, a
    job of the deployment still deploying; None: go. Raises Conflict after :data:`WAIT_S`."""
    after = run.params.get("after") or []
    waits = [str(a) for a in ([after] if isinstance(after, str) else after)]
    dep = store.get_deployment(str(run.params["deployment"]))
    converging = bool(run.params.get("converge"))
    if converging and dep["state"] == DeploymentState.DEPLOYING and dep.get("job") and dep["job"] != run.id:
        waits.append(str(dep["job"]))
    for job_id in waits:
        state = store.job_state(job_id)
        if state is not None and state not in TERMINAL_STATES:
            if now() - float(run.job.get("created_at") or now()) > WAIT_S:
                raise Conflict(f"waited {WAIT_S:.0f} s for job {job_id}; re-converge later")
            return job_id
    return None


def run(store: Store, settings: Settings, job: JobRun) -> JSON | Partial:
    """The ``deploy`` job of a re-convergence (``params.converge``): each target made to serve the
    deployment's version again, doing only what is missing; offline targets are left alone."""
    from evc.deployments.rollout import _spec
    from evc.deployments.service import _each, _reasons

    dep = store.get_deployment(str(job.params["deployment"]))
    spec = _spec(settings, store, dep, dep)
    devices = [d for d in store.get_devices(job.job["targets"]) if d["id"] in dep["devices"]]
    names = {d["id"]: str(d.get("name") or d["id"]) for d in devices}
    skipped = [d for d in devices if d.get("state") not in RUNNABLE_STATES]
    todo = [d for d in devices if d not in skipped]
    ports: Mapping[str, int] = dep.get("ports") or {}
    job.event(f"re-converging {dep['model']}:{spec.version} on {len(todo)} device(s) ({job.params.get('reason')})",
              type=EventType.STEP)  # fmt: skip

    from evc.deployments import container

    image = None
    if dep.get("runtime") == "container":  # the container replaced where it is not as it should be
        image = container.resolve(settings, dep.get("image"))

    def one(dev: Any) -> Any:
        at = dataclasses.replace(spec, port=int(ports.get(dev["id"], spec.port)))
        if image is not None:
            return container.install_and_start(settings, dev, at, image)
        return ensure.ensure(settings, dev, at)

    results = _each(settings, todo, "re-convergence", one, container.DELIVERY_TIMEOUT_S if image else 0.0)
    for d in skipped:
        results.append((d["id"], {"ok": False, "error": {"message": f"device is {d.get('state')}: not re-converged"}}))
    states = store.deployment_devices(dep["id"])
    for dev_id, res in results:
        job.result(dev_id, res)
        if res["ok"]:
            state: JSON = {k: v for k, v in res.items() if k != "ok"}
        elif dev_id in {d["id"] for d in skipped}:
            continue  # its state (unreachable) stays
        else:
            state = {**(states.get(dev_id) or {}), "state": DeploymentDeviceState.FAILED,
                     "reason": res["error"]["message"], "version": spec.version, "sha256": spec.sha256}  # fmt: skip
        store.set_deployment_device(dep["id"], dev_id, state)
        job.event(f"{names[dev_id]}: {state['state']}" + (" (nothing to do)" if res.get("restarted") is False else ""),
                  type=EventType.STEP, target=dev_id)  # fmt: skip
    _settle(store, dep["id"])
    ok = sum(1 for _, r in results if r["ok"])
    summary: JSON = {"deployment": dep["id"], "running": ok, "failed": len(results) - ok,
                     "restarted": sum(1 for _, r in results if r.get("restarted")),
                     "shipped": sum(1 for _, r in results if r.get("shipped"))}  # fmt: skip
    if ok == len(results):
        return summary
    message = f"not serving on {len(results) - ok} of {len(results)} devices: {_reasons(results, names)}"
    if not ok:
        raise DeviceError(message, deployment=dep["id"])
    return Partial(summary, message)


def leave_job(store: Store, settings: Settings, job: JobRun) -> JSON | Partial:
    """The ``deploy-remove`` job of devices that left (``params.leave``): server stopped, folder
    removed, the device dropped from the deployment (kept, ``failed``, when it could not be
    cleaned: the next re-convergence tries again)."""
    from evc.deployments.service import _each, _reasons

    dep_id = str(job.params["deployment"])
    devices = store.get_devices(job.job["targets"])
    names = {d["id"]: str(d.get("name") or d["id"]) for d in devices}
    dep = store.get_deployment(dep_id)
    if dep.get("runtime") == "container":
        from evc.deployments import container

        stop = container.stop_and_remove
    else:
        stop = remote.stop_and_remove
    results = _each(settings, devices, "clean-up", lambda dev: stop(settings, dev, dep_id))
    for dev_id, res in results:
        job.result(dev_id, res)
        if res["ok"]:
            state: JSON = {"state": DeploymentDeviceState.REMOVED, "reason": "left the targets: cleaned up"}
        else:
            why = f"left the targets; not cleaned up: {res['error']['message']}"
            state = {"state": DeploymentDeviceState.FAILED, "reason": why}
        store.set_deployment_device(dep_id, dev_id, state)
    left = {d for d, r in results if r["ok"]}
    store.update_deployment(dep_id, devices=[d for d in dep["devices"] if d not in left])
    _settle(store, dep_id)
    summary: JSON = {"deployment": dep_id, "removed": len(left), "failed": len(results) - len(left)}
    if len(left) == len(results):
        return summary
    message = f"not cleaned up on {len(results) - len(left)} device(s): {_reasons(results, names)}"
    if not left:
        raise DeviceError(message, deployment=dep_id)
    return Partial(summary, message)


__all__ = ["blocker", "leave_job", "mark_unreachable", "on_health", "overall", "reconcile", "reconcile_device",
           "run", "wanted"]  # fmt: skip
