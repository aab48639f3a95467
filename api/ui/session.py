"""Console sign-in: an operator token exchanged for a server-side session in Redis (the cookie
holds a random id, HttpOnly and SameSite=Strict; the store keeps its hash), a CSRF token on
every form, and the session's operator as the request's principal (so services, the audit log
and ``created_by`` see console actions exactly like API ones)."""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Any, cast

from evc.api.deps import client_address, get_settings, get_store
from evc.api.ui import bp
from flask import Response, g, redirect, render_template, request, url_for

from evc import auth
from evc.errors import AuthError, EVCError, Forbidden, StoreUnavailable
from evc.model import PrincipalKind, Scope
from evc.store import now

log = logging.getLogger(__name__)

COOKIE = "evc_console"
#: the sign-in form's CSRF cookie (double submit: there is no session yet)
PRE_COOKIE = "evc_console_csrf"
#: the views anyone may reach without a session
PUBLIC = {"ui.signin", "ui.static"}


def _cookie(resp: Response, name: str, value: str, max_age: int | None) -> None:
    resp.set_cookie(
        name, value, max_age=max_age, path="/ui", httponly=True, samesite="Strict", secure=request.is_secure
    )


def _load() -> dict[str, Any] | None:
    """This request's session (its token still valid), or None."""
    sid = request.cookies.get(COOKIE)
    if not sid:
        return None
    store, key = get_store(), auth.hash_token(sid)
    sess = store.get_session(key, get_settings().console_session_ttl_s)
    if sess is None:
        return None
    try:
        tok = store.get_token(sess["token_id"])
    except EVCError:
        tok = None
    expires = tok.get("expires_at") if tok else None
    if tok is None or tok.get("revoked") or (expires is not None and expires < now()):
        store.delete_session(key)  # the token was revoked or expired: so is the session
        return None
    return {**sess, "key": key}


@bp.before_request
def guard() -> Any:
    """Every console page needs a session; every form post its CSRF token."""
    if request.endpoint in PUBLIC:
        return None
    sess = _load()
    if sess is None:
        if request.method == "GET" and request.endpoint != "ui.job_stream":
            return redirect(url_for("ui.signin", next=request.full_path.rstrip("?")))
        raise AuthError("sign in first: your console session has ended")
    g.ui_session = sess
    g.principal = auth.Principal(PrincipalKind.OPERATOR, sess["token_id"], sess["name"], frozenset(sess["scopes"]))
    if request.method == "POST" and not _same(request.form.get("csrf"), sess["csrf"]):
        raise Forbidden("this form is stale or was not sent by the console (CSRF check failed); reload the page")
    return None


def _same(a: str | None, b: str | None) -> bool:
    return bool(a and b) and hmac.compare_digest(str(a), str(b))


def can_admin() -> bool:
    p = getattr(g, "principal", None)
    return bool(p and p.allows(Scope.ADMIN))


def require_admin() -> None:
    """A console action: a read token's console is read-only."""
    if not can_admin():
        raise Forbidden("this console is read-only: sign in with an admin token to act")


@bp.app_context_processor
def _globals() -> dict[str, Any]:
    sess = getattr(g, "ui_session", None)
    return {"ui_user": sess and sess["name"], "csrf": sess and sess["csrf"], "admin": can_admin()}


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path only (no open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("ui.fleet")


@bp.route("/sign-in", methods=["GET", "POST"], endpoint="signin")
def signin() -> Any:
    """GET: the form; POST: exchange the token for a session."""
    if request.method == "GET":
        pre = secrets.token_urlsafe(24)
        resp = Response(render_template("ui/signin.html", pre_csrf=pre, next=request.args.get("next", "")))
        _cookie(resp, PRE_COOKIE, pre, 3600)
        return resp
    if not _same(request.form.get("csrf"), request.cookies.get(PRE_COOKIE)):
        raise Forbidden("the sign-in form is stale (CSRF check failed); reload the page")
    token = (request.form.get("token") or "").strip()
    p = auth.authenticate(get_store(), get_settings(), f"Bearer {token}", client_address())
    if p.kind != PrincipalKind.OPERATOR or not p.allows(Scope.READ):
        raise Forbidden("sign in with an operator token that has the 'read' or 'admin' scope")
    g.principal = p  # the audit entry names who signed in
    sid = secrets.token_urlsafe(32)
    rec = {"token_id": p.id, "name": p.name, "scopes": sorted(p.scopes), "csrf": secrets.token_urlsafe(24),
           "created_at": now(), "ip": client_address()}  # fmt: skip
    ttl = get_settings().console_session_ttl_s
    get_store().create_session(auth.hash_token(sid), rec, ttl)
    resp = cast(Response, redirect(_safe_next(request.form.get("next")), code=303))
    _cookie(resp, COOKIE, sid, ttl)
    resp.delete_cookie(PRE_COOKIE, path="/ui")
    return resp


@bp.route("/sign-out", methods=["POST"])
def signout() -> Any:
    get_store().delete_session(g.ui_session["key"])
    resp = redirect(url_for("ui.signin"), code=303)
    resp.delete_cookie(COOKIE, path="/ui")
    return resp


@bp.errorhandler(EVCError)
def error_page(exc: EVCError) -> Any:
    """Errors as a page that says what happened and what to do (the API's message)."""
    if isinstance(exc, AuthError | Forbidden) and request.endpoint == "ui.signin":
        pre = secrets.token_urlsafe(24)
        resp = Response(render_template("ui/signin.html", pre_csrf=pre, error=exc.message,
                                        next=request.form.get("next", "")), status=exc.status)  # fmt: skip
        _cookie(resp, PRE_COOKIE, pre, 3600)
        return resp
    message = exc.message
    if isinstance(exc, StoreUnavailable):  # as the API says it: the Redis error itself is logged, not shown
        log.error("store unavailable on %s %s: %s", request.method, request.path, exc.__cause__ or exc)
        message = "EVC's store (Redis) is unavailable; nothing was done, retry later"
    return render_template("ui/error.html", status=exc.status, message=message), exc.status
