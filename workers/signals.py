"""Celery signal handlers of EVC's workers: a prefork child's live metrics are forgotten when it exits.

Imported by :mod:`evc.workers.celery_app`, so every process that builds EVC's Celery app has
them connected; they only act in pool child processes (Celery sends the signal there).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_process_shutdown, worker_ready

log = logging.getLogger(__name__)


def mark_child_dead(pid: int | None = None, exitcode: int | None = None, **_: Any) -> None:
    """``worker_process_shutdown``: drop this pool process's live gauges (``livesum`` and
    ``liveall`` multiprocess files), so a replaced child's SSH pool size no longer counts."""
    from evc import metrics

    try:
        metrics.mark_process_dead(pid or os.getpid())
    except OSError as exc:  # the directory was reset under us: nothing left to forget
        log.debug("could not mark process %s dead in the metrics directory: %s", pid, exc)


worker_process_shutdown.connect(mark_child_dead, weak=False)


def reap_on_start(sender: Any = None, **_: Any) -> None:
    """``worker_ready``: a worker that (re)starts looks for jobs whose worker died, at once and
    again when their leases have had time to expire."""
    app = getattr(sender, "app", None)
    settings = getattr(app, "evc_settings", None)
    if app is None or settings is None:
        return
    for delay in (0.0, settings.job_lease_s + 1.0):
        app.send_task("evc.reap_jobs", queue="default", countdown=delay or None)


worker_ready.connect(reap_on_start, weak=False)
