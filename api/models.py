"""The model registry (EVF's integration point): models, versions, variants, EVC's int8
quantization, and the hardware view of a cluster.

Uploads are ``multipart/form-data``: the file in ``file``, the JSON metadata in ``metadata``.
A version may instead be registered by reference to an OCI artifact: ``oci_ref`` in the
metadata and no file, or a JSON body ``{"name", "version", "oci_ref", ...}``.
A token with the ``models`` scope (an EVF service account) may push versions and variants and
read models and clusters' hardware; deleting and quantizing take ``admin``."""

from __future__ import annotations

import base64
import json
from typing import Any

from evc.api.deps import context, get_settings, get_store, require, require_any
from evc.api.schemas import (
    LABEL_FILTER_OPENAPI,
    JobSchema,
    Labels,
    PageArgs,
    PageSchema,
    StrictSchema,
    page,
    validate_name,
)
from flask import Response, g, request, stream_with_context
from flask_smorest import Blueprint, abort
from marshmallow import Schema, ValidationError, fields, validate

from evc.errors import ValidationError as InvalidInput
from evc.model import JobKindName, Scope
from evc.models import hardware, registry
from evc.models.blobs import CHUNK, human_size

blp = Blueprint(
    "models",
    __name__,
    url_prefix="/api/v1",
    description="Model registry, the EVF integration point: versions, variants, quantization, hardware",
)

#: room for the multipart envelope and the metadata next to the largest file allowed
FORM_OVERHEAD = 1024 * 1024
READERS = (Scope.READ, Scope.MODELS)


@blp.before_request
def _upload_limit() -> None:
    """Uploads may be as large as the setting ``model_max_upload_bytes`` (not the API's 1 MiB)."""
    if request.method == "POST":
        limit = get_settings().model_max_upload_bytes
        request.max_content_length = limit + FORM_OVERHEAD
        g.evc_body_limit = (
            f"the upload is larger than the limit of {human_size(limit)} "
            f"({limit} bytes; setting model_max_upload_bytes)"
        )


# ----------------------------------------------------------------------------- schemas
class JSONObject(fields.Field):
    """A form field holding a JSON object, loaded with *schema* (errors nest under the field)."""

    def __init__(self, schema: type[Schema], **kw: Any) -> None:
        kw.setdefault("metadata", {}).setdefault("description", f"a JSON object: {schema.__name__}")
        super().__init__(**kw)
        self.schema = schema

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kw: Any) -> Any:
        if isinstance(value, bytes | str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValidationError(f"must be a JSON object ({exc})") from exc
        if not isinstance(value, dict):
            raise ValidationError("must be a JSON object")
        return self.schema().load(value)


class AccuracySchema(StrictSchema):
    dataset = fields.String(required=True, validate=validate.Length(min=1, max=128))
    value = fields.Float(required=True, validate=validate.Range(min=0), allow_nan=False)


class _UploaderMeta(StrictSchema):
    task = fields.String(validate=validate.Length(min=1, max=64), metadata={"description": "e.g. classification"})
    labels = Labels()
    accuracy = fields.Nested(AccuracySchema)
    license = fields.String(validate=validate.Length(min=1, max=128))
    format = fields.String(
        load_default="onnx",
        validate=validate.Regexp(registry.FORMAT_RE, error="1-32 lower-case letters, digits, '.', '_', '+' or '-'"),
        metadata={"description": "onnx (read for its metadata) or another format (stored as is)"},
    )
    description = fields.String(validate=validate.Length(max=2000))


class VersionMetaSchema(_UploaderMeta):
    name = fields.String(required=True, validate=validate_name)
    version = fields.String(required=True, validate=validate_name)
    oci_ref = fields.String(
        validate=validate.Length(min=3, max=512),
        metadata={"description": "register by reference: host[:port]/repository:tag or ...@sha256:<hex> (no file)"},
    )


class VariantMetaSchema(_UploaderMeta):
    variant = fields.String(
        required=True,
        validate=validate.Regexp(registry.VARIANT_RE, error="1-32 lower-case letters, digits, '.', '_' or '-'"),
        metadata={"description": "fp32, int8, ..."},
    )


def _file_field(required: bool = True) -> fields.Raw:
    return fields.Raw(required=required, metadata={"type": "string", "format": "binary"})


class VersionForm(StrictSchema):
    metadata = JSONObject(VersionMetaSchema, metadata={"description": "required unless the body is JSON"})


class VariantForm(StrictSchema):
    metadata = JSONObject(VariantMetaSchema, required=True)


def _multipart_doc(meta: type[Schema], *, file_required: bool) -> dict[str, Any]:
    """The whole multipart body as OpenAPI documents it: flask-smorest documents the ``files``
    schema alone, without the ``metadata`` form field, which it loads from the form."""
    return {
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "the model (ONNX first)"},
            "metadata": {
                "type": "string",
                "contentMediaType": "application/json",
                "description": f"a JSON object: {meta.__name__}",
            },
        },
        "required": ["file", "metadata"] if file_required else ["metadata"],
    }


class FileForm(StrictSchema):
    openapi_extra = _multipart_doc(VariantMetaSchema, file_required=True)

    file = _file_field()


class OptionalFileForm(StrictSchema):
    openapi_extra = _multipart_doc(VersionMetaSchema, file_required=False)

    file = _file_field(required=False)


class QuantizeForm(StrictSchema):
    eval_set_sha256 = fields.String(
        validate=validate.Regexp(r"^(sha256:)?[0-9a-f]{64}$", error="a SHA-256 digest"),
        metadata={"description": "an evaluation set stored before (its digest, as a previous job reported)"},
    )
    dataset = fields.String(validate=validate.Length(min=1, max=128), metadata={"description": "its name"})


class EvalFileForm(StrictSchema):
    eval_set = fields.Raw(metadata={"type": "string", "format": "binary", "description": ".npz holding X and y"})


class VariantSchema(Schema):
    name = fields.String()
    version = fields.String()
    variant = fields.String()
    sha256 = fields.String()
    digest = fields.String()
    size = fields.Integer()
    format = fields.String()
    task = fields.String()
    labels = fields.Dict()
    accuracy = fields.Dict()
    evaluation = fields.Dict(metadata={"description": "EVC's measurement: top-1 of parent and variant"})
    license = fields.String()
    description = fields.String()
    parent = fields.Dict()
    storage = fields.Dict(metadata={"description": "where the file is kept: backend (embedded, oci) and ref"})
    source = fields.String(metadata={"description": "upload, or evc-quantize"})
    metadata = fields.Dict(allow_none=True, metadata={"description": "what EVC read from the graph"})
    created_at = fields.Float()
    created_by = fields.String()


class VersionSchema(Schema):
    name = fields.String()
    version = fields.String()
    sha256 = fields.String()
    digest = fields.String()
    size = fields.Integer()
    format = fields.String()
    task = fields.String()
    labels = fields.Dict()
    accuracy = fields.Dict()
    license = fields.String()
    description = fields.String()
    metadata = fields.Dict(
        allow_none=True,
        metadata={"description": "what EVC read from the graph: inputs, outputs, opset, parameters, operations, flops"},
    )
    oci_ref = fields.String(metadata={"description": "registered by reference: the artifact, pinned by digest"})
    storage = fields.Dict(metadata={"description": "where the file is kept: backend (embedded, oci) and ref"})
    variants = fields.List(fields.Nested(VariantSchema))
    deployed = fields.Boolean()
    created_at = fields.Float()
    created_by = fields.String()


class ModelSchema(Schema):
    name = fields.String()
    task = fields.String(allow_none=True)
    latest = fields.String(allow_none=True)
    versions = fields.List(fields.Dict())
    created_at = fields.Float(allow_none=True)


class ModelPageSchema(PageSchema):
    items = fields.List(fields.Nested(ModelSchema))


class ModelListArgs(PageArgs):
    task = fields.String(validate=validate.Length(max=64))
    format = fields.String(validate=validate.Length(max=32))
    label = fields.List(
        fields.String(metadata={"openapi": LABEL_FILTER_OPENAPI}), metadata={"description": "key=value, repeatable"}
    )
    name_prefix = fields.String(validate=validate.Length(max=63))


class DownloadArgs(StrictSchema):
    variant = fields.String(validate=validate.Regexp(registry.VARIANT_RE, error="a variant name"))


class HardwareSchema(Schema):
    cluster_id = fields.String()
    name = fields.String()
    profile = fields.String()
    devices = fields.List(
        fields.Dict(),
        metadata={"description": "per member: arch, cpus, memory_bytes, accelerators, runtimes, load"},
    )


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise InvalidInput(f"label {item!r} must be key=value", field="label")
        out[k] = v
    return out


def _version_out(rec: dict[str, Any]) -> dict[str, Any]:
    return registry.version_view(get_store(), rec)


#: the JSON body that registers a version by reference (the multipart form's metadata fields)
_BY_REFERENCE = {
    "type": "object",
    "required": ["name", "version", "oci_ref"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string"},
        "oci_ref": {"type": "string", "description": "host[:port]/repository:tag or ...@sha256:<hex>"},
        "task": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "accuracy": {"type": "object", "properties": {"dataset": {"type": "string"}, "value": {"type": "number"}}},
        "license": {"type": "string"},
        "format": {"type": "string"},
        "description": {"type": "string"},
    },
    "additionalProperties": False,
}


# ----------------------------------------------------------------------------- versions
@blp.route("/models", methods=["POST"])
@require(Scope.MODELS)
@blp.arguments(VersionForm, location="form")
@blp.arguments(OptionalFileForm, location="files")
@blp.response(201, VersionSchema)
@blp.alt_response(200, schema=VersionSchema, description="the same bytes were registered before: that version")
@blp.alt_response(409, description="this name and version hold other bytes (versions are immutable)")
@blp.alt_response(413, description="the file is larger than the setting model_max_upload_bytes")
@blp.alt_response(502, description="the OCI registry could not be reached, or sent bytes that fail their digest")
@blp.doc(requestBody={"content": {"application/json": {"schema": _BY_REFERENCE}}})
def register(form: dict[str, Any], files: dict[str, Any]) -> Any:
    """Register a model version by upload: `file` (ONNX first; `format` is open) and `metadata`
    (JSON: name, version, task, labels, accuracy {dataset, value}, license, format). The version
    is content-addressed by SHA-256 and immutable.

    Or by reference to an OCI artifact: a JSON body (or `metadata`, without `file`) with
    `oci_ref` (`host:port/repository:tag` or `...@sha256:<hex>`): EVC pulls it once, verifies
    it, reads its metadata like an upload's and pins the reference to the manifest's digest."""
    meta: dict[str, Any] | None = form.get("metadata")
    if request.is_json:
        try:
            meta = VersionMetaSchema().load(request.get_json(silent=False) or {})
        except ValidationError as exc:
            abort(422, messages={"json": exc.messages})
    if meta is None:
        abort(422, messages={"form": {"metadata": ["Missing data for required field."]}})
        raise AssertionError("unreachable")  # abort raises
    ctx = context()
    file = files.get("file")
    if meta.get("oci_ref"):
        if file is not None:
            raise InvalidInput("give either a file or oci_ref, not both", field="oci_ref")
        rec, created = registry.register_reference(ctx, meta)
    elif file is None:
        raise InvalidInput("a file (multipart field file) or an oci_ref is required", field="file")
    else:
        rec, created = registry.register(ctx, file.stream, meta)
    return _version_out(rec), 201 if created else 200


@blp.route("/models", methods=["GET"])
@require_any(*READERS)
@blp.arguments(ModelListArgs, location="query")
@blp.response(200, ModelPageSchema)
def list_models(args: dict[str, Any]) -> Any:
    """Models and their versions; filters: task, format, label (key=value), name_prefix."""
    items, total = registry.list_models(
        get_store(), args["offset"], args["limit"], task=args.get("task"), fmt=args.get("format"),
        label=_labels(args.get("label") or []), name_prefix=args.get("name_prefix"),
    )  # fmt: skip
    return page(items, total, args)


@blp.route("/models/<name>", methods=["GET"])
@require_any(*READERS)
@blp.response(200, ModelSchema)
def show_model(name: str) -> Any:
    """One model with its versions."""
    return registry.show(get_store(), name)


@blp.route("/models/<name>/versions/<version>", methods=["GET"])
@require_any(*READERS)
@blp.response(200, VersionSchema)
def show_version(name: str, version: str) -> Any:
    """One version: its digest, metadata and variants."""
    return _version_out(registry.get_version(get_store(), name, version))


@blp.route("/models/<name>/versions/<version>", methods=["DELETE"])
@require(Scope.ADMIN)
@blp.response(200, VersionSchema)
@blp.alt_response(409, description="the version is deployed")
def delete_version(name: str, version: str) -> Any:
    """Delete a version, its variants and the blobs nothing else uses (refused while deployed)."""
    return registry.delete(context(), name, version)


@blp.route("/models/<name>/versions/<version>/download", methods=["GET"])
@require_any(*READERS)
@blp.arguments(DownloadArgs, location="query")
@blp.doc(
    responses={
        "200": {
            "description": "the file; its SHA-256 in `X-Content-SHA256` and `Digest` (verified before sending)",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    }
)
def download(args: dict[str, Any], name: str, version: str) -> Any:
    """The version's file (or `?variant=`'s), verified against its digest before it is sent."""
    store = get_store()
    variant = args.get("variant")
    rec = registry.get_variant(store, name, version, variant) if variant else registry.get_version(store, name, version)
    blob = registry.storage(get_settings(), rec).fetch(rec["sha256"], registry.record_ref(rec), rec.get("storage"))
    ext = "onnx" if rec.get("format", "onnx") == "onnx" else "bin"
    filename = f"{name}-{version}" + (f"-{variant}" if variant else "") + f".{ext}"
    f = open(blob.path, "rb")  # closed with the response (removed meanwhile: still readable)
    if blob.temporary:  # a verified copy pulled from the registry: gone once sent
        blob.path.unlink(missing_ok=True)
    resp = Response(stream_with_context(_chunks(f)), mimetype="application/octet-stream")
    resp.call_on_close(f.close)
    resp.headers["Content-Length"] = str(blob.size)
    resp.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    resp.headers["X-Content-SHA256"] = blob.digest
    resp.headers["Digest"] = "sha-256=" + base64.b64encode(bytes.fromhex(blob.digest)).decode()
    resp.headers["ETag"] = f'"sha256:{blob.digest}"'
    return resp


def _chunks(f: Any) -> Any:
    while chunk := f.read(CHUNK):
        yield chunk


# ----------------------------------------------------------------------------- variants
@blp.route("/models/<name>/versions/<version>/variants", methods=["POST"])
@require(Scope.MODELS)
@blp.arguments(VariantForm, location="form")
@blp.arguments(FileForm, location="files")
@blp.response(201, VariantSchema)
@blp.alt_response(200, schema=VariantSchema, description="the same bytes were registered before as this variant")
@blp.alt_response(409, description="this variant holds other bytes")
def add_variant(form: dict[str, Any], files: dict[str, Any], name: str, version: str) -> Any:
    """Register a variant of a version (EVF posts its variants here): `file` and `metadata`
    (JSON: variant, task, labels, accuracy, license, format)."""
    meta = dict(form["metadata"])
    variant = meta.pop("variant")
    rec, created = registry.register_variant(context(), name, version, variant, files["file"].stream, meta)
    return {**rec, "digest": f"sha256:{rec['sha256']}"}, 201 if created else 200


@blp.route("/models/<name>/versions/<version>/quantize", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(QuantizeForm, location="form")
@blp.arguments(EvalFileForm, location="files")
@blp.response(202, JobSchema)
def quantize(form: dict[str, Any], files: dict[str, Any], name: str, version: str) -> Any:
    """EVC makes the int8 variant itself (ONNX Runtime dynamic quantization), a job; with an
    evaluation set (`eval_set`: an .npz holding X and y, or `eval_set_sha256` of one stored
    before) it measures the top-1 accuracy of parent and variant and records both."""
    ctx = context(idempotent=True)
    parent = registry.get_version(ctx.store, name, version)
    if parent.get("format", "onnx") != "onnx":
        raise InvalidInput(f"model {name}:{version} is {parent['format']!r}: only ONNX models can be quantized")
    digest = (form.get("eval_set_sha256") or "").removeprefix("sha256:") or None
    if files.get("eval_set") is not None:
        digest = registry.store_eval_set(ctx, files["eval_set"].stream)
    elif digest and not registry.storage(ctx).exists(digest, registry.EVAL_SETS):
        raise InvalidInput(f"no evaluation set sha256:{digest} is stored; upload it", field="eval_set_sha256")
    params = {"name": name, "version": version, "eval_set": digest, "dataset": form.get("dataset")}
    job, _ = ctx.submit(JobKindName.MODEL_QUANTIZE, params=params)
    return job


# ----------------------------------------------------------------------------- hardware
@blp.route("/clusters/<id:cluster_id>/hardware", methods=["GET"])
@require_any(*READERS)
@blp.response(200, HardwareSchema)
def cluster_hardware(cluster_id: str) -> Any:
    """What EVF adapts models to: per member, arch, CPUs, memory, accelerators, runtimes and
    the measured load (from the facts and health records EVC keeps)."""
    return hardware.cluster_hardware(get_store(), cluster_id)
