"""Profiling and recommendation events for the webhook (``settings.webhook_url``), as
deployment events are sent (:mod:`evc.deployments.events`): one JSON body per batch,
``{"type": "recommend", "text": "<one line per event>", "events": [...]}``, posted in the
background, best effort.

Events: ``profile.device`` (a device measured, or why not), ``profile.finished`` (the job's
summary), ``calibration.finished``, ``recommendation.changed`` (a device's recommended variant
would change; also written to the fleet event log: the operator decides whether to roll out).
"""

from __future__ import annotations

import logging
import threading

from evc import webhooks
from evc.model import JSON
from evc.settings import Settings

log = logging.getLogger(__name__)

PROFILE_DEVICE = "profile.device"
PROFILE_FINISHED = "profile.finished"
CALIBRATION_FINISHED = "calibration.finished"
RECOMMENDATION_CHANGED = "recommendation.changed"


def line(e: JSON) -> str:
    kind = e.get("event")
    if kind == RECOMMENDATION_CHANGED:
        return (f"model {e.get('model')} on {e.get('name') or e.get('device')}: recommended variant "
                f"{e.get('from') or 'none'} -> {e.get('to') or 'none'} ({e.get('why')})")  # fmt: skip
    if kind == PROFILE_DEVICE:
        return f"profile {e.get('job')} on {e.get('name') or e.get('device')}: {e.get('state')}" + (
            f" ({e['reason']})" if e.get("reason") else ""
        )
    return f"{kind} {e.get('job')}: {e.get('summary')}"


def webhook_body(events: list[JSON]) -> JSON:
    return {"type": "recommend", "text": "\n".join(line(e) for e in events), "events": events}


def publish(settings: Settings, events: list[JSON], wait: bool = True) -> threading.Thread | None:
    """POST *events* to the webhook in the background (best effort); joined for at most the
    webhook's timeout when *wait* (a short-lived worker would drop it)."""
    if not events:
        return None
    t = webhooks.post(settings, webhook_body(events), "evc-recommend-webhook")
    if t is not None and wait:
        t.join(settings.webhook_timeout_s + 1)
    return t
