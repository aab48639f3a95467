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
