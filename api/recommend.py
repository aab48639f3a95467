"""Model recommendation: profiling jobs, device calibration, the recommendation per device.

A token with the ``models`` scope (EVF) may profile and read recommendations; ``read`` may
read them; calibrating devices takes ``admin``."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_settings, get_store, require, require_any
from evc.api.schemas import JobSchema, StrictSchema, one_of
from flask_smorest import Blueprint
from marshmallow import ValidationError, fields, validate, validates_schema

from evc.model import Scope
from evc.recommend import advise, choose, service

blp = Blueprint(
    "recommend", __name__, url_prefix="/api/v1",
    description="Model recommendation from measurements: profiles, calibration, recommendations",
)  # fmt: skip

READERS = (Scope.READ, Scope.MODELS)


class _Targets(StrictSchema):
    openapi_extra = one_of("cluster", "devices")

    cluster = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=64),
        metadata={"description": "every member of this cluster"},
    )
    devices = fields.List(fields.String(), load_default=None, validate=validate.Length(min=1, max=1000))
    python = fields.String(load_default=None, metadata={"description": "the devices' Python (numpy + onnxruntime)"})
    one_at_a_time = fields.Boolean(
        load_default=False, metadata={"description": "measure one device at a time (devices that share a host)"}
    )

    @validates_schema
    def _one_target(self, data: dict[str, Any], **kw: Any) -> None:
        if bool(data.get("cluster")) == bool(data.get("devices")):
            raise ValidationError("give a cluster or devices (one of them)", field_name="cluster")


class ProfileSchema(_Targets):
    version = fields.String(load_default=None, metadata={"description": "default: the latest"})
    variants = fields.List(
        fields.String(validate=validate.Length(min=1, max=32)), load_default=None,
        metadata={"description": "variant names (base: the version itself); default all"},
    )  # fmt: skip
    batches = fields.List(fields.Integer(validate=validate.Range(min=1, max=service.MAX_BATCH)), load_default=None,
                          validate=validate.Length(min=1, max=service.MAX_BATCHES))  # fmt: skip
    warmup = fields.Integer(load_default=None, validate=validate.Range(*service.LIMITS["warmup"]))
    timed = fields.Integer(load_default=None, validate=validate.Range(*service.LIMITS["timed"]))
    max_seconds = fields.Float(load_default=None, validate=validate.Range(*service.LIMITS["max_seconds"]))


class CalibrateSchema(_Targets):
    pass


class RecommendArgs(StrictSchema):
    cluster = fields.String(load_default=None, metadata={"description": "its members (with devices: those of them)"})
    devices = fields.List(fields.String(), load_default=None, metadata={"description": "neither: every device"})
    version = fields.String(load_default=None)
    objective = fields.String(load_default="accuracy", validate=validate.OneOf(choose.OBJECTIVES))
    max_latency_ms = fields.Float(load_default=None, validate=validate.Range(min=0, min_inclusive=False))
    min_accuracy = fields.Float(load_default=None, validate=validate.Range(min=0, max=1))
    batch = fields.Integer(load_default=1, validate=validate.Range(min=1, max=service.MAX_BATCH))
    follow_load = fields.Boolean(load_default=True, metadata={"description": "scale figures by the load now"})


@blp.route("/models/<name>/profile", methods=["POST"])
@require(Scope.MODELS)
@blp.arguments(ProfileSchema)
@blp.response(202, JobSchema)
def profile(data: dict[str, Any], name: str) -> Any:
    """Profile a model version's variants on devices (a job): p50/p95 latency, throughput,
    peak memory and load per (variant, device, batch size); stored per (variant digest,
    device, runtime) until the device's facts change."""
    return service.submit_profile(context(), name, data)


@blp.route("/models/<name>/profiles", methods=["GET"])
@require_any(*READERS)
@blp.response(200)
def profiles(name: str) -> Any:
    """The stored profiles of a model's versions and variants."""
    store = get_store()
    return {"items": [p for p in store.profiles() if p.get("model") == name]}


@blp.route("/devices/calibrate", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(CalibrateSchema)
@blp.response(202, JobSchema)
def calibrate(data: dict[str, Any]) -> Any:
    """Run the short calibration micro-benchmark on devices (a job): GFLOP/s of convolutions
    and matrix products (float and int8), element and node costs, the CPU quota."""
    return service.submit_calibrate(context(), data)


@blp.route("/devices/<id:device_id>/calibration", methods=["GET"])
@require_any(*READERS)
@blp.response(200)
def calibration(device_id: str) -> Any:
    """A device's calibration (404 when it has none)."""
    from evc.errors import NotFound

    store = get_store()
    dev = store.get_device(device_id)
    rec = store.calibration(dev["id"])
    if rec is None:
        raise NotFound(f"device {dev.get('name') or device_id} is not calibrated; POST /api/v1/devices/calibrate")
    return rec


@blp.route("/models/<name>/recommend", methods=["GET"])
@require_any(*READERS)
@blp.arguments(RecommendArgs, location="query")
@blp.response(200)
def recommend(args: dict[str, Any], name: str) -> Any:
    """Per device, the variant that meets `max_latency_ms` (p95) and `min_accuracy` and best
    meets the `objective` (accuracy, latency, throughput); measured or predicted (with its
    uncertainty); why each other variant lost; the devices that can run none, with the reason."""
    return advise.recommend(get_store(), get_settings(), name, args)
