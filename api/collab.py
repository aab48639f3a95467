"""Collaborative inference (edge → cloud): labelled data sets for it, and its two jobs —
``infer-joint`` (a cascade: the edge's light model, hard examples to a strong cloud model) and
``infer-split`` (a model cut between the device and the cloud at the cut EVC picks)."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_settings, require
from evc.api.schemas import JobSchema, StrictSchema, validate_name
from flask import g, request
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from evc.errors import ValidationError as InvalidInput
from evc.inference import cascade, joint, split
from evc.model import Scope
from evc.models import registry

blp = Blueprint(
    "collab", __name__, url_prefix="/api/v1",
    description="Collaborative inference: joint (cascade) edge → cloud, and split computing",
)  # fmt: skip

DIGEST = validate.Regexp(r"^[0-9a-f]{64}$", error="a SHA-256 digest (hex) of a stored data set")
ENDPOINT = validate.Regexp(r"^[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}$", error="host:port")


@blp.before_request
def _upload_limit() -> None:
    if request.method == "POST" and request.path.endswith("/datasets"):
        limit = get_settings().model_max_upload_bytes
        request.max_content_length = limit + 1024 * 1024
        g.evc_body_limit = f"the data set is larger than the limit of {limit} bytes (setting model_max_upload_bytes)"


class EvalSetForm(StrictSchema):
    file = fields.Raw(required=True, metadata={"type": "string", "format": "binary", "description": ".npz: X, y"})


class EvalSetDigestSchema(Schema):
    sha256 = fields.String()


_BOTH = {"model": {"type": "string"}, "version": {"type": "string"}}


class CloudSchema(StrictSchema):
    # a registry version (model and version), or a deployment: as the validator below says
    openapi_extra = {
        "oneOf": [
            {"required": ["model", "version"], "properties": {**_BOTH, "deployment": {"type": "null"}}},
            {
                "required": ["deployment"],
                "properties": {"deployment": {"type": "string", "minLength": 1}},
                "not": {"required": ["model", "version"], "properties": _BOTH},
            },
        ]
    }

    model = fields.String(load_default=None, validate=validate_name, metadata={"description": "in the registry"})
    version = fields.String(load_default=None, validate=validate_name)
    deployment = fields.String(load_default=None, metadata={"description": "or: a device's running deployment"})
    device = fields.String(load_default=None, metadata={"description": "that deployment's device (default: first)"})

    @validates_schema
    def _one(self, data: dict[str, Any], **kw: Any) -> None:
        if bool(data.get("deployment")) == bool(data.get("model") and data.get("version")):
            raise ValidationError("give model and version (the worker runs it), or a deployment", field_name="model")


class EdgeArgs(StrictSchema):
    deployment = fields.String(required=True, metadata={"description": "a running deployment (the edge tier)"})
    device = fields.String(
        load_default=None, metadata={"description": "its device to use (default: the first running)"}
    )
    endpoint = fields.String(
        load_default=None, validate=ENDPOINT,
        metadata={"description": "host:port to reach the device's edge server through (a gateway, a link); "
                  "default its own endpoint"},
    )  # fmt: skip
    batch = fields.Integer(load_default=None, validate=validate.Range(min=1, max=4096))


class JointSchema(EdgeArgs):
    cloud = fields.Nested(
        CloudSchema, required=True,
        metadata={"description": "the strong model: a registry version run in the worker, or a designated device's "
                  "running deployment"},
    )  # fmt: skip
    data = fields.String(required=True, validate=DIGEST, metadata={"description": "the labelled data set to run"})
    calibration = fields.String(load_default=None, validate=DIGEST, metadata={"description": "labelled, for tuning"})
    score = fields.String(load_default="max-prob", validate=validate.OneOf(sorted(cascade.SCORES)))
    threshold = fields.Float(load_default=None, metadata={"description": "offload items whose score is below it"})
    target_accuracy = fields.Float(load_default=None, validate=validate.Range(min=0, max=1))
    target_offload = fields.Float(load_default=None, validate=validate.Range(min=0, max=1))


class SplitSchema(EdgeArgs):
    data = fields.String(load_default=None, validate=DIGEST, metadata={"description": "a labelled set to run"})
    cut = fields.Integer(load_default=None, validate=validate.Range(min=0), metadata={"description": "force a cut"})
    measure_all = fields.Boolean(load_default=False, metadata={"description": "measure every cut end to end"})
    rounds = fields.Integer(load_default=None, validate=validate.Range(min=3, max=200))


@blp.route("/eval-sets", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(EvalSetForm, location="files")
@blp.response(201, EvalSetDigestSchema)
def upload_dataset(files: dict[str, Any]) -> Any:
    """Store a labelled evaluation set (an `.npz` holding X and y): its digest, which quantization,
    joint and split jobs name (`GET /eval-sets` lists them)."""
    if files.get("file") is None:
        raise InvalidInput("no file", field="file")
    return {"sha256": registry.store_eval_set(context(), files["file"].stream)}


@blp.route("/inference/joint", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(JointSchema)
@blp.response(202, JobSchema)
def create_joint(data: dict[str, Any]) -> Any:
    """A joint (cascade) job: the deployment's light model on the device, items whose confidence
    is below the threshold (given, or tuned on `calibration` for a target) to the cloud model;
    reports accuracy, offload, bytes and latency against edge-only and cloud-only."""
    return joint.submit(context(idempotent=True), data)


@blp.route("/inference/split", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(SplitSchema)
@blp.response(202, JobSchema)
def create_split(data: dict[str, Any]) -> Any:
    """A split-computing job: the deployment's model cut at the single-tensor cut EVC picks from
    measured device, cloud and link times (the table of candidates says why)."""
    return split.submit(context(idempotent=True), data)
