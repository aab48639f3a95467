"""The Celery app of a worker or beat process: ``celery -A evc.workers.app worker``."""

from __future__ import annotations

from evc.workers.celery_app import make_celery

from evc.settings import load_settings

app = make_celery(load_settings())
celery = app
