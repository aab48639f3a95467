"""Inference across a cluster: data sets, inference jobs (``kind`` dispatch, see
:mod:`evc.inference`) and their results, and one serving endpoint per deployment."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_settings, get_store, require
from evc.api.schemas import JobSchema, StrictSchema
from flask import Response, g, request
from flask_smorest import Blueprint, abort
from marshmallow import INCLUDE, Schema, ValidationError, fields, validate

from evc import inference, jobs
from evc.inference import datasets, routing
from evc.inference.oip import HEADER_LENGTH
from evc.inference.schedule import MODES
from evc.model import Scope
from evc.models.blobs import human_size

blp = Blueprint(
    "inference", __name__, url_prefix="/api/v1",
    description="Inference across a cluster: parallel jobs over a deployment's devices, one serving endpoint",
)  # fmt: skip

#: room for the multipart envelope next to the largest data set allowed
FORM_OVERHEAD = 1024 * 1024


@blp.before_request
def _body_limit() -> None:
    """Data set uploads and routed infer requests may exceed the API's 1 MiB (their settings)."""
    if request.method != "POST":
        return
    s = get_settings()
    if request.path.endswith("/inference/datasets"):
        limit, name = s.inference_dataset_max_bytes + FORM_OVERHEAD, "inference_dataset_max_bytes"
    elif request.path.endswith("/infer"):
        limit, name = s.inference_request_max_bytes, "inference_request_max_bytes"
    else:
        return
    request.max_content_length = limit
    g.evc_body_limit = f"the body is larger than the limit of {human_size(limit)} ({limit} bytes; setting {name})"


# ----------------------------------------------------------------------------- schemas
class DatasetForm(StrictSchema):
    name = fields.String(load_default="", validate=validate.Length(max=128))


class DatasetFileForm(StrictSchema):
    file = fields.Raw(
        required=True,
        metadata={"type": "string", "format": "binary", "description": ".npz with x (items) and optional y (labels)"},
    )


class DatasetSchema(Schema):
    id = fields.String()
    name = fields.String(allow_none=True)
    items = fields.Integer()
    shape = fields.List(fields.Integer(), metadata={"description": "an item's shape"})
    dtype = fields.String()
    labels = fields.Boolean()
    bytes = fields.Integer(allow_none=True)


class ChunkSchema(StrictSchema):
    target_s = fields.Float(validate=validate.Range(min=0.01, max=60), metadata={"description": "a chunk's time"})
    first_items = fields.Integer(validate=validate.Range(min=1, max=1_000_000))
    min_items = fields.Integer(validate=validate.Range(min=1, max=1_000_000))
    max_items = fields.Integer(validate=validate.Range(min=1, max=1_000_000))
    reissue = fields.Boolean(metadata={"description": "copy stragglers' chunks to idle devices"})
    max_copies = fields.Integer(validate=validate.Range(min=1, max=8))
    max_failures = fields.Integer(validate=validate.Range(min=1, max=100))


class InferenceJobSchema(Schema):
    """The kind; the rest is checked by the kind's own schema (:data:`JOB_SCHEMAS`)."""

    class Meta:
        unknown = INCLUDE

    kind = fields.String(required=True, metadata={"description": "parallel (collaborative kinds: their own)"})


class ParallelJobSchema(StrictSchema):
    kind = fields.String(required=True, validate=validate.OneOf(["parallel"]))
    deployment = fields.String(required=True, validate=validate.Length(min=1, max=64))
    dataset = fields.String(
        required=True, validate=validate.Length(min=1, max=64),
        metadata={"description": f"an uploaded data set's id, one of {list(datasets.NAMED)}, or fl-shards:<name> "
                  "(the FL shards an fl-partition job put on the devices)"},
    )  # fmt: skip
    repeat = fields.Integer(load_default=1, validate=validate.Range(min=1, max=datasets.MAX_REPEAT))
    mode = fields.String(
        load_default="dynamic",
        validate=validate.OneOf(MODES),
        metadata={"description": "dynamic (EVC's), or static: an even split (the baseline)"},
    )
    chunk = fields.Nested(ChunkSchema, load_default=dict)


#: kind -> the schema of its request body; a kind added to :data:`evc.inference.KINDS` adds its own
JOB_SCHEMAS: dict[str, type[Schema]] = {"parallel": ParallelJobSchema}


class ResultsArgs(Schema):
    format = fields.String(load_default="jsonl", validate=validate.OneOf(["jsonl", "npz"]))


# ----------------------------------------------------------------------------- data sets
@blp.route("/inference/datasets", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(DatasetForm, location="form")
@blp.arguments(DatasetFileForm, location="files")
@blp.response(201, DatasetSchema)
@blp.alt_response(413, description="the file is larger than the setting inference_dataset_max_bytes")
def upload_dataset(form: dict[str, Any], files: dict[str, Any]) -> Any:
    """Upload a data set for inference jobs: an `.npz` with `x` (items along the first axis)
    and optionally `y` (integer labels, for the accuracy)."""
    return datasets.store(get_settings(), files["file"].stream, form.get("name") or "")


@blp.route("/inference/datasets/<dataset>", methods=["GET"])
@require(Scope.READ)
@blp.response(200, DatasetSchema)
def show_dataset(dataset: str) -> Any:
    """An uploaded data set (by id) or a named one (digits, digits-train): items, item shape, labels."""
    return datasets.describe(get_settings(), dataset)


# ----------------------------------------------------------------------------- jobs
@blp.route("/inference/jobs", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(InferenceJobSchema)
@blp.doc(requestBody={"content": {"application/json": {"schema": {"oneOf": list(JOB_SCHEMAS.values())}}}})
@blp.response(202, JobSchema)
def create_job(data: dict[str, Any]) -> Any:
    """Start an inference job. `kind: parallel`: every item of `dataset` (`repeat` times) through
    the running devices of `deployment`, in chunks the devices pull (`mode`, `chunk`); the
    predictions come back in input order with the device and latency of each item."""
    schema = JOB_SCHEMAS.get(str(data.get("kind")))
    if schema is None:
        abort(422, messages={"json": {"kind": [f"must be one of {sorted(JOB_SCHEMAS)}"]}})
        raise AssertionError("unreachable")
    try:
        body = schema().load(data)
    except ValidationError as exc:
        abort(422, messages={"json": exc.messages})
    return inference.submit(context(idempotent=True), body)


@blp.route("/inference/jobs/<id:job_id>", methods=["GET"])
@require(Scope.READ)
@blp.response(200, JobSchema)
def show_job(job_id: str) -> Any:
    """An inference job (as `GET /jobs/{id}`): progress (items done, each device's rate), summary."""
    return jobs.public(jobs.get(get_store(), job_id), get_store(), with_results=False)


@blp.route("/inference/jobs/<id:job_id>/results", methods=["GET"])
@require(Scope.READ)
@blp.arguments(ResultsArgs, location="query")
def results(args: dict[str, Any], job_id: str) -> Any:
    """A finished parallel job's results, in input order: `format=jsonl` (a line per item: item,
    prediction, score, device, latency_ms, label) or `npz` (arrays output, prediction, score,
    device (an index into devices), latency_ms, label)."""
    jobs.get(get_store(), job_id)
    if args["format"] == "npz":
        path = datasets.results_file(get_settings(), job_id)
        resp = Response(path.read_bytes(), mimetype="application/octet-stream")
        resp.headers["Content-Disposition"] = f'attachment; filename="{job_id}.npz"'
        return resp
    rows = datasets.jsonl(datasets.load_results(get_settings(), job_id))
    return Response(rows, mimetype="application/x-ndjson")


# ----------------------------------------------------------------------------- serving
_INFER_BODY = {
    "application/json": {"schema": {"type": "object"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}


@blp.route("/deployments/<id:deployment_id>/infer", methods=["POST"])
@require(Scope.READ)
@blp.doc(requestBody={"content": _INFER_BODY})
def infer(deployment_id: str) -> Any:
    """One Open Inference Protocol infer request (JSON, or binary tensors with
    `Inference-Header-Content-Length`) for the deployment's model, sent to its least-loaded
    running device (in progress x recent latency), retried on another one when a device fails
    or answers 5xx. The device's answer comes back as it is, with `X-EVC-Device` and
    `X-EVC-Tries`. Not audited (a serving path)."""
    g.evc_no_audit = True
    answer = routing.forward(get_store(), get_settings(), deployment_id, request.get_data(), dict(request.headers))
    resp = Response(answer.body, status=answer.status, mimetype=answer.headers.get("content-type", "application/json"))
    hl = answer.headers.get(HEADER_LENGTH.lower())
    if hl:
        resp.headers[HEADER_LENGTH] = hl
    resp.headers["X-EVC-Device"] = answer.device
    resp.headers["X-EVC-Tries"] = str(answer.tries)
    return resp
