"""gunicorn settings for EVC's API: ``gunicorn -c python:evc.api.gunicorn_conf evc.api.wsgi:app``.

With ``PROMETHEUS_MULTIPROC_DIR`` set (multiprocess metrics, see :mod:`evc.metrics`), the
master clears the directory's metric files from earlier runs when it starts and forgets a
worker's live gauges when the worker exits. Without it both hooks do nothing. prometheus_client
is imported only inside the hooks: importing it creates files in that directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: prometheus_client's variable (``evc.metrics.MULTIPROC_ENV``)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def on_starting(server: Any) -> None:
    """Before the first worker forks: remove metric files a previous API run left behind."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        from evc import metrics

        metrics.reset_multiprocess_dir(path)


def child_exit(server: Any, worker: Any) -> None:
    """A worker exited (in the master): drop its live gauges from the multiprocess files."""
    if os.environ.get(MULTIPROC_ENV):
        from evc import metrics

        metrics.mark_process_dead(worker.pid)
