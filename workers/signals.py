"""Celery signal handlers of EVC's workers: a prefork child's live metrics are forgotten when it exits.

Imported by :mod:`evc.workers.celery_app`, so every process that builds EVC's Celery app has
them connected; they only act in pool child processes (Celery sends the signal there).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_process_shutdown

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
