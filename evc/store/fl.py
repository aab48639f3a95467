"""Federated learning: where each FL job's rounds stand, round outcomes and updates, round
records, late results, the active FL jobs."""

from __future__ import annotations

import json
from typing import Any

from evc.model import JSON, FLState
from evc.store import scripts
from evc.store._base import FL_STATE, StoreBase, _dump, _load, now


class FLStore(StoreBase):
    # One hash per FL job says where its rounds stand (round, token, phase, deadline, selected).
    # Each round attempt has a token; its outcomes and updates are hashes keyed by device, written
    # together and first-write-wins, so a redelivered training task is a no-op. Round records and
    # late results are kept per job; ``fl:active`` lists the jobs a worker start should check.

    def fl_state(self, job_id: str) -> FLState | None:
        """Where an FL job's rounds stand, or None before its first start."""
        raw = self._redis.hgetall(self.k("fl", job_id))
        return FL_STATE.record(_load(raw)) if raw else None

    def fl_init(self, job_id: str, state: FLState) -> None:
        """Replace the job's FL state (a start or resume) and list the job as active."""
        fields: dict[str | bytes, bytes | float | int | str] = {k: v for k, v in _dump(state).items()}
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.k("fl", job_id))
        pipe.hset(self.k("fl", job_id), mapping=fields)
        pipe.sadd(self.k("fl", "active"), job_id)
        pipe.execute()

    def fl_cas(self, job_id: str, expect: dict[str, list[Any]], **changes: Any) -> bool:
        """Apply *changes* to the job's FL state only if each field in *expect* has one of the
        values listed (atomic). An empty *changes* only tests."""
        enc = {f: [json.dumps(v, separators=(",", ":")) for v in vals] for f, vals in expect.items()}
        args: list[Any] = [json.dumps(enc)]
        for k, v in _dump(changes).items():
            args += [k, v]
        script = self._script(scripts.FL_CAS)
        return bool(script(keys=[self.k("fl", job_id)], args=args))

    def fl_record_outcome(self, job_id: str, token: str, device_id: str, outcome: JSON, update: str | None) -> str:
        """Store a device's outcome (and its base64 update) for round attempt *token*:
        ``stored``, ``duplicate`` (one is there already) or ``late`` (the round is not training)."""
        script = self._script(scripts.FL_OUTCOME)
        res = script(
            keys=[self.k("fl", job_id), self.k("fl", job_id, token, "outcomes"),
                  self.k("fl", job_id, token, "updates")],
            args=[json.dumps(token), device_id, json.dumps(outcome), update or ""],
        )  # fmt: skip
        return res.decode() if isinstance(res, bytes) else str(res)

    def fl_outcomes(self, job_id: str, token: str) -> dict[str, JSON]:
        """Every outcome recorded for round attempt *token*, by device."""
        return _load(self._redis.hgetall(self.k("fl", job_id, token, "outcomes")))

    def fl_has_outcome(self, job_id: str, token: str, device_id: str) -> bool:
        return bool(self._redis.hexists(self.k("fl", job_id, token, "outcomes"), device_id))

    def fl_update(self, job_id: str, token: str, device_id: str) -> str | None:
        """One device's update (base64 ``.npz``), read one at a time by the aggregation."""
        raw = self._redis.hget(self.k("fl", job_id, token, "updates"), device_id)
        return raw.decode() if raw is not None else None

    def fl_drop_round(self, job_id: str, token: str) -> None:
        """Forget a round attempt's outcomes and updates (after its checkpoint, or a discard)."""
        self._redis.delete(self.k("fl", job_id, token, "outcomes"), self.k("fl", job_id, token, "updates"))

    def fl_put_round(self, job_id: str, round: int, record: JSON) -> None:
        """The record of a closed round (metrics, participants, failures)."""
        self._redis.hset(self.k("fl", job_id, "rounds"), str(round), json.dumps(record))

    def fl_rounds(self, job_id: str) -> list[JSON]:
        """Closed-round records, in round order."""
        raw = self._redis.hgetall(self.k("fl", job_id, "rounds"))
        return [json.loads(raw[k]) for k in sorted(raw, key=int)]

    def fl_add_late(self, job_id: str, record: JSON) -> None:
        """A result that came after its round closed: discarded, and kept here (capped)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.rpush(self.k("fl", job_id, "late"), json.dumps({"ts": now(), **record}))
        pipe.ltrim(self.k("fl", job_id, "late"), -1000, -1)
        pipe.execute()

    def fl_late(self, job_id: str) -> list[JSON]:
        return [json.loads(x) for x in self._redis.lrange(self.k("fl", job_id, "late"), 0, -1)]

    def fl_active_jobs(self) -> list[str]:
        """FL jobs that may have rounds in flight (started and not yet finished)."""
        return sorted(m.decode() for m in self._redis.smembers(self.k("fl", "active")))

    def fl_deactivate(self, job_id: str) -> None:
        self._redis.srem(self.k("fl", "active"), job_id)
