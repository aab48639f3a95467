"""Deployments: a model version (or variant) onto a cluster or devices, served by EVC's edge
inference server (runtime ``process``: a supervised user-space program). Creating and removing
one are jobs (``deploy``, ``deploy-remove``); the job's ``params.deployment`` is its id."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_store, require
from evc.api.schemas import JobSchema, PageArgs, PageSchema, StrictSchema, one_of, page, validate_name
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from evc.deployments import rollout, service
from evc.model import Scope

blp = Blueprint(
    "deployments", __name__, url_prefix="/api/v1",
    description="Deployments: models served on devices by EVC's edge inference server",
)  # fmt: skip


class DeploymentCreateSchema(StrictSchema):
    openapi_extra = one_of("cluster", "devices")

    model = fields.String(required=True, validate=validate_name, metadata={"description": "the model's name"})
    version = fields.String(required=True, validate=validate_name)
    variant = fields.String(load_default=None, validate=validate.Length(min=1, max=32))
    cluster = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=64),
        metadata={"description": "every member of this cluster"},
    )
    devices = fields.List(fields.String(), load_default=None, validate=validate.Length(min=1, max=10_000))
    runtime = fields.String(
        load_default="process",
        metadata={"description": "process (container: later)", "openapi": {"enum": list(service.RUNTIMES)}},
    )
    port = fields.Integer(load_default=service.DEFAULT_PORT, validate=validate.Range(min=1, max=65535))
    ports = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(validate=validate.Range(min=1, max=65535)),
        load_default=None,
        metadata={"description": "per-device ports (device id -> port) where devices share an address"},
    )
    python = fields.String(
        load_default=None,
        metadata={"description": "the device's Python (numpy + onnxruntime); default the cluster's FL python"},
    )

    @validates_schema
    def _one_target(self, data: dict[str, Any], **kw: Any) -> None:
        if bool(data.get("cluster")) == bool(data.get("devices")):
            raise ValidationError("give a cluster or devices (one of them)", field_name="cluster")


class DeploymentUpdateSchema(StrictSchema):
    version = fields.String(required=True, validate=validate_name, metadata={"description": "the version to roll out"})
    variant = fields.String(load_default=None, validate=validate.Length(min=1, max=32))
    max_unavailable = fields.Integer(
        load_default=1, validate=validate.Range(min=1), metadata={"description": "devices switched at a time"}
    )


class DeploymentRollbackSchema(StrictSchema):
    max_unavailable = fields.Integer(
        load_default=None, validate=validate.Range(min=1), metadata={"description": "default: the deployment's"}
    )


class DeploymentTargetSchema(Schema):
    device = fields.String()
    state = fields.String(
        metadata={"description": "pending, running, updating, rolled-back (back on its previous version after "
                  "failing a rollout's gate: see reason), failed or removed"}
    )  # fmt: skip
    reason = fields.String(allow_none=True)
    version = fields.String()
    sha256 = fields.String()
    endpoint = fields.String(metadata={"description": "host:port of the device's edge server"})
    updated_at = fields.Float()


class DeploymentSchema(Schema):
    id = fields.String()
    model = fields.String()
    version = fields.String()
    variant = fields.String(allow_none=True)
    served_version = fields.String()
    sha256 = fields.String()
    runtime = fields.String()
    port = fields.Integer()
    ports = fields.Dict(keys=fields.String(), values=fields.Integer())
    python = fields.String()
    cluster = fields.String(allow_none=True)
    devices = fields.List(fields.String())
    state = fields.String(metadata={"description": "deploying, running, partial, failed or removing"})
    job = fields.String(allow_none=True)
    remove_job = fields.String(allow_none=True)
    previous = fields.Dict(allow_none=True, metadata={"description": "the version a rollback returns to"})
    max_unavailable = fields.Integer(metadata={"description": "a rollout's devices switched at a time"})
    rollout = fields.Dict(allow_none=True, metadata={"description": "the last rollout: from, to, state, failed"})
    targets = fields.List(fields.Nested(DeploymentTargetSchema))
    created_by = fields.String()
    created_at = fields.Float()
    updated_at = fields.Float()


class DeploymentPageSchema(PageSchema):
    items = fields.List(fields.Nested(DeploymentSchema))


@blp.route("/deployments", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(DeploymentCreateSchema)
@blp.response(202, JobSchema)
def create(data: dict[str, Any]) -> Any:
    """Deploy a model version (or variant): a `deploy` job ships the edge server and the model
    (digest-verified on the device), starts the server and health-gates it on every device."""
    job, _ = service.submit(context(idempotent=True), data)
    return job


@blp.route("/deployments", methods=["GET"])
@require(Scope.READ)
@blp.arguments(PageArgs, location="query")
@blp.response(200, DeploymentPageSchema)
def list_deployments(args: dict[str, Any]) -> Any:
    items, total = service.list_deployments(get_store(), args["offset"], args["limit"])
    return page(items, total, args)


@blp.route("/deployments/<id:deployment_id>", methods=["GET"])
@require(Scope.READ)
@blp.response(200, DeploymentSchema)
def show(deployment_id: str) -> Any:
    """A deployment with each device's state, version and endpoint."""
    return service.view(get_store(), deployment_id)


@blp.route("/deployments/<id:deployment_id>", methods=["DELETE"])
@require(Scope.ADMIN)
@blp.response(202, JobSchema)
def delete(deployment_id: str) -> Any:
    """Remove a deployment: a `deploy-remove` job stops the servers and removes their folders."""
    return service.remove(context(idempotent=True), deployment_id)


@blp.route("/deployments/<id:deployment_id>", methods=["PATCH"])
@require(Scope.ADMIN)
@blp.arguments(DeploymentUpdateSchema)
@blp.response(202, JobSchema)
def update(data: dict[str, Any], deployment_id: str) -> Any:
    """Roll a deployment out to another version (or variant) in place: a `deploy` job switches at
    most `max_unavailable` devices at a time, each health-gated; a device failing its gate goes
    back to its previous version and the rollout stops there."""
    return rollout.update(context(idempotent=True), deployment_id, data)


@blp.route("/deployments/<id:deployment_id>/rollback", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(DeploymentRollbackSchema)
@blp.response(202, JobSchema)
def rollback(data: dict[str, Any], deployment_id: str) -> Any:
    """Return every device of a deployment to its previous version (a `deploy` job, as a rollout)."""
    return rollout.rollback(context(idempotent=True), deployment_id, data.get("max_unavailable"))
