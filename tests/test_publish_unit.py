"""The publisher's shortcut for a task message's ``argsrepr`` says what Celery's would."""

from __future__ import annotations

from typing import Any

import pytest
from celery.utils.saferepr import saferepr
from evc.workers.publish import plain_argsrepr


@pytest.mark.parametrize(
    "args",
    [[], ["job_0123abcd"], ["job_x", 3], ["dev_1", "rnd-2.a:b@c"], [0, -7, 12345678901234567890]],
)
def test_plain_arguments_read_as_celery_says_them(args: list[Any]) -> None:
    assert plain_argsrepr(args) == saferepr(args, 1024)


@pytest.mark.parametrize(
    "args", [["a'b"], ["é"], ["x" * 65], [1.5], [True], [None], [{"k": 1}], [["n"]], list(range(9))]
)
def test_anything_else_is_left_to_celery(args: list[Any]) -> None:
    assert plain_argsrepr(args) is None


def _publisher() -> Any:
    from evc.workers.celery_app import make_celery
    from evc.workers.publish import TaskPublisher

    from evc.settings import load_settings

    return TaskPublisher(make_celery(load_settings(env={}, redis_url="redis://127.0.0.1:1/3"), include_tasks=False))


@pytest.mark.parametrize(
    ("name", "task_id", "args", "queue"),
    [
        ("evc.noop", "job_a-0", ["job_a"], "default"),
        ("evc.noop", "job_b-3", ["job_b"], "default"),  # the same task again: from its template
        ("evc.noop", "job_b-3", ["job_b"], "ssh"),
        ("evc.provision", "job_c-0", ["job_c", 2], "ansible"),
        ("evc.noop", "job'd-0", ["a'b"], "default"),  # not plain: Celery builds it
    ],
)
def test_messages_from_templates_are_celerys(name: str, task_id: str, args: list[Any], queue: str) -> None:
    """A task's later messages are copies of its first with the id and arguments put in: the
    same message and envelope text Celery's ``as_task_v2`` and kombu's envelope would give."""
    import base64
    import json
    import re
    import uuid

    from evc.workers.publish import _envelope, _event_envelope

    tp = _publisher()
    tp.commands(name, "job_first-0", ["job_first"], queue)  # the task's first message
    slow = tp._as_task_v2(name, task_id, args, plain_argsrepr(args), None)
    assert tp.message(name, task_id, args) == slow
    (_, (q, text)), (_, (topic, event)) = tp.commands(name, task_id, args, queue)
    body = base64.b64encode(json.dumps(slow.body).encode()).decode()
    tag = re.search(r'"delivery_tag": "([0-9a-f-]{36})"', text).group(1)  # type: ignore[union-attr]
    assert q == queue and text == json.dumps(_envelope(body, slow.headers, slow.properties, queue, tag))
    for t in (tag, json.loads(event)["properties"]["delivery_tag"]):  # str(uuid.uuid4())'s text
        assert str(uuid.UUID(t)) == t and uuid.UUID(t).version == 4 and uuid.UUID(t).variant == uuid.RFC_4122
    sent = json.loads(event)
    assert json.loads(base64.b64decode(sent["body"]))["uuid"] == task_id and topic == tp.event_topic
    assert json.dumps(sent) == json.dumps(
        _event_envelope(tp.hostname, sent["body"], sent["properties"]["delivery_tag"])
    )
