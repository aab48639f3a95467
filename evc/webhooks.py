"""The operator's webhook (``webhook_url``): one POST per batch of events, sent in the
background, best effort (a failure is logged, never raised)."""

from __future__ import annotations

import logging
import threading

from evc.model import JSON
from evc.settings import Settings

log = logging.getLogger(__name__)


def post(settings: Settings, body: JSON, name: str = "evc-webhook") -> threading.Thread | None:
    """POST *body* to the webhook on a daemon thread (returned); None when none is configured."""
    if not settings.webhook_url:
        return None
    t = threading.Thread(
        target=_post, args=(settings.webhook_url, settings.webhook_timeout_s, body), name=name, daemon=True
    )
    t.start()
    return t


def _post(url: str, timeout: float, body: JSON) -> None:
    import requests

    try:
        resp = requests.post(url, json=body, timeout=timeout)
        if resp.status_code >= 400:
            log.warning("webhook %s answered %s", url, resp.status_code)
    except requests.RequestException as exc:
        log.warning("webhook %s failed: %s", url, exc)
