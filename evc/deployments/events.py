"""Deployment events for the webhook (``settings.webhook_url``, as device state changes are).

The ``deploy`` and ``deploy-remove`` tasks call :func:`around_job` around the job bodies: it reads
the deployment and its per-device states before the body runs and after it ended (however it
ended), and POSTs what changed, in the background and best effort, as one JSON body per batch::

    {"type": "deployment", "text": "<one line per event>", "events": [...]}

Each event has ``event`` (``deployment.started``, ``deployment.device``, ``deployment.removed``),
``deployment``, ``model``, ``version`` (the version served), ``at``; device events add
``device``, ``name``, ``state`` (running, failed, rolled_back, removed, ...), ``reason`` and
``endpoint``; events after a deploy job add the deployment's ``deployment_state``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from evc import webhooks
from evc.errors import NotFound
from evc.model import JSON
from evc.settings import Settings
from evc.store import now

log = logging.getLogger(__name__)
T = TypeVar("T")

STARTED = "deployment.started"
DEVICE = "deployment.device"
REMOVED = "deployment.removed"


class EventStore(Protocol):
    def get_deployment(self, deployment_id: str) -> Mapping[str, Any]: ...

    def deployment_devices(self, deployment_id: str) -> Mapping[str, Mapping[str, Any]]: ...

    def device_fields(self, ids: Any, fields: Any) -> list[JSON]: ...


def _snapshot(store: EventStore, deployment_id: str) -> tuple[JSON | None, dict[str, JSON]]:
    try:
        return dict(store.get_deployment(deployment_id)), {
            k: dict(v) for k, v in store.deployment_devices(deployment_id).items()
        }
    except NotFound:
        return None, {}


def _base(dep: Mapping[str, Any], event: str, at: float) -> JSON:
    return {
        "event": event,
        "deployment": dep.get("id"),
        "model": dep.get("model"),
        "version": dep.get("served_version") or dep.get("version"),
        "at": at,
    }


def changes(
    kind: str,
    before: tuple[JSON | None, Mapping[str, JSON]],
    after: tuple[JSON | None, Mapping[str, JSON]],
    names: Mapping[str, str],
    at: float | None = None,
) -> list[JSON]:
    """The events of a ``deploy`` or ``deploy-remove`` job (*kind*) from the deployment and its
    device states *before* and *after* the job body (pure)."""
    at = now() if at is None else at
    dep_before, states_before = before
    dep_after, states_after = after
    dep = dep_after or dep_before
    if dep is None:
        return []
    events: list[JSON] = []
    for device_id in sorted(states_after, key=lambda d: names.get(d, d)):
        st = states_after[device_id]
        old = states_before.get(device_id) or {}
        if st.get("state") == old.get("state") and st.get("updated_at") == old.get("updated_at"):
            continue
        if st.get("state") == "pending":
            continue
        ev = {**_base(dep, DEVICE, at), "device": device_id, "name": names.get(device_id, device_id)}
        ev.update({"state": st.get("state"), "reason": st.get("reason"), "endpoint": st.get("endpoint")})
        if st.get("version"):
            ev["version"] = st["version"]
        events.append(ev)
    if kind == "deploy" and dep_after is not None:
        for ev in events:
            ev["deployment_state"] = dep_after.get("state")
    if kind == "deploy-remove" and dep_before is not None and dep_after is None:
        events.append(_base(dep_before, REMOVED, at))
    return events


def webhook_body(events: list[JSON]) -> JSON:
    """One POST per batch: a Slack-style ``text`` line per event and the events."""

    def line(e: JSON) -> str:
        what = f"deployment {e['deployment']} ({e['model']}:{e['version']})"
        if e["event"] == DEVICE:
            reason = f" ({e['reason']})" if e.get("reason") else ""
            return f"{what} on {e.get('name') or e.get('device')}: {e.get('state')}{reason}"
        return f"{what}: {e['event'].split('.', 1)[1]}"

    return {"type": "deployment", "text": "\n".join(line(e) for e in events), "events": events}


def publish(settings: Settings, events: list[JSON]) -> threading.Thread | None:
    """POST *events* to the webhook in the background (best effort); None when there is nothing
    to send or no webhook."""
    if not events:
        return None
    return webhooks.post(settings, webhook_body(events), "evc-deployment-webhook")


def around_job(store: EventStore, settings: Settings, kind: str, deployment_id: str, body: Callable[[], T]) -> T:
    """Run a job *body* of *kind* (``deploy`` or ``deploy-remove``) on *deployment_id*, posting
    ``deployment.started`` first (deploy) and what changed after it, however it ended. The
    threads are joined for at most the webhook's timeout, so that a short-lived worker process
    does not drop them."""
    threads: list[threading.Thread | None] = []
    before = _snapshot(store, deployment_id)
    if kind == "deploy" and before[0] is not None:
        threads.append(publish(settings, [_base(before[0], STARTED, now())]))
    try:
        return body()
    finally:
        try:
            after = _snapshot(store, deployment_id)
            ids = sorted(set(before[1]) | set(after[1]))
            names = {str(d["id"]): str(d.get("name") or d["id"]) for d in store.device_fields(ids, ("name",)) if d}
            threads.append(publish(settings, changes(kind, before, after, names)))
        except Exception:  # noqa: BLE001 - events never change how a job ends
            log.exception("deployment events of %s were not sent", deployment_id)
        for t in threads:
            if t is not None:
                t.join(settings.webhook_timeout_s + 1)


__all__ = ["DEVICE", "REMOVED", "STARTED", "around_job", "changes", "publish", "webhook_body"]
