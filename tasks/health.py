"""Health tasks: the beat-scheduled tick (sweep all, no job record) and the ``health`` job."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import shared_task
from evc.tasks.base import TASK_OPTIONS, run_job, settings_of, store_of

from evc import health
from evc.context import Caller, Context
from evc.errors import Conflict
from evc.jobs import JobRun
from evc.store import JSON

log = logging.getLogger(__name__)


def _owner(task: Any) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task.request.id}"


def _context(task: Any, store: Any) -> Context:
    """The tick's or job's context: its follow-up jobs are EVC's own (``evc:health``)."""
    return Context(store, settings_of(task), task.app, Caller("evc:health"))


def _reconverge(ctx: Context, changes: list[JSON]) -> None:
    """Devices that came back get their cluster's level checked and re-applied where drifted,
    and their deployments re-converged; devices lost show ``unreachable`` in their deployments."""
    from evc.clusters import reconverge_recovered
    from evc.deployments.converge import on_health

    level_jobs = reconverge_recovered(ctx, changes)
    # a device's deployments re-converge after its level job (the deploy job waits for it)
    on_health(ctx, changes, after={t: str(j["id"]) for j in level_jobs for t in j.get("targets") or []})


def _revive(ctx: Context, res: Any) -> None:
    """Deployments whose server no longer answers on a device that answered the sweep (it
    rebooted between sweeps, the server died) re-converged (:func:`evc.deployments.servers.revive`);
    devices that came back are :func:`_reconverge`'s."""
    from evc.deployments.servers import revive

    back = {str(ch.get("device")) for ch in res.changes}
    try:
        revive(ctx, [d for d in res.results if d not in back])
    except Exception:  # noqa: BLE001 - checking the servers never fails a sweep
        log.exception("the deployments' servers were not checked after the sweep")


def _follow(ctx: Context, res: Any) -> None:
    """Watched model recommendations re-evaluated for the swept devices (load and facts may have
    changed): an event when one would change (:func:`evc.recommend.advise.follow`)."""
    from evc.recommend.advise import follow

    try:
        follow(ctx.store, ctx.settings, list(res.states))
    except Exception:  # noqa: BLE001 - following recommendations never fails a sweep
        log.exception("recommendations were not re-evaluated after the sweep")


@shared_task(name="evc.health_tick", **{**TASK_OPTIONS, "max_retries": 0})
def health_tick(self) -> JSON:
    """Beat's sweep of the whole fleet; skipped when another sweep still runs."""
    ctx = _context(self, store_of(self))
    store, settings = ctx.store, ctx.settings
    with health.sweep_lock(store, settings, _owner(self)) as got:
        if not got:
            return {"skipped": "another sweep is running"}
        res = health.sweep(store, settings)
    _reconverge(ctx, res.changes)
    _revive(ctx, res)
    _follow(ctx, res)
    return res.summary()


@shared_task(name="evc.health_sweep", **TASK_OPTIONS)
def health_sweep(self, job_id: str) -> str:
    """A ``health`` job: sweep its target devices (all when none), a result per device."""

    def body(run: JobRun) -> JSON:
        ctx = _context(self, run.store)
        store, settings = ctx.store, ctx.settings
        wait = max(settings.health_timeout_s + settings.ssh_connect_timeout_s, 30.0)
        with health.sweep_lock(store, settings, _owner(self), wait_s=wait) as got:
            if not got:
                raise Conflict("another health sweep is still running; try again later")
            res = health.sweep(store, settings, run.job.get("targets") or None)
        _reconverge(ctx, res.changes)
        _revive(ctx, res)
        _follow(ctx, res)
        per_device = res.per_device()
        for device_id, result in per_device.items():
            run.result(device_id, result, count=False)
        run.progress(done=len(per_device), total=len(per_device) or 1)
        return res.summary()

    return run_job(self, job_id, body)
