"""The one way EVC puts work on (and takes it off) Celery's queues: :class:`JobQueue`.

``make_celery`` builds one per Celery app and keeps it as the app's only EVC attribute,
``app.evc_queue`` (Celery code that holds nothing but the app, a task's ``self.app``, finds it
there): :meth:`JobQueue.of` returns it. It knows the settings the app was built with, and:

* :meth:`~JobQueue.enqueue` a job's task (task id ``<job id>-<attempt>``, the job kind's queue);
* :meth:`~JobQueue.job_commands`: the Redis commands that publish a job's task, for the store to
  write in the same MULTI/EXEC as the job record (the :class:`~evc.workers.publish.TaskPublisher`
  fast path; none with Sentinel, where kombu publishes);
* :meth:`~JobQueue.publish` any task by name (rounds, recovery, reaping);
* :meth:`~JobQueue.revoke` a task.

Anything with Celery's ``send_task`` (a test's fake sender, an app built elsewhere) works too:
:meth:`JobQueue.of` wraps it in a queue without the fast path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evc.jobs import JOB_KINDS, Sender
from evc.runtime import WorkerRuntime
from evc.settings import Settings

#: the Redis commands that publish one task: (command, args)
Command = tuple[str, tuple[Any, ...]]


def _make_publisher(app: Any) -> Any:
    from evc.workers.publish import TaskPublisher

    return TaskPublisher(app)


class JobQueue:
    """Enqueue, publish and revoke tasks over a Celery app (or any :class:`~evc.jobs.Sender`)."""

    def __init__(self, app: Sender, settings: Settings | None = None, *, fast_path: bool | None = None) -> None:
        self.app = app
        self.settings = settings
        #: publish job tasks with the job record (a TaskPublisher; not through Sentinel)
        self.fast_path = bool(settings is not None and not settings.redis_sentinels) if fast_path is None else fast_path

    @classmethod
    def of(cls, sender: Any) -> JobQueue:
        """The queue of *sender*: itself, the one ``make_celery`` attached, or a plain wrapper."""
        if isinstance(sender, JobQueue):
            return sender
        queue = getattr(sender, "evc_queue", None)
        if isinstance(queue, JobQueue):
            return queue
        return cls(sender)

    @property
    def publisher(self) -> Any | None:
        """This process's :class:`~evc.workers.publish.TaskPublisher` for the app (kept by the
        :class:`~evc.runtime.WorkerRuntime`), or None without the fast path."""
        if not self.fast_path:
            return None
        return WorkerRuntime.current().publisher(self.app, _make_publisher)

    # ------------------------------------------------------------------ job tasks
    @staticmethod
    def task_of(job: Mapping[str, Any]) -> tuple[str, str, list[Any], str]:
        """(task name, task id, args, queue) of *job*'s current attempt."""
        jk = JOB_KINDS[job["kind"]]
        return jk.task, f"{job['id']}-{job.get('attempt', 0)}", [job["id"]], jk.queue

    def job_commands(self, job: Mapping[str, Any], countdown: float | None = None) -> list[Command]:
        """The Redis commands that publish *job*'s task (empty without the fast path)."""
        publisher = self.publisher
        if publisher is None:
            return []
        return list(publisher.commands(*self.task_of(job), countdown=countdown))

    def enqueue(self, job: Mapping[str, Any], countdown: float | None = None) -> None:
        """(Re-)enqueue an existing job's task."""
        name, task_id, args, queue = self.task_of(job)
        self.publish(name, args, queue=queue, task_id=task_id, countdown=countdown)

    # ------------------------------------------------------------------ any task
    def publish(
        self,
        name: str,
        args: Any = None,
        *,
        queue: str,
        task_id: str | None = None,
        countdown: float | None = None,
        **options: Any,
    ) -> Any:
        """Send the task *name* to *queue* (``Celery.send_task``; *options* go with it)."""
        if task_id is not None:
            options["task_id"] = task_id
        if countdown:
            options["countdown"] = countdown
        return self.app.send_task(name, args=args, queue=queue, **options)

    def revoke(self, task_id: str) -> None:
        """Revoke *task_id*: workers drop its message when it comes."""
        self.app.control.revoke(task_id)  # type: ignore[attr-defined]

    def send_task(self, name: str, args: Any = None, **options: Any) -> Any:
        """``Celery.send_task`` (so a queue is a :class:`~evc.jobs.Sender` too)."""
        return self.app.send_task(name, args=args, **options)


__all__ = ["Command", "JobQueue"]
