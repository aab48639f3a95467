"""The API's and the CLI's choices are the core's registries: adding a strategy, a partition or a
cluster profile there offers it everywhere. Also the service Context's small helpers. No services."""

from __future__ import annotations

from typing import Any

import click
import pytest
from marshmallow import Schema, validate

from evc import choices, jobs, profiles
from evc.context import NO_QUEUE, SYSTEM, Caller, Context
from evc.fl.strategy import STRATEGIES
from evc.inventory_import import FORMATS
from evc.store import JOB_STATES


def one_of(schema: type[Schema], name: str) -> list[Any]:
    """The choices a schema field's OneOf validator accepts (a list field: its items')."""
    field = schema._declared_fields[name]
    field = getattr(field, "inner", field)
    (v,) = [v for v in field.validators if isinstance(v, validate.OneOf)]
    return list(v.choices)


def cli_choices() -> dict[tuple[str, str], list[str]]:
    """Every click.Choice option of the CLI, by (command path, option name)."""
    from evc.cli import main

    out: dict[tuple[str, str], list[str]] = {}

    def walk(cmd: click.Command, path: str) -> None:
        for p in cmd.params:
            if isinstance(p.type, click.Choice):
                out[(path, p.opts[0])] = list(p.type.choices)
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(main, "")
    return out


def test_strategy_registry_is_keyed_by_the_offered_names() -> None:
    assert tuple(STRATEGIES) == choices.STRATEGIES


def test_api_choices_are_the_registries() -> None:
    from evc.api.clusters import ClusterCreateSchema, LevelSchema
    from evc.api.fl import FLJobCreateSchema, PartitionSchema
    from evc.api.provision import RetryPolicySchema, RetrySchema, RunOptionsSchema
    from evc.api.schemas import DeviceImportSchema, JobListArgs, TokenCreateSchema

    assert one_of(FLJobCreateSchema, "strategy") == list(STRATEGIES)
    assert one_of(PartitionSchema, "partition") == list(choices.PARTITIONS)
    assert one_of(ClusterCreateSchema, "profile") == profiles.names() == list(profiles.profiles())
    assert one_of(LevelSchema, "offline") == list(choices.OFFLINE_POLICIES)
    assert one_of(TokenCreateSchema, "scopes") == list(choices.SCOPES)
    assert one_of(RetryPolicySchema, "on") == one_of(RetrySchema, "on") == list(choices.RETRYABLE)
    assert one_of(RunOptionsSchema, "lock") == list(choices.LOCK_MODES)
    assert one_of(JobListArgs, "state") == list(JOB_STATES)
    assert one_of(DeviceImportSchema, "format") == list(FORMATS)


def test_cli_choices_are_the_registries() -> None:
    got = cli_choices()
    assert got[("fl start", "--strategy")] == list(STRATEGIES)
    assert got[("fl partition", "--partition")] == list(choices.PARTITIONS)
    assert got[("cluster create", "--profile")] == profiles.names()
    assert got[("cluster level", "--offline")] == list(choices.OFFLINE_POLICIES)
    assert got[("token create", "--scope")] == list(choices.SCOPES)
    assert got[("job retry", "--on")] == list(choices.RETRYABLE)
    assert got[("device import", "--format")] == list(FORMATS)
    assert got[("provision", "--lock")] == list(choices.LOCK_MODES)


def test_core_validation_uses_the_same_names() -> None:
    from evc.auth import SCOPES
    from evc.errors import ValidationError
    from evc.fl.service import check_partition_args
    from evc.provisioning.request import RETRYABLE, ProvisionRequest

    assert SCOPES == choices.SCOPES and RETRYABLE == choices.RETRYABLE
    for part in choices.PARTITIONS:
        assert check_partition_args({"partition": part})["partition"] == part
    with pytest.raises(ValidationError):
        check_partition_args({"partition": "round-robin"})
    for mode in choices.LOCK_MODES:
        assert ProvisionRequest.from_dict({"playbook": "p", "targets": ["d"], "lock": mode}).lock == mode
    with pytest.raises(ValidationError):
        ProvisionRequest.from_dict({"playbook": "p", "targets": ["d"], "lock": "steal"})


# ------------------------------------------------------------------------------- the context
class FakeStore:
    pass


def test_context_helpers() -> None:
    store: Any = FakeStore()
    ctx = Context(store, settings=None, caller=Caller("operator:ci", frozenset({"admin"})))  # type: ignore[arg-type]
    assert ctx.actor == "operator:ci" and ctx.idempotency_key is None and ctx.queue is NO_QUEUE
    keyed = ctx.with_key("POST /x k\nabc")
    assert keyed.idempotency_key == "POST /x k\nabc" and ctx.idempotency_key is None  # frozen: a copy
    assert keyed.with_key(None).idempotency_key is None
    health = keyed.acting_as("evc:health")
    assert health.actor == "evc:health" and health.caller.scopes == frozenset()
    assert health.idempotency_key == keyed.idempotency_key and health.store is store
    assert Context(store, None).caller == SYSTEM and SYSTEM.actor == ""  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no job queue"):
        NO_QUEUE.send_task("evc.noop", args=["job_x"])


def test_context_submit_passes_caller_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def submit(store: Any, sender: Any, kind: str, **kw: Any) -> tuple[dict[str, Any], bool]:
        seen.update(store=store, sender=sender, kind=kind, **kw)
        return {"id": "job_1"}, True

    monkeypatch.setattr(jobs, "submit", submit)

    class Queue:
        def send_task(self, name: str, args: Any = None, **options: Any) -> Any:
            raise AssertionError("the fake submit sends nothing")

    store: Any = FakeStore()
    q = Queue()
    ctx = Context(store, None, q, Caller("operator:a"), "k\nfp")  # type: ignore[arg-type]
    assert ctx.submit("facts", targets=["dev_1"], pipe="P") == ({"id": "job_1"}, True)
    assert seen == {
        "store": store, "sender": q, "kind": "facts", "params": None, "targets": ["dev_1"],
        "created_by": "operator:a", "idempotency_key": "k\nfp", "countdown": None, "pipe": "P",
    }  # fmt: skip
    ctx.with_key(None).submit("noop", params={"sleep_s": 1})
    assert seen["idempotency_key"] is None and seen["params"] == {"sleep_s": 1}
