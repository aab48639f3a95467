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


def uuid4_text() -> str:
    """``str(uuid.uuid4())`` (a random version-4 UUID, the same text) without building a
    :class:`uuid.UUID`: a delivery tag per message."""
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
        #: each task's first message (no countdown, plain arguments): later ones are copies
        self._protos: dict[str, Any] = {}
        self._templates: dict[tuple[str, str], str] = {}
        self._event_template: str | None = None

    def message(self, name: str, task_id: str, args: list[Any], countdown: float | None = None) -> Any:
        """Celery's protocol-2 message for the task (``amqp.as_task_v2``). A task without a
        countdown whose id and arguments are plain (the job tasks) is a copy of the task's first
        message with its id and arguments put in: the same message, without Celery's cost."""
        argsrepr = plain_argsrepr(args)
        proto = self._proto(name, task_id, args, argsrepr, countdown)
        if proto is None:
            return self._as_task_v2(name, task_id, args, argsrepr, countdown)
        ids = {"id": task_id, "root_id": task_id, "argsrepr": argsrepr}
        event = _sent_event(proto, task_id, argsrepr)
        return proto._replace(
            headers={**proto.headers, **ids}, properties={**proto.properties, "correlation_id": task_id},
            body=(args, *proto.body[1:]), sent_event=event,
        )  # fmt: skip

    def _proto(self, name: str, task_id: str, args: list[Any], argsrepr: str | None, countdown: float | None) -> Any:
        """The task's first message, when this one can be a copy of it (else None)."""
        if countdown or argsrepr is None or not _PLAIN.match(task_id):
            return None
        proto = self._protos.get(name)
        if proto is None:
            proto = self._protos[name] = self._as_task_v2(name, task_id, args, argsrepr, None)
        return proto

    def _as_task_v2(
        self, name: str, task_id: str, args: list[Any], argsrepr: str | None, countdown: float | None
    ) -> Any:
        return self.app.amqp.as_task_v2(
            task_id, name, args=args, kwargs={}, countdown=countdown, origin=self.hostname,
            create_sent_event=self.send_sent_event, reply_to=self.reply_to, root_id=task_id, ignore_result=None,
            argsrepr=argsrepr, kwargsrepr="{}",
        )  # fmt: skip

    def commands(
        self, name: str, task_id: str, args: list[Any], queue: str, countdown: float | None = None
    ) -> list[Command]:
        argsrepr = plain_argsrepr(args)
        proto = self._proto(name, task_id, args, argsrepr, countdown)
        if proto is None or argsrepr is None:  # (no proto without an argsrepr)
            msg = self._as_task_v2(name, task_id, args, argsrepr, countdown)
            body = base64.b64encode(json.dumps(msg.body).encode()).decode()
            text = json.dumps(_envelope(body, msg.headers, msg.properties, queue, uuid4_text()))
            sent = msg.sent_event
        else:  # what :meth:`message` copies, put in as text: the envelope's JSON once per task and queue
            body = base64.b64encode(json.dumps((args, *proto.body[1:])).encode()).decode()
            text = self._template(name, queue, proto)
            for hole, value in zip(_HOLES, (task_id, argsrepr, body, uuid4_text()), strict=True):
                text = text.replace(hole, value)
            sent = _sent_event(proto, task_id, argsrepr)
        cmds: list[Command] = [("lpush", (queue, text))]
        if sent is not None:
            event = {
                "hostname": self.hostname, "utcoffset": 0.0, "pid": os.getpid(),
                "clock": self.app.clock.forward(), **sent, "queue": queue, "exchange": "",
                "routing_key": queue, "timestamp": time.time(), "type": "task-sent",
            }  # fmt: skip
            if self._event_template is None:
                self._event_template = json.dumps(_event_envelope(self.hostname, _HOLES[2], _HOLES[3]))
            ev_body = base64.b64encode(json.dumps(event).encode()).decode()
            ev_text = self._event_template.replace(_HOLES[2], ev_body).replace(_HOLES[3], uuid4_text())
            cmds.append(("publish", (self.event_topic, ev_text)))
        return cmds

    def _template(self, name: str, queue: str, msg: Any) -> str:
        """The JSON text of the envelope of *name*'s messages to *queue*, with holes (``_HOLES``)
        for the task id, the arguments' repr, the body and the delivery tag."""
        text = self._templates.get((name, queue))
        if text is None:
            task_id, argsrepr, body, tag = _HOLES
            headers = {**msg.headers, "id": task_id, "root_id": task_id, "argsrepr": argsrepr}
            properties = {**msg.properties, "correlation_id": task_id}
            text = self._templates[(name, queue)] = json.dumps(_envelope(body, headers, properties, queue, tag))
        return text


#: where a template's values go: text JSON keeps as it is, found nowhere else in an envelope
_HOLES = tuple(f"<<evc-{what}-{uuid.uuid4().hex}>>" for what in ("task-id", "argsrepr", "body", "tag"))


def _sent_event(proto: Any, task_id: str, argsrepr: str | None) -> Any:
    """The task-sent event fields of a copy of *proto* (a task's first message)."""
    return proto.sent_event and {**proto.sent_event, "args": argsrepr, "root_id": task_id, "uuid": task_id}


def _envelope(body: str, headers: Any, properties: Any, queue: str, tag: str) -> dict[str, Any]:
    """kombu's Redis envelope of a task message (*body* base64)."""
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": tag,
        },
    }


def _event_envelope(hostname: str, body: str, tag: str) -> dict[str, Any]:
    """kombu's Redis envelope of a task-sent event (*body* base64)."""
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"hostname": hostname},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": "celeryev", "routing_key": "task.sent"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": tag,
        },
    }
