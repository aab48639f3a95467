"""The Celery app of a worker or beat process: ``celery -A evc.workers.app worker``."""

from __future__ import annotations

from evc.settings import load_settings
from evc.workers.celery_app import make_celery

app = make_celery(load_settings())
celery = app
