"""Operator tokens, enrollment tokens and the audit log."""

from __future__ import annotations

from typing import Any

from evc.api.deps import context, get_store, require
from evc.api.schemas import (
    AuditPageSchema,
    EnrollmentCreateSchema,
    EnrollmentPageSchema,
    EnrollmentSchema,
    PageArgs,
    TokenCreateSchema,
    TokenPageSchema,
    TokenSchema,
    page,
)
from flask_smorest import Blueprint

from evc import auth
from evc.model import Scope
from evc.store import now

blp = Blueprint("access", __name__, url_prefix="/api/v1", description="Tokens and audit")


@blp.route("/tokens", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(TokenCreateSchema)
@blp.response(201, TokenSchema)
def create_token(data: dict[str, Any]) -> Any:
    """Create an operator token (shown once in this response)."""
    exp = now() + data["expires_in_s"] if data.get("expires_in_s") else None
    rec, token = auth.create_operator_token(context(), data["name"], data["scopes"], expires_at=exp)
    return {**auth.public_token(rec), "token": token}


@blp.route("/tokens", methods=["GET"])
@require(Scope.ADMIN)
@blp.arguments(PageArgs, location="query")
@blp.response(200, TokenPageSchema)
def list_tokens(args: dict[str, Any]) -> Any:
    """Operator tokens (never their secret)."""
    items, total = get_store().list_tokens(args["offset"], args["limit"])
    return page([auth.public_token(t) for t in items], total, args)


@blp.route("/tokens/<id:token_id>", methods=["DELETE"])
@require(Scope.ADMIN)
@blp.response(200, TokenSchema)
def revoke_token(token_id: str) -> Any:
    """Revoke an operator token: it stops working at once."""
    return auth.public_token(auth.revoke_operator_token(get_store(), token_id))


@blp.route("/enrollments", methods=["POST"])
@require(Scope.ADMIN)
@blp.arguments(EnrollmentCreateSchema)
@blp.response(201, EnrollmentSchema)
def create_enrollment(data: dict[str, Any]) -> Any:
    """A short-lived, use-limited token a device owner registers with instead of an operator token."""
    rec, token = auth.create_enrollment(
        context(),
        ttl_s=data["ttl_s"],
        max_uses=data["max_uses"],
        labels=data["labels"],
        allow_networks=data["allow_networks"],
    )
    return {**auth.public_token(rec), "token": token}


@blp.route("/enrollments", methods=["GET"])
@require(Scope.ADMIN)
@blp.arguments(PageArgs, location="query")
@blp.response(200, EnrollmentPageSchema)
def list_enrollments(args: dict[str, Any]) -> Any:
    """Enrollment tokens with their uses left."""
    items, total = get_store().list_enrollments(args["offset"], args["limit"])
    return page([auth.public_token(e) for e in items], total, args)


@blp.route("/enrollments/<id:enrollment_id>", methods=["DELETE"])
@require(Scope.ADMIN)
@blp.response(200, EnrollmentSchema)
def revoke_enrollment(enrollment_id: str) -> Any:
    """Revoke an enrollment token."""
    store = get_store()
    store.get_enrollment(enrollment_id)
    return auth.public_token(store.update_enrollment(enrollment_id, revoked=True))


@blp.route("/audit", methods=["GET"])
@require(Scope.ADMIN)
@blp.arguments(PageArgs, location="query")
@blp.response(200, AuditPageSchema)
def audit(args: dict[str, Any]) -> Any:
    """Who did what, when, from where: every mutating call, newest first."""
    items, total = get_store().audit_log(args["offset"], args["limit"])
    return page(items, total, args)
