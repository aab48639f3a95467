"""Deployments as the API and CLI see them, and their jobs.

``submit`` records a deployment (model version/variant, devices, runtime ``process``, port,
python) and enqueues its ``deploy`` job; the job ships the edge server and the model to every
device at once (:func:`evc.deployments.remote.install_and_start`), each device health-gated, and
records each device's state: the job ends ``partial`` when some devices failed (their reasons in
the results and in the deployment), fails when none succeeded. ``remove`` enqueues a
``deploy-remove`` job that stops the servers and removes their folders, then the record.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from evc import pool as pooling
from evc.context import Context
from evc.deployments import container, prereq, remote
from evc.errors import Conflict, DeviceError, SSHTimeout, ValidationError
from evc.fl.service import device_python, resolve_devices
from evc.jobs import JobRun, Partial
from evc.model import JSON, DeploymentDeviceState, DeploymentState, Device, EventType, Job, JobKindName
from evc.models import registry
from evc.settings import Settings
from evc.store import TERMINAL_STATES, Store, new_id, now

RUNTIMES = ("process", "container")
#: runtimes issue 13 names that this slice does not run yet
LATER_RUNTIMES: tuple[str, ...] = ()
DEFAULT_PORT = 8500


def served_version(version: str, variant: str | None) -> str:
    """The version the edge server serves: the version, or ``<version>-<variant>``."""
    return f"{version}-{variant}" if variant else version


# ---------------------------------------------------------------------- submitting
def submit(ctx: Context, data: Mapping[str, Any]) -> tuple[Job, JSON]:
    """Validate a deployment, record it and enqueue its ``deploy`` job: (job, deployment)."""
    store = ctx.store
    runtime = str(data.get("runtime") or "process")
    if runtime in LATER_RUNTIMES:
        raise ValidationError(f"runtime {runtime!r} is not supported yet; use 'process'", field="runtime")
    if runtime not in RUNTIMES:
        raise ValidationError(f"runtime must be one of {list(RUNTIMES)}", field="runtime")
    name, version, variant = str(data["model"]), str(data["version"]), data.get("variant")
    if variant == "recommended":  # evc.recommend: the variant recommended for every target
        from evc.recommend.advise import resolve_recommended

        variant = resolve_recommended(store, ctx.settings, name, version, data)
    rec = (
        registry.get_variant(store, name, version, str(variant))
        if variant
        else registry.get_version(store, name, version)
    )
    if rec.get("format", "onnx") != "onnx":
        raise ValidationError(f"model {name}:{version} is {rec['format']!r}: the edge server runs ONNX", field="model")
    cluster, selector = data.get("cluster"), data.get("selector") or None
    devices = _targets(store, data.get("devices"), cluster, selector)
    python = device_python(store, data.get("python"), cluster or (selector or {}).get("cluster"))
    port = int(data.get("port") or DEFAULT_PORT)
    ports = {str(d): int(p) for d, p in (data.get("ports") or {}).items()}
    if not all(1 <= p <= 65535 for p in [port, *ports.values()]):
        raise ValidationError("ports must be in 1..65535", field="port")
    unknown = sorted(set(ports) - set(devices))
    if unknown and not (cluster or selector):  # a cluster's or selector's devices may join later
        raise ValidationError(f"ports names devices not in the deployment: {unknown}", field="ports")
    # the level the runtime needs (raised first: level jobs the deploy job waits for), then the python it gives
    after = prereq.ensure(ctx, devices, runtime, bool(data.get("python")), data.get("ensure_level", True) is not False)
    if after:
        python = device_python(store, data.get("python"), cluster or (selector or {}).get("cluster"))
    dep: JSON = {
        "id": new_id("dep"), "model": name, "version": version, "variant": variant or None,
        "served_version": served_version(version, variant), "sha256": rec["sha256"], "runtime": runtime,
        "port": port, "ports": ports, "python": python, "cluster": cluster or None, "selector": selector,
        "devices": devices, "threads": int(data.get("threads") or 0),
        "image": (str(data.get("image") or "") or None) if runtime == "container" else None,
        "state": DeploymentState.DEPLOYING, "job": None, "created_by": ctx.actor, "created_at": now(),
        "level_jobs": after,
    }  # fmt: skip
    store.create_deployment(dep)
    params: JSON = {"deployment": dep["id"], **({"after": after} if after else {})}
    job, created = ctx.submit(JobKindName.DEPLOY, params=params, targets=devices)
    if not created:  # a repeated Idempotency-Key: the first request's deployment
        store.delete_deployment(dep["id"])
        return job, view(store, str(job["params"]["deployment"]))
    dep = store.update_deployment(dep["id"], job=job["id"])
    store.audit(ctx.actor, "deployment.create", dep["id"], model=f"{name}:{version}", devices=len(devices))
    return job, view(store, dep["id"])


def _targets(store: Store, devices: Sequence[str] | None, cluster: str | None, selector: Mapping[str, Any] | None
             ) -> list[str]:  # fmt: skip
    """The deployment's devices: named, a cluster's members, or a selector's matches (``labels``
    and/or ``cluster``, as provisioning's; re-resolved when devices join, leave or are relabelled)."""
    if selector:
        from evc.provisioning.request import resolve_targets

        return resolve_targets(store, (), selector)
    return resolve_devices(store, devices, cluster)


# ---------------------------------------------------------------------- reading
def view(store: Store, deployment_id: str) -> JSON:
    """A deployment with its per-device state (``state``, ``reason``, ``version``, ``endpoint``)."""
    dep = store.get_deployment(deployment_id)
    states = store.deployment_devices(deployment_id)
    dep["targets"] = [{"device": d, **states.get(d, {"state": DeploymentDeviceState.PENDING})} for d in dep["devices"]]
    return dep


def list_deployments(store: Store, offset: int = 0, limit: int = 50) -> tuple[list[JSON], int]:
    ids, total = store.deployment_ids(offset, limit)
    return [view(store, i) for i in ids], total


def deployed(store: Store, name: str, version: str) -> bool:
    """Whether a deployment (of the version or one of its variants) exists."""
    return bool(store.model_deployments(name, version))


# ---------------------------------------------------------------------- removing
def remove(ctx: Context, deployment_id: str) -> Job:
    """Enqueue the ``deploy-remove`` job of a deployment (stop the servers, remove the folders)."""
    dep = ctx.store.get_deployment(deployment_id)
    # a deploy job still at work (one that ended without saying so, or was pruned, does not count)
    job_state = ctx.store.job_state(dep["job"]) if dep.get("job") else None
    if dep["state"] == DeploymentState.DEPLOYING and job_state is not None and job_state not in TERMINAL_STATES:
        raise Conflict(f"deployment {deployment_id} is still deploying (job {dep.get('job')}); try again after it")
    job, _ = ctx.submit(JobKindName.DEPLOY_REMOVE, params={"deployment": deployment_id}, targets=dep["devices"])
    ctx.store.update_deployment(deployment_id, state=DeploymentState.REMOVING, remove_job=job["id"])
    ctx.store.audit(ctx.actor, "deployment.delete", deployment_id, model=f"{dep['model']}:{dep['version']}")
    return job


# ---------------------------------------------------------------------- the jobs
def _device_timeout(settings: Settings) -> float:
    return settings.ssh_connect_timeout_s + 4 * settings.ssh_command_timeout_s + remote.READY_TIMEOUT_S


def _each(settings: Settings, devices: Sequence[Device], what: str, work: Any,
          extra_s: float = 0.0) -> list[tuple[str, JSON]]:  # fmt: skip
    """Run ``work(device)`` on every device at once (each given the device timeout plus *extra_s*);
    each one's result or ``{"ok": False, error}``."""

    async def one(dev: Device) -> tuple[str, JSON]:
        try:
            res = await asyncio.wait_for(work(dev), _device_timeout(settings) + extra_s)
        except TimeoutError:
            return dev["id"], {"ok": False, "error": SSHTimeout(f"the {what} did not finish in time").to_dict()}
        except DeviceError as exc:
            return dev["id"], {"ok": False, "error": exc.to_dict()}
        return dev["id"], {"ok": True, **res}

    async def all_() -> list[tuple[str, JSON]]:
        return list(await asyncio.gather(*(one(d) for d in devices)))

    return pooling.call(all_())


def _reasons(results: Sequence[tuple[str, JSON]], names: Mapping[str, str], most: int = 5) -> str:
    bad = [(names.get(d, d), str((r.get("error") or {}).get("message", ""))) for d, r in results if not r["ok"]]
    return "; ".join(f"{n}: {why}" for n, why in bad[:most]) + (" ..." if len(bad) > most else "")


def deploy(store: Store, settings: Settings, run: JobRun) -> JSON | Partial:
    """The ``deploy`` job: the model and the edge server onto every target, each health-gated
    (a rollout's, ``params.rollout``: :func:`evc.deployments.rollout.run`)."""
    if run.params.get("rollout"):
        from evc.deployments import rollout

        return rollout.run(store, settings, run)
    if run.params.get("converge"):
        from evc.deployments import converge

        return converge.run(store, settings, run)
    dep = store.get_deployment(str(run.params["deployment"]))
    rec: JSON = (
        registry.get_variant(store, dep["model"], dep["version"], dep["variant"])
        if dep.get("variant")
        else registry.get_version(store, dep["model"], dep["version"])
    )
    data = registry.storage(settings, rec).read_verified(rec["sha256"], registry.record_ref(rec), rec.get("storage"))
    spec = remote.Spec(dep["id"], dep["model"], dep["served_version"], data, rec["sha256"], dep["python"], dep["port"],
                       int(dep.get("threads") or 0))  # fmt: skip
    devices = store.get_devices(run.job["targets"])
    names = {d["id"]: str(d.get("name") or d["id"]) for d in devices}
    run.event(f"deploying {dep['model']}:{dep['served_version']} to {len(devices)} device(s)", type=EventType.STEP)
    ports: Mapping[str, int] = dep.get("ports") or {}
    image = _container_image(store, settings, dep, run)

    def one(dev: Device) -> Any:
        port = int(ports.get(dev["id"], spec.port))
        if image is not None:
            return container.install_and_start(settings, dev, dataclasses.replace(spec, port=port), image)
        return remote.install_and_start(settings, dev, dataclasses.replace(spec, port=port))

    # a container deployment may also pull or ship (and load) the edge image
    results = _each(settings, devices, "deployment", one, container.DELIVERY_TIMEOUT_S if image else 0.0)
    ok = 0
    for dev_id, res in results:
        if res["ok"]:
            ok += 1
            state: JSON = {k: v for k, v in res.items() if k != "ok"}
        else:
            state = {"state": DeploymentDeviceState.FAILED, "reason": res["error"]["message"],
                     "version": spec.version, "sha256": spec.sha256}  # fmt: skip
        store.set_deployment_device(dep["id"], dev_id, state)
        run.result(dev_id, res)
        run.event(f"{names.get(dev_id, dev_id)}: {state['state']}" + (f" ({state['reason']})" if "reason" in state
                  and state["reason"] else ""), type=EventType.STEP, target=dev_id)  # fmt: skip
    summary: JSON = {"deployment": dep["id"], "running": ok, "failed": len(devices) - ok}
    if not ok:
        store.update_deployment(dep["id"], state=DeploymentState.FAILED)
        raise DeviceError(
            f"the deployment failed on all {len(devices)} devices: {_reasons(results, names)}",
            deployment=dep["id"],
        )
    if ok < len(devices):
        store.update_deployment(dep["id"], state=DeploymentState.PARTIAL)
        return Partial(summary, f"not running on {len(devices) - ok} of {len(devices)} devices: "
                       f"{_reasons(results, names)}")  # fmt: skip
    store.update_deployment(dep["id"], state=DeploymentState.RUNNING)
    return summary


def _container_image(store: Store, settings: Settings, dep: JSON, run: JobRun) -> container.Image | None:
    """A container deployment's edge image, resolved on the controller (its id recorded); None: a process."""
    if dep.get("runtime") != "container":
        return None
    image = container.resolve(settings, dep.get("image"))
    store.update_deployment(dep["id"], image=image.ref, image_id=image.id)
    run.event(f"edge image {image.ref} (id {image.id[:12]})", type=EventType.STEP)
    return image


def dep_runtime(store: Store, deployment_id: str) -> str:
    return str(store.get_deployment(deployment_id).get("runtime") or "process")


def remove_job(store: Store, settings: Settings, run: JobRun) -> JSON | Partial:
    """The ``deploy-remove`` job: stop every target's server, remove its folder; then the record
    (kept, ``removing``, while a device could not be cleaned: run the removal again); devices
    that left the deployment's targets (``params.leave``): :func:`evc.deployments.converge.leave_job`."""
    if run.params.get("leave"):
        from evc.deployments import converge

        return converge.leave_job(store, settings, run)
    dep_id = str(run.params["deployment"])
    devices = store.get_devices(run.job["targets"])
    names = {d["id"]: str(d.get("name") or d["id"]) for d in devices}
    runtime = dep_runtime(store, dep_id)
    stop = container.stop_and_remove if runtime == "container" else remote.stop_and_remove
    results = _each(settings, devices, "removal", lambda dev: stop(settings, dev, dep_id))
    ok = 0
    for dev_id, res in results:
        ok += bool(res["ok"])
        if res["ok"]:
            store.set_deployment_device(dep_id, dev_id, {"state": DeploymentDeviceState.REMOVED})
        run.result(dev_id, res)
    summary: JSON = {"deployment": dep_id, "removed": ok, "failed": len(devices) - ok}
    if ok == len(devices):
        store.delete_deployment(dep_id)
        if runtime == "container":  # the image archives shipped for it, unless another uses them
            pruned = container.prune_archives(store, settings)
            if pruned:
                run.event(f"removed {len(pruned)} image archive(s) no deployment uses", type=EventType.STEP)
        return summary
    message = f"not removed from {len(devices) - ok} of {len(devices)} devices: {_reasons(results, names)}"
    if not ok:
        raise DeviceError(message, deployment=dep_id)
    return Partial(summary, message)


__all__ = ["DEFAULT_PORT", "deploy", "deployed", "list_deployments", "remove", "remove_job", "submit", "view"]
