"""The fleet event log (device state changes, membership...) and on-demand health sweeps."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_store, require
from evc.api.schemas import JobSchema, PageArgs, PageSchema, StrictSchema, page
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from evc.model import JobKindName, Scope

blp = Blueprint("events", __name__, url_prefix="/api/v1", description="Fleet events and health")


class FleetEventArgs(PageArgs):
    type = fields.String(
        validate=validate.Length(min=1, max=64),
        metadata={"description": "event type, or a dotted prefix: `device` matches `device.state`"},
    )
    device = fields.String(validate=validate.Length(min=1, max=64), metadata={"description": "device id"})
    since = fields.Float(
        validate=validate.Range(min=0), metadata={"description": "only events at or after this Unix time"}
    )


class FleetEventSchema(Schema):
    class Meta:
        unknown = "include"

    ts = fields.Float()
    type = fields.String()
    device = fields.String()
    name = fields.String()
    reason = fields.String()


class FleetEventPageSchema(PageSchema):
    items = fields.List(fields.Dict(), metadata={"description": "events, newest first"})


class SweepSchema(StrictSchema):
    devices = fields.List(
        fields.String(validate=validate.Length(min=1, max=64)),
        load_default=list,
        validate=validate.Length(max=10_000),
        metadata={"description": "device ids; empty or absent: every registered device"},
    )


@blp.route("/events", methods=["GET"])
@require(Scope.READ)
@blp.arguments(FleetEventArgs, location="query")
@blp.response(200, FleetEventPageSchema)
def list_events(args: dict[str, Any]) -> Any:
    """Fleet events, newest first: filter by type (or dotted prefix), device and time."""
    etype, device = args.get("type"), args.get("device")
    match = None
    if etype or device:

        def match(ev: dict[str, Any]) -> bool:
            t = str(ev.get("type", ""))
            if etype and t != etype and not t.startswith(etype + "."):
                return False
            return not device or ev.get("device") == device

    items, total = get_store().fleet_event_page(args["offset"], args["limit"], match, args.get("since"))
    return page(items, total, args)


@blp.route("/health/sweep", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(SweepSchema)
@blp.response(202, JobSchema)
def sweep(data: dict[str, Any]) -> Any:
    """Check the health of every registered device now (or of the devices listed): a job with
    a result per device."""
    job, _ = context(idempotent=True).submit(JobKindName.HEALTH, targets=list(dict.fromkeys(data["devices"])))
    return job
