"""Publish job tasks as part of a Redis pipeline: the task message and its task-sent event.

kombu's publish path costs about as much CPU as the rest of a job submission (routing tables,
producer pools, two separate round trips for the message and the Flower event). EVC's job
tasks are simple — JSON, a direct queue, no callbacks — so this module builds the very same
Celery protocol-2 message (with Celery's own ``as_task_v2``) and the same kombu Redis envelope
(``LPUSH <queue>``, ``PUBLISH /<db>.celeryev/task.sent``) and hands them to the caller, who sends
them in the same MULTI/EXEC as the job record. A test checks the output against kombu's."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import time
import uuid
from typing import Any

from celery import Celery

Command = tuple[str, tuple[Any, ...]]


#: a task argument whose ``repr`` is exactly Celery's ``saferepr`` of it (ids, names, numbers)
_PLAIN = re.compile(r"[A-Za-z0-9_.:@-]{0,64}\Z")


def plain_argsrepr(args: list[Any]) -> str | None:
    """Celery's ``saferepr`` of *args* (the message's ``argsrepr``) for the plain ids and
    integers tasks take, without its cost (a twentieth of a submission); None for anything
    else: Celery computes it."""
    if len(args) <= 8 and all(type(a) is int or (type(a) is str and _PLAIN.match(a)) for a in args):
        return repr(list(args))
    return None


class TaskPublisher:
    """Builds the Redis commands that enqueue one task, exactly as kombu's Redis transport would."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.hostname = f"gen{os.getpid()}@{socket.gethostname()}"
        self.reply_to = str(uuid.uuid4())
        self.send_sent_event = bool(app.conf.task_send_sent_event)
        db = 0
        url = str(app.conf.broker_url or "")
        tail = url.rsplit("/", 1)[-1] if url.count("/") >= 3 else ""
        if tail.isdigit():
            db = int(tail)
        self.event_topic = f"/{db}.celeryev/task.sent"

    def commands(
        self, name: str, task_id: str, args: list[Any], queue: str, countdown: float | None = None
    ) -> list[Command]:
        amqp = self.app.amqp
        msg = amqp.as_task_v2(
            task_id, name, args=args, kwargs={}, countdown=countdown, origin=self.hostname,
            create_sent_event=self.send_sent_event, reply_to=self.reply_to, root_id=task_id, ignore_result=None,
            argsrepr=plain_argsrepr(args), kwargsrepr="{}",
        )  # fmt: skip
        body = json.dumps(msg.body).encode()
        envelope = {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": msg.headers,
            "properties": {
                **msg.properties,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        cmds: list[Command] = [("lpush", (queue, json.dumps(envelope)))]
        if msg.sent_event is not None:
            event = {
                "hostname": self.hostname, "utcoffset": 0.0, "pid": os.getpid(),
                "clock": self.app.clock.forward(), **msg.sent_event, "queue": queue, "exchange": "",
                "routing_key": queue, "timestamp": time.time(), "type": "task-sent",
            }  # fmt: skip
            ev_env = {
                "body": base64.b64encode(json.dumps(event).encode()).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"hostname": self.hostname},
                "properties": {
                    "delivery_mode": 1,
                    "delivery_info": {"exchange": "celeryev", "routing_key": "task.sent"},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid.uuid4()),
                },
            }
            cmds.append(("publish", (self.event_topic, json.dumps(ev_env))))
        return cmds
