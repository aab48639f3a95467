"""The one Celery app builder: takes the settings, routes each task to its queue."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlsplit

from celery import Celery
from evc.workers import signals as _signals  # noqa: F401 - connects the worker signal handlers
from kombu import Queue

from evc.jobs import JOB_KINDS, QUEUES
from evc.queue import JobQueue
from evc.settings import Settings

#: task modules every worker imports; features add theirs here
TASK_MODULES = [
    "evc.tasks.core",
    "evc.tasks.health",
    "evc.tasks.provision",
    "evc.tasks.fl",
    "evc.tasks.clusters",
    "evc.tasks.models",
    "evc.tasks.deployments",
    "evc.tasks.inference",
    "evc.tasks.collab",
    "evc.tasks.recommend",
]


def _routes() -> dict[str, dict[str, str]]:
    routes = {jk.task: {"queue": jk.queue} for jk in JOB_KINDS.values()}
    return routes


def _broker(settings: Settings) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(broker URL, broker transport options, more app settings): Redis through EVC's
    transport, or through Sentinel."""
    extra: dict[str, Any] = {}
    broker_opts: dict[str, Any] = {"visibility_timeout": max(3600, settings.task_time_limit_s * 2)}
    if settings.redis_sentinels:
        # the master's password rides in EVC_REDIS_URL (redis://:PASSWORD@any/DB), as for the store
        parsed = urlsplit(settings.redis_url) if settings.redis_url else None
        auth = f":{quote(unquote(parsed.password), safe='')}@" if parsed and parsed.password else ""
        db = (parsed.path.strip("/") if parsed else "") or "0"
        broker_url = ";".join(f"sentinel://{auth}{hp.strip()}/{db}" for hp in settings.redis_sentinels.split(","))
        broker_opts["master_name"] = settings.redis_sentinel_master
        extra["result_backend_transport_options"] = {"master_name": settings.redis_sentinel_master}
    else:
        broker_url = settings.redis_url
        extra["broker_transport"] = "evc.workers.transport:Transport"
    return broker_url, broker_opts, extra


def _beat_schedule(settings: Settings) -> dict[str, Any]:
    """The periodic tasks: reap lost jobs, prune old ones, sweep device health."""
    return {
        "reap-jobs": {
            "task": "evc.reap_jobs",
            "schedule": max(1.0, settings.job_lease_s / 2),
            "options": {"queue": "default", "expires": max(1.0, settings.job_lease_s / 2)},
        },
        "prune-jobs": {
            "task": "evc.prune_jobs",
            "schedule": settings.job_prune_interval_s,
            "options": {"queue": "default", "expires": settings.job_prune_interval_s},
        },
        "health-sweep": {
            "task": "evc.health_tick",
            "schedule": settings.health_interval_s,
            "options": {"queue": "ssh", "expires": settings.health_interval_s},
        },
    }


def make_celery(settings: Settings, *, include_tasks: bool = True) -> Celery:
    """A Celery app for *settings*. The API builds one without tasks and sends by name."""
    app = Celery("evc", include=TASK_MODULES if include_tasks else [])
    broker_url, broker_opts, extra = _broker(settings)
    app.conf.update(
        broker_url=broker_url,
        # chords (an FL round: training tasks, then the aggregation) need a result backend;
        # only workers build them, and only tasks a chord reads keep results (ignore_result=False)
        result_backend=broker_url if include_tasks else None,
        result_expires=3600,
        broker_transport_options=broker_opts,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="default",
        task_queues=[Queue(q) for q in QUEUES],
        task_routes=_routes(),
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        # events on from the moment a task is sent, so Flower shows queued tasks too
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_track_started=True,
        worker_hijack_root_logger=False,
        worker_concurrency=settings.worker_concurrency,
        beat_schedule=_beat_schedule(settings),
        timezone="UTC",
        **extra,
    )
    # the app's one EVC attribute: its settings, the publisher fast path, enqueue/publish/revoke
    app.evc_queue = JobQueue(app, settings)
    return app
