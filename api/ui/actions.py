"""The console's actions (form posts): each checks the CSRF token (in the session guard) and the
admin scope, loads the form through the API's own schema, calls the same service as the API
with this request's context, and redirects to the page that shows the outcome. The audit log
records each like an API call (``POST /ui/...`` by the signed-in operator)."""

from __future__ import annotations

import json
from typing import Any

from evc.api.clusters import LevelSchema
from evc.api.deps import context, get_sender, get_store
from evc.api.fl import FLJobCreateSchema
from evc.api.provision import ProvisionSchema
from evc.api.schemas import EnrollmentCreateSchema, TokenCreateSchema
from evc.api.ui import bp
from evc.api.ui.session import require_admin
from flask import redirect, render_template, request, url_for
from marshmallow import Schema
from marshmallow import ValidationError as SchemaError

from evc import auth, clusters, jobs
from evc.errors import ValidationError
from evc.fl import service as fl
from evc.model import JobKindName
from evc.provisioning.service import RETRYABLE, ProvisionRequest, retry_job, submit_provision
from evc.queue import JobQueue
from evc.store import now


def _load(schema: Schema, data: dict[str, Any]) -> dict[str, Any]:
    """*data* (from a form) through the API's schema: its errors as one 422 message."""
    try:
        return dict(schema.load(data))
    except SchemaError as exc:
        raise ValidationError("invalid input: " + json.dumps(exc.messages)) from exc


def _json_field(name: str, default: Any) -> Any:
    raw = (request.form.get(name) or "").strip()
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ValidationError(f"{name} must be JSON: {exc}", field=name) from exc


def _to_job(job: Any) -> Any:
    return redirect(url_for("ui.job", job_id=job["id"]), code=303)


@bp.route("/provision", methods=["POST"])
def provision() -> Any:
    """Run a playbook on the chosen devices (optionally a dry run that reports drift)."""
    require_admin()
    data = {"playbook": request.form.get("playbook", ""), "targets": request.form.getlist("targets"),
            "check": request.form.get("check") == "on", "extra_vars": _json_field("extra_vars", {})}  # fmt: skip
    ctx = context()
    job, _ = submit_provision(ctx, ProvisionRequest.from_dict(_load(ProvisionSchema(), data)))
    return _to_job(job)


@bp.route("/jobs/<id:job_id>/cancel", methods=["POST"])
def cancel(job_id: str) -> Any:
    require_admin()
    jobs.cancel(get_store(), job_id, revoke=JobQueue.of(get_sender()).revoke)
    return redirect(url_for("ui.job", job_id=job_id), code=303)


@bp.route("/jobs/<id:job_id>/retry", methods=["POST"])
def retry(job_id: str) -> Any:
    """Relaunch a finished provision job on its failed and unreachable hosts."""
    require_admin()
    job, _ = retry_job(context(), job_id, on=list(RETRYABLE))
    return _to_job(job)


@bp.route("/health/sweep", methods=["POST"])
def sweep() -> Any:
    """Check every device's health now."""
    require_admin()
    job, _ = context().submit(JobKindName.HEALTH, targets=[])
    return _to_job(job)


@bp.route("/clusters/<id:cluster_id>/level", methods=["POST"])
def raise_level(cluster_id: str) -> Any:
    """Raise every member to a function level (a job; each device's level and why not higher)."""
    require_admin()
    data = _load(LevelSchema(), {"target": request.form.get("target", ""), "check": request.form.get("check") == "on"})
    job = clusters.raise_level(context(), cluster_id, data["target"], check=data["check"], offline=data["offline"],
                               offline_ttl_s=data["offline_ttl_s"])  # fmt: skip
    return _to_job(job)


@bp.route("/fl/start", methods=["POST"])
def fl_start() -> Any:
    """Start a federated learning job on a cluster or on chosen devices."""
    require_admin()
    f = request.form
    data: dict[str, Any] = {"data": {"path": f.get("data", "")}, "rounds": f.get("rounds", "5"),
                            "model": f.get("model") or "softmax"}  # fmt: skip
    if f.get("cluster"):
        data["cluster"] = f["cluster"]
    else:
        data["devices"] = f.getlist("devices")
    for opt in ("test_set", "python"):
        if f.get(opt):
            data[opt] = f[opt]
    job = fl.submit(context(), _load(FLJobCreateSchema(), data))
    return redirect(url_for("ui.fl_job", job_id=job["id"]), code=303)


@bp.route("/fl/<id:job_id>/stop", methods=["POST"])
def fl_stop(job_id: str) -> Any:
    require_admin()
    fl.stop(get_store(), job_id, revoke=JobQueue.of(get_sender()).revoke)
    return redirect(url_for("ui.fl_job", job_id=job_id), code=303)


@bp.route("/fl/<id:job_id>/resume", methods=["POST"])
def fl_resume(job_id: str) -> Any:
    require_admin()
    fl.resume(get_store(), get_sender(), job_id)
    return redirect(url_for("ui.fl_job", job_id=job_id), code=303)


@bp.route("/tokens", methods=["POST"])
def token_create() -> Any:
    """Create an operator token: shown once, on the page this answers with."""
    require_admin()
    data = _load(TokenCreateSchema(), {"name": request.form.get("name", ""), "scopes": request.form.getlist("scopes")})
    exp = now() + data["expires_in_s"] if data.get("expires_in_s") else None
    rec, token = auth.create_operator_token(context(), data["name"], data["scopes"], expires_at=exp)
    return render_template("ui/secret.html", what=f"operator token {rec['name']}", secret=token)


@bp.route("/tokens/<id:token_id>/revoke", methods=["POST"])
def token_revoke(token_id: str) -> Any:
    require_admin()
    auth.revoke_operator_token(get_store(), token_id)
    return redirect(url_for("ui.tokens"), code=303)


@bp.route("/enrollments", methods=["POST"])
def enrollment_create() -> Any:
    """An enrollment token for device owners: shown once."""
    require_admin()
    f = request.form
    labels = dict(item.split("=", 1) for item in (f.get("labels") or "").split(",") if "=" in item)
    raw: dict[str, Any] = {"ttl_s": f.get("ttl_s") or 3600, "max_uses": f.get("max_uses") or 1, "labels": labels}
    if f.get("allow_networks"):
        raw["allow_networks"] = [n.strip() for n in f["allow_networks"].split(",") if n.strip()]
    data = _load(EnrollmentCreateSchema(), raw)
    rec, token = auth.create_enrollment(context(), ttl_s=data["ttl_s"], max_uses=data["max_uses"],
                                        labels=data["labels"], allow_networks=data["allow_networks"])  # fmt: skip
    return render_template("ui/secret.html", what=f"enrollment {rec['id']}", secret=token)


@bp.route("/enrollments/<id:enrollment_id>/revoke", methods=["POST"])
def enrollment_revoke(enrollment_id: str) -> Any:
    require_admin()
    store = get_store()
    store.get_enrollment(enrollment_id)
    store.update_enrollment(enrollment_id, revoked=True)
    return redirect(url_for("ui.tokens"), code=303)
