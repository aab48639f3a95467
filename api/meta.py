"""Unauthenticated endpoints: EVC's SSH public key, liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import time
from typing import Any

from evc.api.deps import get_sender, get_settings, get_store
from evc.api.schemas import SSHKeyArgs, SSHKeySchema
from flask import Response, current_app
from flask_smorest import Blueprint

from evc import keys

blp = Blueprint("meta", __name__, description="EVC's public key, health and metrics")
_ready_cache: dict[str, Any] = {"at": 0.0, "workers": 0}


@blp.route("/api/v1/ssh-key")
@blp.arguments(SSHKeyArgs, location="query")
@blp.response(200, SSHKeySchema)
def ssh_key(args: dict[str, Any]) -> Any:
    """EVC's SSH public key (no authentication: anyone may fetch it).

    `?format=text` gives the bare authorized_keys line; `?format=sh` a script that installs it
    for the account that runs it (`curl -s URL?format=sh | sh`)."""
    pub = keys.public_key(get_settings())
    cmd = keys.install_command(pub)
    if args["format"] == "text":
        return Response(pub + "\n", mimetype="text/plain")
    if args["format"] == "sh":
        return Response(
            "#!/bin/sh\nset -e\n" + cmd + "\necho 'EVC key installed for '\"$(id -un)\"\n",
            mimetype="text/x-shellscript",
        )
    import asyncssh

    fp = asyncssh.import_public_key(pub).get_fingerprint()
    return {"public_key": pub, "install_command": cmd, "fingerprint": fp}


@blp.route("/healthz")
@blp.response(200)
def healthz() -> Any:
    """Liveness: the API process answers (with the instance id `evc up` gave it, if any)."""
    instance = get_settings().instance_id
    return {"status": "ok", "instance": instance} if instance else {"status": "ok"}


@blp.route("/readyz")
@blp.response(200)
@blp.alt_response(503)
def readyz() -> Any:
    """Readiness: this API can serve (its Redis answers): 200, else 503 with the reason.

    `workers` reports how many workers answered a ping (cached a few seconds): information
    for operators, it never changes the status code (jobs wait in the queue for a worker)."""
    out: dict[str, Any] = {"redis": False, "workers": None}
    try:
        out["redis"] = get_store().ping()
    except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
        out["error"] = str(exc)
    if out["redis"]:
        if time.monotonic() - _ready_cache["at"] > 5 or not _ready_cache["workers"]:
            try:
                replies = get_sender().control.ping(timeout=0.5) or []
            except Exception:  # noqa: BLE001
                replies = []
            _ready_cache.update(at=time.monotonic(), workers=len(replies))
        out["workers"] = _ready_cache["workers"]
    ok = bool(out["redis"])
    out["status"] = "ready" if ok else "not ready"
    return out, 200 if ok else 503


@blp.route("/metrics")
def metrics() -> Response:
    """Prometheus metrics of EVC (API, workers in multiprocess mode, fleet state)."""
    from evc.api import metrics_view

    return metrics_view.exposition(get_store(), current_app)
