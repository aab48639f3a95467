"""Clusters, their members and function levels; the interworking profiles."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_settings, get_store, require
from evc.api.schemas import JobSchema, Labels, PageArgs, PageSchema, StrictSchema, page, validate_name
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from evc import clusters, profiles
from evc.choices import OFFLINE_POLICIES
from evc.model import Scope

blp = Blueprint("clusters", __name__, url_prefix="/api/v1", description="Clusters and interworking profiles")


def _vars_by_profile() -> dict[str, Any]:
    """OpenAPI: ``vars`` may name only the playbooks of the chosen profile."""
    return {
        "oneOf": [
            {"properties": {"profile": {"const": p.name}, "vars": {"propertyNames": {"enum": sorted(p.playbooks())}}}}
            for p in profiles.profiles().values()
        ]
    }


class ClusterCreateSchema(StrictSchema):
    openapi_extra = _vars_by_profile()

    name = fields.String(required=True, validate=validate_name)
    profile = fields.String(required=True, validate=validate.OneOf(profiles.names()))
    target_level = fields.Integer(load_default=0, validate=validate.Range(min=0, max=profiles.MAX_LEVEL))
    labels = Labels(load_default=dict)
    vars = fields.Dict(
        keys=fields.String(validate=validate.Length(max=64)),
        values=fields.Dict(),
        load_default=dict,
        metadata={
            "description": 'per-playbook variables for the profile\'s steps, e.g. {"k3s-server": {"artifact": "k3s"}}'
        },
    )


class ClusterUpdateSchema(StrictSchema):
    name = fields.String(validate=validate_name)
    labels = Labels()
    vars = fields.Dict(keys=fields.String(validate=validate.Length(max=64)), values=fields.Dict())
    server_id = fields.String(validate=validate.Length(min=1, max=64))


class ClusterSchema(Schema):
    id = fields.String()
    name = fields.String()
    profile = fields.String()
    target_level = fields.Integer()
    level = fields.Integer(metadata={"description": "the lowest level any member has reached"})
    labels = fields.Dict()
    vars = fields.Dict()
    server_id = fields.String(allow_none=True)
    members = fields.List(fields.String())
    size = fields.Integer()
    states = fields.Dict()
    created_at = fields.Float()
    created_by = fields.String()


class ClusterPageSchema(PageSchema):
    items = fields.List(fields.Nested(ClusterSchema))


class MemberSchema(StrictSchema):
    device_id = fields.String(required=True, validate=validate.Length(min=1, max=64))


class MemberResultSchema(Schema):
    cluster = fields.Nested(ClusterSchema)
    job = fields.Nested(JobSchema, allow_none=True)


class RemoveArgs(StrictSchema):
    cleanup = fields.Boolean(load_default=False)


class LevelSchema(StrictSchema):
    target = fields.Integer(required=True, validate=validate.Range(min=0, max=profiles.MAX_LEVEL))
    check = fields.Boolean(load_default=False, metadata={"description": "dry run: report what would change"})
    offline = fields.String(
        load_default="skip",
        validate=validate.OneOf(OFFLINE_POLICIES),
        metadata={
            "description": "offline members: skip them (reported), fail the job at "
            "once, or wait for them up to offline_ttl_s"
        },
    )
    offline_ttl_s = fields.Float(load_default=300.0, validate=validate.Range(min=1, max=86400))


@blp.route("/profiles", methods=["GET"])
@require(Scope.READ)
@blp.response(200)
def list_profiles() -> Any:
    """The four interworking profiles: what members need and which playbooks raise each level."""
    return {
        "levels": profiles.LEVELS,
        "operations": profiles.OPERATION_LEVELS,
        "profiles": [p.to_dict() for p in profiles.profiles().values()],
    }


@blp.route("/clusters", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(ClusterCreateSchema)
@blp.response(201, ClusterSchema)
def create(data: dict[str, Any]) -> Any:
    """Create a cluster with an interworking profile and a target function level."""
    ctx = context()
    return clusters.public(ctx.store, clusters.create(ctx, data))


@blp.route("/clusters", methods=["GET"])
@require(Scope.READ)
@blp.arguments(PageArgs, location="query")
@blp.response(200, ClusterPageSchema)
def list_clusters(args: dict[str, Any]) -> Any:
    """Clusters with their members and level."""
    store = get_store()
    items, total = store.list_clusters(args["offset"], args["limit"])
    return page([clusters.public(store, c) for c in items], total, args)


@blp.route("/clusters/<id:cluster_id>", methods=["GET"])
@require(Scope.READ)
@blp.response(200, ClusterSchema)
def show(cluster_id: str) -> Any:
    """One cluster."""
    store = get_store()
    return clusters.public(store, store.get_cluster(cluster_id))


@blp.route("/clusters/<id:cluster_id>", methods=["PATCH"])
@require(Scope.ADMIN)
@blp.arguments(ClusterUpdateSchema)
@blp.response(200, ClusterSchema)
def update(data: dict[str, Any], cluster_id: str) -> Any:
    """Rename, relabel, or hand the server role (k3s) to another member."""
    store = get_store()
    return clusters.public(store, clusters.update(store, cluster_id, data, settings=get_settings()))


@blp.route("/clusters/<id:cluster_id>", methods=["DELETE"])
@require(Scope.ADMIN)
@blp.response(200, ClusterSchema)
def delete(cluster_id: str) -> Any:
    """Delete an empty cluster."""
    store = get_store()
    cl = clusters.delete(store, cluster_id)
    return {**cl, "members": [], "size": 0, "states": {}}


@blp.route("/clusters/<id:cluster_id>/devices", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(MemberSchema)
@blp.response(202, MemberResultSchema)
def add_device(data: dict[str, Any], cluster_id: str) -> Any:
    """Add a device; a job brings it to the cluster's target level."""
    ctx = context()
    cl, job = clusters.add_device(ctx, cluster_id, data["device_id"])
    return {"cluster": clusters.public(ctx.store, cl), "job": job}


@blp.route("/clusters/<id:cluster_id>/devices/<id:device_id>", methods=["DELETE"])
@require(Scope.ADMIN)
@blp.arguments(RemoveArgs, location="query")
@blp.response(202, MemberResultSchema)
def remove_device(args: dict[str, Any], cluster_id: str, device_id: str) -> Any:
    """Remove a device; `?cleanup=true` also runs the cleanup playbook on it (a job)."""
    ctx = context()
    store = ctx.store
    job = clusters.remove_device(ctx, cluster_id, device_id, cleanup=args["cleanup"])
    return {"cluster": clusters.public(store, store.get_cluster(cluster_id)), "job": job}


@blp.route("/clusters/<id:cluster_id>/level", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(LevelSchema)
@blp.response(202, JobSchema)
def level(data: dict[str, Any], cluster_id: str) -> Any:
    """Raise every member to a function level (a job reporting, per device, the level reached
    and why not higher)."""
    return clusters.raise_level(
        context(idempotent=True),
        cluster_id,
        data["target"],
        check=data["check"],
        offline=data["offline"],
        offline_ttl_s=data["offline_ttl_s"],
    )
