"""evc.model: the state names are the strings the API documents and Redis holds, and the
records survive the store's JSON encoding unchanged (pure: no services)."""

from __future__ import annotations

import json
from typing import Any, get_type_hints

import click
import pytest
from evc.api import schemas
from evc.api.clusters import ClusterCreateSchema, LevelSchema
from marshmallow import Schema, validate

from evc import model
from evc.jobs import JOB_KINDS, QUEUES, new_job
from evc.model import (
    ClusterProfile,
    DeviceState,
    FLPhase,
    JobKindName,
    JobState,
    Privilege,
    Scope,
)
from evc.profiles import LEVELS, profiles
from evc.store import JOB_STATES as STORE_JOB_STATES
from evc.store import TERMINAL_STATES as STORE_TERMINAL_STATES


def _one_of(schema: type[Schema], name: str) -> list[str]:
    field = schema._declared_fields[name]
    inner = getattr(field, "inner", field)
    found = [v for v in inner.validators if isinstance(v, validate.OneOf)]
    assert found, f"{schema.__name__}.{name} has no OneOf"
    return list(found[0].choices)


def test_job_states_are_the_documented_strings() -> None:
    assert [s.value for s in JobState] == ["queued", "running", "succeeded", "partial", "failed", "cancelled"]
    assert model.JOB_STATES == tuple(STORE_JOB_STATES)
    assert _one_of(schemas.JobListArgs, "state") == list(model.JOB_STATES)
    for state in JobState:
        assert state in schemas.JobSchema._declared_fields["state"].metadata["description"]


def test_terminal_states_match_the_store() -> None:
    assert model.TERMINAL_STATES == STORE_TERMINAL_STATES
    assert model.TERMINAL_STATES == {"succeeded", "partial", "failed", "cancelled"}
    assert set(model.ACTIVE_JOB_STATES) | model.TERMINAL_STATES == set(model.JOB_STATES)
    assert not set(model.ACTIVE_JOB_STATES) & model.TERMINAL_STATES


def test_every_job_kind_has_a_member() -> None:
    assert set(JOB_KINDS) == {k.value for k in JobKindName}
    for name, kind in JOB_KINDS.items():
        assert type(kind.name) is str and type(kind.queue) is str  # plain strings for Celery and click
        assert kind.name == name and JobKindName(name) == name
        assert kind.queue in QUEUES
    assert _one_of(schemas.JobCreateSchema, "kind") == [JobKindName.NOOP]


def test_members_are_their_strings() -> None:
    """Stored, sent and printed exactly as the strings they replace."""
    member = DeviceState.ONLINE
    assert member == "online" and hash(member) == hash("online")
    assert f"{member}" == str(member) == f"{member}" == "online"
    assert repr(member) == "'online'" and repr([member]) == "['online']"
    assert json.dumps({"state": member, "in": [member]}) == '{"state": "online", "in": ["online"]}'
    assert type(str(member)) is str
    assert {"online": 1}[member] == 1


def test_collections_hold_plain_strings() -> None:
    """click (8.2+) shows an enum choice by its name: the exported choices are plain strings."""
    for values in (model.JOB_STATES, model.TERMINAL_STATES, model.HEALTH_STATES, model.OFFLINE_STATES,
                   model.UNSWEPT_STATES, model.RUNNABLE_STATES, model.ACTIVE_PHASES, QUEUES):  # fmt: skip
        assert all(type(v) is str for v in values), values
    choice = click.Choice(model.JOB_STATES)
    assert choice.convert("partial", None, None) == "partial"


def test_device_states() -> None:
    assert {s.value for s in DeviceState} == {
        "pending", "registering", "online", "degraded", "offline", "unreachable", "failed",
    }  # fmt: skip
    assert model.HEALTH_STATES == ("online", "degraded", "offline")
    assert model.OFFLINE_STATES == {"offline", "unreachable"}
    assert model.UNSWEPT_STATES == {"pending", "registering", "failed"}
    assert model.RUNNABLE_STATES == ("online", "degraded")


def test_privileges_levels_profiles_scopes() -> None:
    assert [p.value for p in Privilege] == ["user", "sudo", "root"]
    assert model.PRIVILEGE_RANK == {"user": 0, "sudo": 1, "root": 2}
    assert LEVELS == {0: "connected", 1: "provisioned", 2: "monitored", 3: "deployable", 4: "application"}
    assert {p.value for p in ClusterProfile} == set(profiles())
    assert _one_of(ClusterCreateSchema, "profile") == ["direct", "container", "k3s", "k8s"]
    assert _one_of(LevelSchema, "offline") == ["skip", "fail", "wait"]
    assert [s.value for s in Scope] == ["admin", "read", "models"]
    assert _one_of(schemas.TokenCreateSchema, "scopes") == ["admin", "read", "models"]


def test_fl_phases() -> None:
    assert model.ACTIVE_PHASES == ("training", "closing", "closed", "waiting")
    assert set(model.BETWEEN_ROUNDS) | set(model.IN_ROUND) == set(model.ACTIVE_PHASES)
    assert {FLPhase.STOPPED, FLPhase.DONE, FLPhase.FAILED}.isdisjoint(model.ACTIVE_PHASES)


def test_job_record_round_trip() -> None:
    """A new job has every field the Job record names, and the store's JSON encoding (one
    json.dumps per field) gives back an equal record of plain strings."""
    job = new_job(JobKindName.NOOP, targets=["dev-1"], created_by="tester")
    required = {k for k in get_type_hints(model.Job) if k in model.Job.__required_keys__}
    assert required == set(job)
    back = {k: json.loads(json.dumps(v)) for k, v in job.items()}
    assert back == job
    assert type(back["state"]) is str and back["state"] == JobState.QUEUED
    assert type(back["kind"]) is str and back["kind"] == "noop"


def test_device_record_round_trip() -> None:
    from evc.devices import new_record

    dev = new_record({"name": "d1", "host": "10.0.0.1", "username": "pi"}, created_by="tester")
    assert set(model.Device.__required_keys__) == set(dev)
    back = json.loads(json.dumps(dev))
    assert back == dev and back["state"] == DeviceState.PENDING


@pytest.mark.parametrize("record", [model.Job, model.Device, model.Cluster, model.Token, model.Enrollment])
def test_records_name_their_fields(record: type[Any]) -> None:
    assert "id" in record.__required_keys__
    assert get_type_hints(record)
