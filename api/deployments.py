"""Deployments: a model version (or variant) onto a cluster or devices, served by EVC's edge
inference server (runtime ``process``: a supervised user-space program). Creating and removing
one are jobs (``deploy``, ``deploy-remove``); the job's ``params.deployment`` is its id."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_store, require
from evc.api.provision import SelectorSchema
from evc.api.schemas import JobSchema, PageArgs, PageSchema, StrictSchema, one_of, page, validate_name
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from evc.deployments import converge, rollout, service
from evc.model import Scope

blp = Blueprint(
    "deployments", __name__, url_prefix="/api/v1",
    description="Deployments: models served on devices by EVC's edge inference server",
)  # fmt: skip


class DeploymentCreateSchema(StrictSchema):
    openapi_extra = one_of("cluster", "devices", "selector")

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
        validate=validate.OneOf(service.RUNTIMES),
        metadata={"description": "process (a supervised user-space server) or container (podman or docker)"},
    )
    image = fields.String(
        load_default=None,
        validate=validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$"),
        metadata={"description": "runtime container: the edge server's image (default: the edge_image setting)"},
    )
    port = fields.Integer(load_default=service.DEFAULT_PORT, validate=validate.Range(min=1, max=65535))
    ports = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(validate=validate.Range(min=1, max=65535)),
        load_default=None,
        metadata={"description": "per-device ports (device id -> port) where devices share an address"},
    )
    selector = fields.Nested(
        SelectorSchema,
        load_default=None,
        metadata={"description": "devices by labels and/or cluster, re-resolved when devices join, leave or are "
                  "relabelled"},
    )  # fmt: skip
    python = fields.String(
        load_default=None,
        metadata={"description": "the device's Python (numpy + onnxruntime); default the cluster's FL python"},
    )
    ensure_level = fields.Boolean(
        load_default=True,
        metadata={"description": "devices below the level the runtime needs (process: L1 unless python is given) "
                  "get their cluster's level raised first (a level job the deploy job waits for); false: 409"},
    )  # fmt: skip
    threads = fields.Integer(
        load_default=0, validate=validate.Range(min=0, max=256),
        metadata={"description": "ONNX Runtime intra-op threads per model on the devices (0: its default)"},
    )  # fmt: skip

    @validates_schema
    def _one_target(self, data: dict[str, Any], **kw: Any) -> None:
        if sum(bool(data.get(k)) for k in ("cluster", "devices", "selector")) != 1:
            raise ValidationError("give a cluster, devices or a selector (one of them)", field_name="cluster")


class DeploymentUpdateSchema(StrictSchema):
    version = fields.String(required=True, validate=validate_name, metadata={"description": "the version to roll out"})
    variant = fields.String(load_default=None, validate=validate.Length(min=1, max=32))
    max_unavailable = fields.Integer(
        load_default=1, validate=validate.Range(min=1), metadata={"description": "devices switched at a time"}
    )
    failure_budget = fields.Float(
        load_default=None,
        validate=validate.Range(min=0),
        metadata={"description": "devices that may fail their gate (each goes back) before the rollout stops and "
                  "every device it updated goes back: a count, or a fraction of the devices (0 < x < 1); "
                  "unset: stop at the first failure, the updated devices stay updated"},
    )  # fmt: skip


class DeploymentRollbackSchema(StrictSchema):
    max_unavailable = fields.Integer(
        load_default=None, validate=validate.Range(min=1), metadata={"description": "default: the deployment's"}
    )


class DeploymentTargetSchema(Schema):
    device = fields.String()
    state = fields.String(
        metadata={"description": "pending, running, updating, rolled-back (back on its previous version after "
                  "failing a rollout's gate: see reason), unreachable (lost by the health checks; re-converged "
                  "when it comes back), failed or removed"}
    )  # fmt: skip
    reason = fields.String(allow_none=True)
    version = fields.String()
    sha256 = fields.String()
    endpoint = fields.String(metadata={"description": "host:port of the device's edge server"})
    shipped = fields.Boolean(metadata={"description": "the last job sent the model (false: its digest matched)"})
    restarted = fields.Boolean(metadata={"description": "a re-convergence (re)started the server"})
    switch = fields.String(
        metadata={"description": "how a rollout switched it: reload (SIGHUP, no restart: it answered throughout) "
                  "or restart"}
    )  # fmt: skip
    runtime = fields.String(metadata={"description": "runtime container: podman or docker"})
    container = fields.String(metadata={"description": "runtime container: the container's name"})
    image_id = fields.String(metadata={"description": "runtime container: the id of the image it runs"})
    delivery = fields.String(metadata={"description": "runtime container: how the image came (present, pull, ship)"})
    image_shipped = fields.Dict(
        metadata={"description": "runtime container, delivery ship: sent_bytes, image_bytes, layers_sent, "
                  "layers_reused (only the layers the device lacked are sent), full_retry"}
    )  # fmt: skip
    on_boot = fields.String(
        metadata={"description": "what starts the server when the device boots (podman-restart.service for a "
                  "container, evc-infer-<deployment>.service for a process), or 'none: <why>' (the health "
                  "sweep restarts it then)"}
    )  # fmt: skip
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
    threads = fields.Integer(metadata={"description": "ONNX Runtime intra-op threads per model (0: its default)"})
    image = fields.String(allow_none=True, metadata={"description": "runtime container: the edge image"})
    image_id = fields.String(allow_none=True)
    cluster = fields.String(allow_none=True)
    selector = fields.Dict(allow_none=True, metadata={"description": "labels and/or cluster the devices match"})
    devices = fields.List(fields.String())
    level_jobs = fields.List(fields.String(), allow_none=True, metadata={"description": "level jobs it waited for"})
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


class JobListSchema(Schema):
    items = fields.List(fields.Nested(JobSchema))


@blp.route("/deployments/<id:deployment_id>/converge", methods=["POST"])
@require(Scope.ADMIN)
@blp.response(202, JobListSchema)
def reconverge(deployment_id: str) -> Any:
    """Re-resolve the deployment's targets (cluster members, selector) and converge it: a `deploy`
    job makes every device serve its version, doing only what is missing (nothing shipped where
    the digest matches, a running healthy server left alone); devices that left are cleaned up
    (a `deploy-remove` job)."""
    return {"items": converge.reconcile(context(), deployment_id)}
