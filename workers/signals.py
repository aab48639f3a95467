"""Every Celery signal handler of EVC, in one place.

Imported by :mod:`evc.workers.celery_app`, so every process that builds EVC's Celery app has
them connected; Celery sends these signals only in worker processes.

* the worker runtime (:class:`evc.runtime.WorkerRuntime`: store, SSH pools, FL channels, lease
  renewer, publishers) is started by ``worker_process_init`` in each prefork child and
  ``worker_init`` in the worker's main process (the one that runs tasks with the solo and threads
  pools), and closed by ``worker_process_shutdown`` / ``worker_shutdown``;
* a prefork child that exits drops its live metrics (``worker_process_shutdown``);
* a worker that is ready asks for the jobs and FL rounds lost with a worker (``worker_ready``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import current_app
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from evc.queue import JobQueue
from evc.runtime import WorkerRuntime
from evc.settings import Settings

log = logging.getLogger(__name__)


def _settings(app: Any) -> Settings | None:
    return JobQueue.of(app).settings if app is not None else None


# ---------------------------------------------------------------------- the worker runtime
def start_runtime(sender: Any = None, **_: Any) -> None:
    """``worker_init`` (main process; sender: the worker) and ``worker_process_init`` (a prefork
    child; no sender: the worker's app is the current app): a fresh runtime for this process.
    Nothing in it starts before it is used, so the prefork parent forks no threads."""
    app = getattr(sender, "app", None) or current_app._get_current_object()
    WorkerRuntime.start(_settings(app))


def stop_runtime(**_: Any) -> None:
    """``worker_process_shutdown`` / ``worker_shutdown``: close this process's runtime (a
    prefork child exits without running atexit handlers: its SSH connections close here)."""
    try:
        WorkerRuntime.stop()
    except Exception:  # noqa: BLE001 - never stop a worker from exiting
        log.warning("could not close the worker runtime", exc_info=True)


worker_init.connect(start_runtime, weak=False)
worker_process_init.connect(start_runtime, weak=False)
worker_process_shutdown.connect(stop_runtime, weak=False)
worker_shutdown.connect(stop_runtime, weak=False)


# ---------------------------------------------------------------------- metrics
def mark_child_dead(pid: int | None = None, exitcode: int | None = None, **_: Any) -> None:
    """``worker_process_shutdown``: drop this pool process's live gauges (``livesum`` and
    ``liveall`` multiprocess files), so a replaced child's SSH pool size no longer counts."""
    from evc import metrics

    try:
        metrics.mark_process_dead(pid or os.getpid())
    except OSError as exc:  # the directory was reset under us: nothing left to forget
        log.debug("could not mark process %s dead in the metrics directory: %s", pid, exc)


worker_process_shutdown.connect(mark_child_dead, weak=False)


# ---------------------------------------------------------------------- recovery at start
def reap_on_start(sender: Any = None, **_: Any) -> None:
    """``worker_ready``: a worker that (re)starts looks for jobs whose worker died, at once and
    again when their leases have had time to expire."""
    app = getattr(sender, "app", None)
    settings = _settings(app)
    if app is None or settings is None:
        return
    queue = JobQueue.of(app)
    for delay in (0.0, settings.job_lease_s + 1.0):
        queue.publish("evc.reap_jobs", queue="default", countdown=delay or None)


def recover_fl_on_start(sender: Any = None, **_: Any) -> None:
    """``worker_ready``: a worker that (re)starts checks for FL rounds whose tasks died with a
    worker (on its FL queue)."""
    try:
        app = sender.app
        queues = list(app.amqp.queues.consume_from or {})
        fl = [q for q in queues if q == "fl" or q.startswith("fl-")]
        queue = "fl" if "fl" in queues or not queues else (fl or queues)[0]
        JobQueue.of(app).publish("evc.fl_recover", [None], queue=queue, ignore_result=True)
    except Exception:  # noqa: BLE001 - never stop a worker from starting
        log.warning("could not ask for FL recovery at worker start", exc_info=True)


worker_ready.connect(reap_on_start, weak=False)
worker_ready.connect(recover_fl_on_start, weak=False)
