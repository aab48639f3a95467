"""What views need, built once per process from the app's settings: store, Celery sender, auth."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import current_app, g, request

from evc import auth, jobs
from evc.auth import Principal
from evc.context import Caller, Context
from evc.errors import Forbidden
from evc.model import PrincipalKind
from evc.settings import Settings
from evc.store import Store

F = TypeVar("F", bound=Callable[..., Any])


def _ext() -> dict[str, Any]:
    return cast(dict[str, Any], current_app.extensions["evc"])


def get_settings() -> Settings:
    return cast(Settings, _ext()["settings"])


def get_store(ext: dict[str, Any] | None = None) -> Store:
    """The app's store (*ext*: the app's ``extensions["evc"]``, when the caller has it)."""
    ext = _ext() if ext is None else ext
    store = ext.get("store")
    if store is None:
        store = ext["store"] = Store.from_settings(ext["settings"])
    return cast(Store, store)


def get_sender(ext: dict[str, Any] | None = None) -> Any:
    """A Celery app without task modules: the API sends tasks by name."""
    ext = _ext() if ext is None else ext
    if ext.get("celery") is None:
        from evc.workers.celery_app import make_celery

        ext["celery"] = make_celery(ext["settings"], include_tasks=False)
    return ext["celery"]


def unit_of_work() -> Any:
    """This request's MULTI/EXEC pipeline: executed with the audit entry after the view, only
    when the view succeeded. Writes queued here cost no extra round trip."""
    pipe = getattr(g, "evc_pipe", None)
    if pipe is None:
        pipe = g.evc_pipe = get_store().unit_of_work()
    return pipe


def idempotency_key() -> str | None:
    """The request's ``Idempotency-Key`` scoped to its endpoint, with a fingerprint of its body
    and query (:func:`evc.jobs.scoped_key`); None without the header."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    body = request.get_json(silent=True)
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode() if body is not None else request.get_data()
    return jobs.scoped_key(key, f"{request.method} {request.path}", request.query_string + b"\n" + raw)


def client_address() -> str:
    """The caller's address; ``X-Forwarded-For`` counts only from a configured trusted proxy
    (worked out once per request)."""
    addr = getattr(g, "evc_client", None)
    if addr is None:
        addr = g.evc_client = auth.client_address(
            request.remote_addr or "", request.headers.get("X-Forwarded-For"), get_settings().trusted_proxies
        )
    return cast(str, addr)


def token_cache(ext: dict[str, Any] | None = None) -> auth.TokenCache:
    """This process's :class:`~evc.auth.TokenCache` (``auth_cache_s``)."""
    ext = _ext() if ext is None else ext
    if ext.get("token_cache") is None:
        ext["token_cache"] = auth.TokenCache(ext["settings"].auth_cache_s)
    return cast(auth.TokenCache, ext["token_cache"])


def authenticate(deferrable: bool = False) -> Principal:
    """The caller; with *deferrable* (a view whose writes all go through :func:`unit_of_work`)
    an operator token may come from this process's cache, its check then made by the commit
    (``g.evc_deferred``). Never with an ``Idempotency-Key``: claiming one writes at once."""
    p = getattr(g, "principal", None)
    if p is None:
        ext, headers = _ext(), request.headers
        cache = token_cache(ext) if deferrable and "Idempotency-Key" not in headers else None
        header, client = headers.get("Authorization"), client_address()
        p, g.evc_deferred = auth.authenticate_deferred(get_store(ext), ext["settings"], header, client, cache)
        g.principal = p
    return cast(Principal, p)


def recheck(deferred: auth.Deferred) -> None:
    """A deferred token failed its commit-time check: forget it and authenticate the request
    again from the store, raising what a request with that token now gets (401, 429, 403)."""
    token_cache().forget(deferred.token_hash)
    p = auth.authenticate(get_store(), get_settings(), request.headers.get("Authorization"), client_address())
    g.evc_check(p)


def principal() -> Principal:
    return authenticate()


def _guard(check: Callable[[Principal], None], deferrable: bool = False) -> Callable[[F], F]:
    """A view decorator: authenticate the caller, run *check* on it, document bearer auth."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            g.evc_check = check
            check(authenticate(deferrable))
            return fn(*args, **kwargs)

        _security(wrapper)
        return cast(F, wrapper)

    return deco


def require(scope: str, *, deferrable: bool = False) -> Callable[[F], F]:
    """Operator token with *scope* (``admin`` implies every scope). *deferrable*: the view
    writes only through :func:`unit_of_work` (see :func:`authenticate`)."""
    return _guard(lambda p: auth.check_scope(p, scope), deferrable)


def require_any(*scopes: str) -> Callable[[F], F]:
    """Operator token with one of *scopes* (``admin`` implies every scope)."""

    def check(p: Principal) -> None:
        if not any(p.allows(s) for s in scopes):
            auth.check_scope(p, scopes[0])  # a device or enrollment token: its own message
            raise Forbidden("this token lacks the " + " or ".join(repr(str(s)) for s in scopes) + " scope")

    return _guard(check)


def _device_only(p: Principal) -> None:
    if p.kind != PrincipalKind.DEVICE:
        raise Forbidden("this endpoint takes a device token")


#: any valid token; the view decides what the principal may do
authenticated = _guard(lambda p: None)
#: a device token: the view acts on the calling device only
require_device = _guard(_device_only)


def _security(fn: Any) -> None:
    doc = getattr(fn, "_apidoc", {})
    doc.setdefault("manual_doc", {})["security"] = [{"bearerAuth": []}]
    fn._apidoc = doc


def actor() -> str:
    p = getattr(g, "principal", None)
    return p.label if p else "anonymous"


def caller() -> Caller:
    """The authenticated caller as services see it (``anonymous`` before authentication)."""
    p = getattr(g, "principal", None)
    return Caller(p.label, p.scopes) if p else Caller("anonymous")


def context(*, idempotent: bool = False) -> Context:
    """This request's :class:`~evc.context.Context`, built once (after authentication); with
    *idempotent*, carrying the request's scoped ``Idempotency-Key`` (:func:`idempotency_key`)."""
    ctx = getattr(g, "evc_context", None)
    if ctx is None:
        ext = _ext()
        ctx = g.evc_context = Context(get_store(ext), ext["settings"], get_sender(ext), caller())
    if not idempotent:
        return cast(Context, ctx)
    key = idempotency_key()
    return cast(Context, ctx) if key is None and ctx.idempotency_key is None else cast(Context, ctx).with_key(key)
