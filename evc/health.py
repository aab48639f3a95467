"""Device health: heartbeats pushed by devices, and the state machine they feed."""

from __future__ import annotations

from evc.settings import Settings
from evc.store import JSON, Store, now


def record_heartbeat(store: Store, settings: Settings, device_id: str, data: JSON) -> JSON:
    """A device said it is alive: it is online again, with the metrics it sent."""
    dev = store.get_device(device_id)
    changes: JSON = {"last_seen": now(), "health": {**data, "source": "heartbeat", "at": now(), "misses": 0}}
    if dev.get("state") in ("offline", "degraded", "unreachable"):
        changes["state"] = "online"
        store.log_event({"type": "device.state", "device": device_id, "from": dev["state"], "to": "online",
                         "reason": "heartbeat"})
    return store.update_device(device_id, **changes)
