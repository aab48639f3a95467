"""Console sessions (server-side, keyed by the hash of the cookie's secret) and the short
per-device health history the console's sparklines draw."""

from __future__ import annotations

import json

from evc.store._base import JSON, StoreBase, _dump, _load

#: health samples kept per device (one per sweep or heartbeat)
HEALTH_HISTORY = 60


class SessionStore(StoreBase):
    # ------------------------------------------------------------------ console sessions
    def create_session(self, sid_hash: str, rec: JSON, ttl_s: int) -> None:
        """A console session that expires *ttl_s* after its last use."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.k("session", sid_hash), mapping=_dump(rec))
        pipe.expire(self.k("session", sid_hash), ttl_s)
        pipe.execute()

    def get_session(self, sid_hash: str, ttl_s: int) -> JSON | None:
        """The session (its expiry pushed back by *ttl_s*), or None."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self.k("session", sid_hash))
        pipe.expire(self.k("session", sid_hash), ttl_s)
        raw, _ = pipe.execute()
        return _load(raw) if raw else None

    def delete_session(self, sid_hash: str) -> None:
        self._redis.delete(self.k("session", sid_hash))

    # ------------------------------------------------------------------ health history
    def health_history(self, device_ids: list[str]) -> dict[str, list[JSON]]:
        """Each device's recent health samples, oldest first (one round trip)."""
        pipe = self._redis.pipeline(transaction=False)
        for d in device_ids:
            pipe.lrange(self.k("health-history", d), 0, HEALTH_HISTORY - 1)
        return {d: [json.loads(x) for x in reversed(raw)] for d, raw in zip(device_ids, pipe.execute(), strict=True)}


def health_sample(device_id: str, fields: JSON) -> JSON | None:
    """The sample a device's health change adds to its history (None: no health in it)."""
    h = fields.get("health")
    if not isinstance(h, dict) or "checked_at" not in h:
        return None
    return {
        "ts": h.get("checked_at"),
        "load1": h.get("load1"),
        "mem": h.get("mem_used_ratio"),
        "ok": not h.get("error"),
        "state": fields.get("state"),
    }
