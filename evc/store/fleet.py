"""Logs and fleet-wide records: the audit log, the fleet event log, health sweeps' bulk
reads and writes of devices."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from evc.store import scripts
from evc.store._base import DEVICE, JSON, StoreBase, _dump, now
from evc.store.sessions import HEALTH_HISTORY, health_sample


class FleetLogStore(StoreBase):
    # ------------------------------------------------------------------ audit log
    def audit(
        self, actor: str, action: str, target: str = "", ip: str = "", *, pipe: Any = None, **details: Any
    ) -> None:
        rec = {"ts": now(), "actor": actor, "action": action, "target": target, "ip": ip}
        if details:
            rec["details"] = details
        p = pipe if pipe is not None else self._redis.pipeline(transaction=False)
        p.lpush(self.k("audit"), json.dumps(rec))
        p.ltrim(self.k("audit"), 0, self.settings.audit_history - 1)
        if pipe is None:
            p.execute()

    def audit_log(self, offset: int = 0, limit: int = 50) -> tuple[list[JSON], int]:
        raw = self._redis.lrange(self.k("audit"), offset, offset + limit - 1)
        return [json.loads(x) for x in raw], int(self._redis.llen(self.k("audit")))

    # ------------------------------------------------------------------ fleet event log
    def log_event(self, event: JSON) -> None:
        """A fleet event (device state change, membership...), newest first, capped."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.lpush(self.k("events"), json.dumps({"ts": now(), **event}))
        pipe.ltrim(self.k("events"), 0, self.settings.audit_history - 1)
        pipe.execute()

    def fleet_events(self, limit: int = 10_000) -> list[JSON]:
        return [json.loads(x) for x in self._redis.lrange(self.k("events"), 0, limit - 1)]

    # ------------------------------------------------------------------ health (evc.health)
    # Bulk writes of a health sweep and reads of the fleet event log.

    def record_health(self, changes: dict[str, JSON], events: Iterable[JSON] = ()) -> int:
        """Apply per-device field changes and append fleet events in ONE pipelined round trip.

        A device removed meanwhile is skipped, never re-created. Returns how many were updated."""
        script = self._script(scripts.HSET_EXISTING)
        events = list(events)
        pipe = self._redis.pipeline(transaction=False)
        for device_id, fields in changes.items():
            args = [x for kv in _dump(fields).items() for x in kv]
            script(keys=[self.k("device", device_id)], args=args, client=pipe)
        for device_id, fields in changes.items():  # the console's sparklines (evc.store.sessions)
            sample = health_sample(device_id, fields)
            if sample is not None:
                pipe.lpush(self.k("health-history", device_id), json.dumps(sample))
                pipe.ltrim(self.k("health-history", device_id), 0, HEALTH_HISTORY - 1)
        if events:
            t = now()
            pipe.lpush(self.k("events"), *[json.dumps({"ts": t, **e}) for e in events])
            pipe.ltrim(self.k("events"), 0, self.settings.audit_history - 1)
        out = pipe.execute()
        return sum(1 for x in out[: len(changes)] if x == 1)

    def device_fields(self, ids: Iterable[str] | None, fields: Sequence[str]) -> list[JSON]:
        """Only *fields* of each device (every device when *ids* is None), in one round trip:
        a sweep of 1,000 devices need not decode their facts. Missing devices are left out."""
        ids = list(self._ids(DEVICE, newest_first=False)) if ids is None else list(ids)
        names = ["id", *(f for f in fields if f != "id")]
        pipe = self._redis.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(self.k("device", i), names)
        out = []
        for values in pipe.execute():
            if values[0] is None:
                continue
            out.append({n: json.loads(v) for n, v in zip(names, values, strict=True) if v is not None})
        return out

    def fleet_event_page(
        self,
        offset: int = 0,
        limit: int = 50,
        match: Callable[[JSON], bool] | None = None,
        since: float | None = None,
    ) -> tuple[list[JSON], int]:
        """Fleet events newest first: one page of those that match and are not older than
        *since*, and how many match in all."""
        key, batch = self.k("events"), 1000
        if match is None and since is None:
            raw = self._redis.lrange(key, offset, offset + limit - 1)
            return [json.loads(x) for x in raw], int(self._redis.llen(key))
        items: list[JSON] = []
        total, start = 0, 0
        while True:
            chunk = self._redis.lrange(key, start, start + batch - 1)
            for x in chunk:
                ev = json.loads(x)
                if since is not None and float(ev.get("ts", 0)) < since:
                    return items, total  # newest first: everything after is older
                if match is None or match(ev):
                    if offset <= total < offset + limit:
                        items.append(ev)
                    total += 1
            if len(chunk) < batch:
                return items, total
            start += batch
