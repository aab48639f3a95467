"""Provisioning over HTTP: the playbook catalog, provision jobs, relaunch on failed hosts."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_settings, require
from evc.api.schemas import JobSchema, Labels, StrictSchema, one_of
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from evc import jobs
from evc.choices import LOCK_MODES
from evc.model import Scope
from evc.provisioning.catalog import NAME, Catalog
from evc.provisioning.service import (
    MAX_RETRIES,
    RETRYABLE,
    ProvisionRequest,
    retry_job,
    submit_provision,
)

blp = Blueprint(
    "provision",
    __name__,
    url_prefix="/api/v1",
    description="Ansible playbooks run on devices as jobs",
)


class PlaybookSchema(Schema):
    name = fields.String()
    description = fields.String()
    min_privilege = fields.String(metadata={"description": "user, sudo or root"})
    params = fields.Dict(metadata={"description": "JSON-Schema of the playbook's extra_vars"})
    source = fields.String(metadata={"description": "builtin or operator"})
    tags = fields.List(fields.String())
    check_mode = fields.Boolean()


class PlaybookListSchema(Schema):
    items = fields.List(fields.Nested(PlaybookSchema))


class SelectorSchema(StrictSchema):
    labels = Labels(load_default=dict)
    cluster = fields.String(validate=validate.Length(min=1, max=64))


class RetryPolicySchema(StrictSchema):
    max = fields.Integer(load_default=1, validate=validate.Range(min=0, max=MAX_RETRIES))
    on = fields.List(fields.String(validate=validate.OneOf(RETRYABLE)), load_default=lambda: list(RETRYABLE))
    delay_s = fields.Float(load_default=5.0, validate=validate.Range(min=0, max=600))


class RunOptionsSchema(StrictSchema):
    playbook = fields.String(required=True, validate=validate.Regexp(NAME, error="a playbook name, not a path"))
    extra_vars = fields.Dict(
        keys=fields.String(),
        load_default=dict,
        metadata={"description": "validated against the playbook's params schema"},
    )
    check = fields.Boolean(load_default=False, metadata={"description": "dry run with diff: report drift"})
    forks = fields.Integer(validate=validate.Range(min=1, max=500), load_default=None)
    lock = fields.String(
        load_default="wait",
        validate=validate.OneOf(LOCK_MODES),
        metadata={"description": "a device locked by another job: wait behind it, or 409"},
    )
    lock_timeout_s = fields.Float(load_default=300.0, validate=validate.Range(min=1, max=86400))
    retry = fields.Nested(
        RetryPolicySchema,
        load_default=None,
        allow_none=True,
        metadata={"description": "re-run failed/unreachable hosts automatically"},
    )


class ProvisionSchema(RunOptionsSchema):
    openapi_extra = one_of("targets", "selector")

    targets = fields.List(
        fields.String(validate=validate.Length(min=1, max=64)),
        validate=validate.Length(min=1, max=10_000),
    )
    selector = fields.Nested(SelectorSchema)

    @validates_schema
    def one_kind_of_target(self, data: dict[str, Any], **kw: Any) -> None:
        if bool(data.get("targets")) == bool(data.get("selector")):
            raise ValidationError("give targets (device ids) or a selector, exactly one", "targets")


class RetrySchema(StrictSchema):
    on = fields.List(fields.String(validate=validate.OneOf(RETRYABLE)), load_default=lambda: list(RETRYABLE))


def _submit(data: dict[str, Any]) -> Any:
    req = ProvisionRequest.from_dict(data)
    ctx = context(idempotent=True)
    job, _ = submit_provision(ctx, req)
    return jobs.public(job, ctx.store)


@blp.route("/playbooks", methods=["GET"])
@require(Scope.READ)
@blp.response(200, PlaybookListSchema)
def playbooks() -> Any:
    """The playbook catalog: EVC's playbooks and the operator's, with their parameter schemas."""
    return {"items": [s.public() for s in Catalog.from_settings(get_settings()).list()]}


@blp.route(
    "/playbooks/<name>",
    methods=["GET"],
    parameters=[{"in": "path", "name": "name", "schema": {"type": "string", "pattern": NAME.pattern}}],
)
@require(Scope.READ)
@blp.response(200, PlaybookSchema)
def playbook(name: str) -> Any:
    """One playbook of the catalog."""
    return Catalog.from_settings(get_settings()).get(name).public()


@blp.route("/provision", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(ProvisionSchema)
@blp.response(202, JobSchema)
def provision(data: dict[str, Any]) -> Any:
    """Run a playbook on devices (ids or a label/cluster selector) as a job.

    Refused up front: an unknown playbook (404) or invalid extra_vars (422); a device no
    target can run the playbook on (409, with each device's reason); `lock: fail` and a device
    locked by another job (409). Devices refused for their privilege level or state are
    reported in the job's per-target results."""
    return _submit(data)


@blp.route("/devices/<id:device_id>/provision", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(RunOptionsSchema)
@blp.response(202, JobSchema)
def provision_device(data: dict[str, Any], device_id: str) -> Any:
    """Run a playbook on one device as a job."""
    return _submit({**data, "targets": [device_id]})


@blp.route("/jobs/<id:job_id>/retry", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(RetrySchema, required=False)
@blp.response(202, JobSchema)
def retry(data: dict[str, Any] | None, job_id: str) -> Any:
    """Relaunch a finished provision job on its failed and unreachable hosts only (409 when
    there are none)."""
    on = (data or {}).get("on") or list(RETRYABLE)
    ctx = context(idempotent=True)
    job, _ = retry_job(ctx, job_id, on=on)
    return jobs.public(job, ctx.store)
