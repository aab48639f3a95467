"""The Flask app factory: flask-smorest API, error handling, audit of mutating calls."""

from __future__ import annotations

import copy
import importlib
import json
import logging
from typing import IO, Any, cast

import redis
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.openapi import OpenAPIConverter
from evc.api import docs_assets
from flask import Flask, Request, g, jsonify, request
from flask_smorest import Api
from marshmallow import fields
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from evc import __version__
from evc.errors import EVCError, StoreUnavailable
from evc.settings import Settings, load_settings

log = logging.getLogger(__name__)

#: what a client is told when the store is down (the Redis error itself is logged, not shown)
_STORE_DOWN = "EVC's store (Redis) is unavailable; nothing was done, retry later"

#: blueprint modules (each exposes ``blp``); features add theirs here
BLUEPRINTS = [
    "evc.api.meta",
    "evc.api.access",
    "evc.api.devices",
    "evc.api.jobs",
    "evc.api.events",
    "evc.api.clusters",
    "evc.api.provision",
    "evc.api.fl",
    "evc.api.monitoring",
    "evc.api.models",
    "evc.api.deployments",
    "evc.api.inference",
    "evc.api.collab",
    "evc.api.recommend",
]

MAX_BODY = 1024 * 1024
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


class UploadRequest(Request):
    """A request whose multipart file parts go where a view said (``g.evc_upload_spool``, a
    factory of file objects: the model registry writes uploads once, into its blob store's
    temporary area, hashed as they arrive); else where Werkzeug puts them."""

    def _get_file_stream(
        self, total_content_length: int | None, content_type: str | None, filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:  # fmt: skip
        factory = g.get("evc_upload_spool")
        if factory is not None and filename is not None:
            return cast(IO[bytes], factory())
        return super()._get_file_stream(total_content_length, content_type, filename, content_length)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask("evc")
    app.request_class = UploadRequest
    app.config.update(
        API_TITLE="EVC — Edge Vision Cluster",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.1.0",
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL=docs_assets.ASSETS_URL,  # served by EVC itself: no CDN, works offline
        MAX_CONTENT_LENGTH=MAX_BODY,
        JSON_SORT_KEYS=False,
        API_SPEC_OPTIONS={
            "components": {
                "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            },
            "info": {"description": "Provision, monitor, deploy to and train on edge devices over SSH."},
        },
    )
    app.extensions["evc"] = {"settings": settings, "store": None, "celery": None}
    api = _Api(app, spec_kwargs={"marshmallow_plugin": _MarshmallowPlugin()})
    app.url_map.converters["id"] = IdConverter
    api.register_converter(IdConverter, lambda _: {"type": "string", "pattern": ID_PATTERN, "maxLength": 64})
    for mod in BLUEPRINTS:
        api.register_blueprint(importlib.import_module(mod).blp)
    app.register_blueprint(docs_assets.bp)
    from evc.api import ui  # the web console at /ui (server-rendered; its own error pages)

    app.register_blueprint(ui.bp)
    _errors(app)
    _audit(app)
    if settings.cors_origins:
        _cors(app, settings.cors_origins)
    return app


#: what every record id looks like (``dev_0123abcd...``, ``job_...``); anything else in an
#: ``<id:...>`` path segment (``:``, ``.``, ``/``...) is a 404 before any view or Redis key sees it
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class IdConverter(BaseConverter):
    """The ``id`` URL converter: a record id, or no match (404)."""

    regex = ID_PATTERN[1:-1]


class _Converter(OpenAPIConverter):
    """apispec's converter, plus the JSON Schema keywords a schema class declares in
    ``openapi_extra`` (e.g. ``oneOf`` for "give exactly one of", ``minProperties``) and a field in
    ``metadata={"openapi": {...}}`` (e.g. ``propertyNames`` for label keys): what the validators
    check that marshmallow's fields alone cannot say, so the document admits nothing they refuse."""

    def init_attribute_functions(self) -> None:
        super().init_attribute_functions()
        self.add_attribute_function(_field_openapi)

    def schema2jsonschema(self, schema: Any) -> dict[str, Any]:
        out: dict[str, Any] = super().schema2jsonschema(schema)
        extra = getattr(schema, "openapi_extra", None)
        if extra:
            out.update(copy.deepcopy(extra))
        return out


def _field_openapi(self: Any, field: Any, **kwargs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    key_field = getattr(field, "key_field", None)
    if isinstance(field, fields.Dict) and key_field is not None:  # what the keys' validators admit
        key = self.field2property(key_field)
        names = {k: key[k] for k in ("pattern", "minLength", "maxLength", "enum") if k in key}
        if names:
            out["propertyNames"] = names
    out.update(copy.deepcopy(field.metadata.get("openapi", {})))
    return out


class _MarshmallowPlugin(MarshmallowPlugin):
    Converter = _Converter


class _Api(Api):
    """flask-smorest's Api with EVC's error schema in the OpenAPI document."""

    from evc.api.schemas import ErrorSchema as ERROR_SCHEMA  # noqa: N811 - flask-smorest's hook name


def _error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    from http import HTTPStatus

    return {"code": status, "status": HTTPStatus(status).phrase, "message": message, **extra}


def _errors(app: Flask) -> None:
    @app.errorhandler(EVCError)
    def evc_error(exc: EVCError) -> Any:
        body = _error_body(exc.status, exc.message, error=exc.code)
        d = exc.to_dict()
        if "details" in d:
            body["details"] = d["details"]
        if "reason" in d:
            body["reason"] = d["reason"]
        resp = jsonify(body)
        resp.status_code = exc.status
        if exc.status == 429 and exc.details.get("retry_after"):
            resp.headers["Retry-After"] = str(exc.details["retry_after"])
        return resp

    @app.errorhandler(StoreUnavailable)
    def store_unavailable(exc: StoreUnavailable) -> Any:
        cause = exc.__cause__
        if not isinstance(cause, redis.RedisError):  # e.g. no Redis configured: its own message
            return evc_error(exc)
        log.error("Redis error on %s %s: %s", request.method, request.path, cause)
        return evc_error(StoreUnavailable(_STORE_DOWN))

    @app.errorhandler(redis.RedisError)
    def store_error(exc: redis.RedisError) -> Any:
        # a safety net: the store raises StoreUnavailable for outages; what reaches here is a
        # command Redis refused
        log.error("Redis error on %s %s: %s", request.method, request.path, exc)
        return evc_error(StoreUnavailable(_STORE_DOWN))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        extra: dict[str, Any] = {}
        data = getattr(exc, "data", None)
        message = exc.description or ""
        if status == 422 and data and "messages" in data:
            extra["errors"] = data["messages"]
            message = "invalid input: " + _flatten(data["messages"])
        elif status == 400 and "JSON" in (message or ""):
            message = "the body is not valid JSON (send Content-Type: application/json and UTF-8 JSON)"
        elif status == 413:
            # a blueprint that takes larger bodies (model uploads) says its own limit
            message = g.get("evc_body_limit") or f"the body is larger than {MAX_BODY} bytes"
        return jsonify(_error_body(status, message, **extra)), status

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):
            return http_error(exc)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(_error_body(500, f"internal error ({type(exc).__name__}); see the API log")), 500

    @app.errorhandler(RecursionError)
    def too_deep(exc: RecursionError) -> Any:
        return jsonify(_error_body(400, "the JSON body is nested too deeply")), 400

    @app.errorhandler(UnicodeDecodeError)
    def bad_utf8(exc: UnicodeDecodeError) -> Any:
        return jsonify(_error_body(400, "the body or query is not valid UTF-8")), 400


def _flatten(messages: Any, prefix: str = "") -> str:
    parts: list[str] = []
    if isinstance(messages, dict):
        for k, v in messages.items():
            if k in ("json", "query", "headers", "form") and not prefix:
                parts.append(_flatten(v, ""))
            else:
                parts.append(_flatten(v, f"{prefix}{k}."))
    elif isinstance(messages, list):
        parts.append(
            prefix.rstrip(".") + ": " + "; ".join(str(m) for m in messages) if prefix else "; ".join(map(str, messages))
        )
    else:
        parts.append(f"{prefix.rstrip('.')}: {messages}")
    return ", ".join(p for p in parts if p)


def _audit(app: Flask) -> None:
    """Every successful mutating call is audited in the request's unit of work."""
    from evc.api.deps import client_address, get_store, unit_of_work

    @app.after_request
    def commit(resp: Any) -> Any:
        pipe = getattr(g, "evc_pipe", None)
        if resp.status_code >= 400:
            if pipe is not None:
                pipe.reset()
            return resp
        method = request.method
        if method in MUTATING and not g.get("evc_no_audit"):
            p, view_args = getattr(g, "principal", None), request.view_args
            pipe = unit_of_work()
            get_store().audit(
                p.label if p else "anonymous",
                f"{method} {request.path}",
                target=view_args and next(iter(view_args.values()), "") or "",
                ip=client_address(),
                pipe=pipe,
                status=resp.status_code,
            )
        if pipe is not None:
            try:
                _execute(get_store(), pipe)
            except (StoreUnavailable, redis.RedisError) as exc:
                log.error("could not commit %s %s: %s", request.method, request.path, exc)
                body = _error_body(503, "EVC's store is unavailable; nothing was done, retry later")
                return app.response_class(json.dumps(body), status=503, mimetype="application/json")
            except EVCError as exc:  # a cached token revoked or changed since: what it gets now
                pipe.reset()
                resp = jsonify(_error_body(exc.status, exc.message, error=exc.code))
                resp.status_code = exc.status
                if exc.status == 429 and exc.details.get("retry_after"):
                    resp.headers["Retry-After"] = str(exc.details["retry_after"])
        return resp


def _execute(store: Any, pipe: Any) -> None:
    """Commit the request's unit of work: checking a token taken from the cache in the same
    round trip (:meth:`~evc.store.Store.commit_as_token`); when that check fails, the token is
    checked again from the store (raising what it now gets) and, if it passes, committed."""
    from evc.api.deps import recheck

    deferred = g.get("evc_deferred")
    if deferred is not None and store.commit_as_token(pipe, deferred.token_hash, deferred.token):
        return
    if deferred is not None:
        recheck(deferred)
    pipe.execute()


def _cors(app: Flask, origins: str) -> None:
    allowed = {o.strip() for o in origins.split(",") if o.strip()}

    @app.after_request
    def cors(resp: Any) -> Any:
        origin = request.headers.get("Origin")
        if origin and ("*" in allowed or origin in allowed):
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Idempotency-Key"
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, PATCH, DELETE"
        return resp
