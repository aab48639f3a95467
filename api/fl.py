"""Federated learning over HTTP: submit, show (per-round metrics), stop, resume, download a
model, export it to the model registry (ONNX); install the FL client on devices; partition a dataset onto them."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_sender, get_settings, get_store, require, unit_of_work
from evc.api.models import VersionSchema
from evc.api.schemas import JobListArgs, JobPageSchema, JobSchema, StrictSchema, one_of, page, validate_name
from flask import Response
from flask_smorest import Blueprint
from marshmallow import ValidationError as SchemaError
from marshmallow import fields, validate, validates_schema

from evc.choices import PARTITIONS
from evc.fl import export as fl_export
from evc.fl import service
from evc.fl.strategy import STRATEGIES
from evc.model import JobKindName, Scope
from evc.models import registry
from evc.queue import JobQueue

blp = Blueprint("fl", __name__, url_prefix="/api/v1/fl", description="Federated learning")

ID = validate.Length(min=1, max=64)


class DataSpecSchema(StrictSchema):
    path = fields.String(validate=validate.Length(min=1, max=500), metadata={
        "description": "shard path on each device (.npz with X and y); may use {job}, {device}, "
                       "{name} and {index}, e.g. ~/.evc/fl/data/digits/shard.npz"})  # fmt: skip
    paths = fields.Dict(keys=fields.String(validate=ID), values=fields.String(validate=validate.Length(max=500)),
                        metadata={"description": "per-device shard paths, by device id"})  # fmt: skip


class Targets(StrictSchema):
    openapi_extra = one_of("devices", "cluster")

    devices = fields.List(fields.String(validate=ID), validate=validate.Length(min=1, max=10_000))
    cluster = fields.String(validate=ID)

    @validates_schema
    def one_target(self, data: dict[str, Any], **_: Any) -> None:
        if bool(data.get("devices")) == bool(data.get("cluster")):
            raise SchemaError("give either devices or cluster")


class FLJobCreateSchema(Targets):
    model = fields.String(
        load_default="softmax",
        validate=validate.Length(max=300),
        metadata={"description": "softmax, mlp[:<hidden>], cnn[:<channels>], plugin:<name> or module:<path>.py"},
    )
    data = fields.Nested(DataSpecSchema, required=True)
    rounds = fields.Integer(load_default=10, validate=validate.Range(min=1, max=100_000))
    strategy = fields.String(load_default="fedavg", validate=validate.OneOf(list(STRATEGIES)))
    strategy_params = fields.Dict(
        keys=fields.String(validate=validate.Length(max=64)),
        load_default=dict,
        metadata={"description": 'e.g. {"mu": 0.01} (fedprox), {"eta": 0.1} (fedadam)'},
    )
    fraction_fit = fields.Float(validate=validate.Range(min=0, max=1, min_inclusive=False))
    min_fit_clients = fields.Integer(validate=validate.Range(min=1))
    min_available_clients = fields.Integer(validate=validate.Range(min=1))
    round_timeout = fields.Float(load_default=60.0, validate=validate.Range(min=0, min_inclusive=False))
    local_epochs = fields.Integer(validate=validate.Range(min=1, max=1000))
    lr = fields.Float(validate=validate.Range(min=0, min_inclusive=False))
    batch_size = fields.Integer(validate=validate.Range(min=1))
    seed = fields.Integer(allow_none=True, validate=validate.Range(min=0))
    python = fields.String(
        load_default=None, allow_none=True,
        metadata={"description": "the Python on the devices (default: the cluster's, L1's environment; else python3)"},
    )  # fmt: skip
    test_set = fields.String(
        allow_none=True,
        load_default=None,
        metadata={"description": "server-side test set (from `partition`, or digits)"},
    )
    queue = fields.String(
        load_default="fl", metadata={"description": "Celery queue of the round tasks: fl or fl-<name>"}
    )
    n_features = fields.Integer(allow_none=True, validate=validate.Range(min=1))
    n_classes = fields.Integer(allow_none=True, validate=validate.Range(min=2))
    export = fields.Nested(
        lambda: ExportTarget(), allow_none=True, load_default=None,
        metadata={"description": "when the job succeeds, register its global model as this model version (ONNX)"},
    )  # fmt: skip


class ExportTarget(StrictSchema):
    name = fields.String(required=True, validate=validate_name)
    version = fields.String(required=True, validate=validate_name)


class FLJobSchema(JobSchema):
    fl = fields.Dict(
        metadata={
            "description": "phase, current round, and one record per closed round: participants, "
            "failures, late results, train loss, eval accuracy/loss, duration"
        }
    )


class ModelArgs(StrictSchema):
    round = fields.Integer(validate=validate.Range(min=0), metadata={"description": "default: the latest"})


class InstallSchema(Targets):
    python = fields.String(
        load_default=None, allow_none=True,
        metadata={"description": "the Python on the devices, with numpy (default: the cluster's; else python3)"},
    )  # fmt: skip


class PartitionSchema(Targets):
    name = fields.String(load_default="digits", metadata={"description": "dataset name: shard directory and test set"})
    partition = fields.String(load_default="iid", validate=validate.OneOf(PARTITIONS))
    alpha = fields.Float(load_default=0.5, validate=validate.Range(min=0, min_inclusive=False))
    seed = fields.Integer(load_default=42, validate=validate.Range(min=0))
    path = fields.String(load_default=service.DEFAULT_SHARD_PATH, validate=validate.Length(max=500))


class FLJobListArgs(JobListArgs):
    class Meta:
        exclude = ("kind",)


@blp.route("/jobs", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(FLJobCreateSchema)
@blp.response(202, JobSchema)
def submit(data: dict[str, Any]) -> Any:
    """Start a federated learning job on devices or a cluster's members (kind `fl`)."""
    return service.submit(context(idempotent=True), data, pipe=unit_of_work())


@blp.route("/jobs", methods=["GET"])
@require(Scope.READ)
@blp.arguments(FLJobListArgs, location="query")
@blp.response(200, JobPageSchema)
def list_jobs(args: dict[str, Any]) -> Any:
    """FL jobs, newest first."""
    items, total = get_store().list_jobs(
        args["offset"], args["limit"], kind="fl", state=args.get("state"), target=args.get("target")
    )
    return page(items, total, args)


@blp.route("/jobs/<id:job_id>", methods=["GET"])
@require(Scope.READ)
@blp.response(200, FLJobSchema)
def show(job_id: str) -> Any:
    """An FL job with its per-round metrics."""
    return service.view(get_store(), job_id)


@blp.route("/jobs/<id:job_id>/stop", methods=["POST"])
@require(Scope.ADMIN)
@blp.response(202, JobSchema)
def stop(job_id: str) -> Any:
    """Stop at the next round boundary (a round cut short is discarded; resume restarts it)."""
    return service.stop(get_store(), job_id, revoke=JobQueue.of(get_sender()).revoke)


@blp.route("/jobs/<id:job_id>/resume", methods=["POST"])
@require(Scope.ADMIN)
@blp.response(202, JobSchema)
def resume(job_id: str) -> Any:
    """Resume a stopped or failed job from its last checkpoint (on a running job: re-dispatch
    work lost with a stopped worker)."""
    return service.resume(get_store(), get_sender(), job_id)


@blp.route("/jobs/<id:job_id>/model", methods=["GET"])
@require(Scope.READ)
@blp.arguments(ModelArgs, location="query")
@blp.doc(
    responses={
        "200": {
            "description": "the global model: .npz with arr_0, arr_1, ... in parameter order",
            "content": {"application/octet-stream": {}},
        }
    }
)
def model(args: dict[str, Any], job_id: str) -> Any:
    """Download the global model after a round (`.npz`)."""
    data, rnd = service.model_npz(get_settings(), get_store(), job_id, args.get("round"))
    return Response(
        data,
        mimetype="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-round-{rnd}.npz"', "X-EVC-Round": str(rnd)},
    )


class ExportSchema(StrictSchema):
    name = fields.String(
        required=True, validate=validate_name, metadata={"description": "the model's name in the registry"}
    )
    version = fields.String(required=True, validate=validate_name, metadata={"description": "the version to register"})
    round = fields.Integer(validate=validate.Range(min=1), metadata={"description": "default: the last round"})


@blp.route("/jobs/<id:job_id>/export", methods=["POST"])
@require(Scope.MODELS)
@blp.arguments(ExportSchema)
@blp.response(201, VersionSchema)
@blp.alt_response(200, schema=VersionSchema, description="this job's model was registered under that version before")
@blp.alt_response(
    409,
    description="the job has not succeeded; the name and version hold other bytes; a device-code model "
    "(module:, plugin:); or a graph whose accuracy is not the job's",
)
def export(data: dict[str, Any], job_id: str) -> Any:
    """Export a finished job's global model to ONNX (softmax, mlp, cnn) and register it in the
    model registry with the accuracy ONNX Runtime measures on the job's test set; then
    `POST /api/v1/deployments` serves it."""
    rec, created = fl_export.export(context(), job_id, data["name"], data["version"], data.get("round"))
    return registry.version_view(get_store(), rec), 201 if created else 200


@blp.route("/install", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(InstallSchema)
@blp.response(202, JobSchema)
def install(data: dict[str, Any]) -> Any:
    """Ship the FL client to devices and check their Python has numpy (kind `fl-install`)."""
    store = get_store()
    devices = service.resolve_devices(store, data.get("devices"), data.get("cluster"))
    python = service.device_python(store, data.get("python"), data.get("cluster"))
    job, _ = context(idempotent=True).submit(
        JobKindName.FL_INSTALL, params={"python": python}, targets=devices, pipe=unit_of_work()
    )
    return job


@blp.route("/partition", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(PartitionSchema)
@blp.response(202, JobSchema)
def partition(data: dict[str, Any]) -> Any:
    """Split the digits dataset into one shard per device (IID or label-Dirichlet) and push them
    over SFTP; the test split stays server-side as test set `name` (kind `fl-partition`)."""
    store = get_store()
    devices = service.resolve_devices(store, data.get("devices"), data.get("cluster"))
    params = service.check_partition_args(data)
    job, _ = context(idempotent=True).submit(
        JobKindName.FL_PARTITION, params=params, targets=devices, pipe=unit_of_work()
    )
    return job


__all__ = ["blp"]
