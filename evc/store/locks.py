"""Coordination and small shared values: locks, rate counters, Celery queue lengths, JSON
values for features."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from evc.store import scripts
from evc.store._base import StoreBase, now


class LockStore(StoreBase):
    # ------------------------------------------------------------------ locks and counters
    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        return bool(self._redis.set(self.k("lock", name), owner, nx=True, px=int(ttl_s * 1000)))

    def refresh_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        key = self.k("lock", name)
        if self._redis.get(key) == owner.encode():
            return bool(self._redis.pexpire(key, int(ttl_s * 1000)))
        return False

    def take_over_lock(self, name: str, holder: str, owner: str, ttl_s: float) -> bool:
        """Give *owner* the lock that *holder* has (a stale attempt of the same job)."""
        return bool(
            self._script(scripts.TAKE_OVER)(keys=[self.k("lock", name)], args=[holder, owner, int(ttl_s * 1000)])
        )

    def release_lock(self, name: str, owner: str) -> bool:
        return bool(self._script(scripts.RELEASE)(keys=[self.k("lock", name)], args=[owner]))

    def lock_owner(self, name: str) -> str | None:
        v = self._redis.get(self.k("lock", name))
        return v.decode() if v else None

    def hit(self, name: str, window_s: int) -> int:
        """Count one event in a fixed window; returns the count so far."""
        key = self.k("count", name, str(int(now() // window_s)))
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, window_s * 2)
        return int(pipe.execute()[0])

    def hit_many(self, names: Sequence[str], window_s: int) -> list[int]:
        """:meth:`hit` for several counters in one round trip."""
        window = str(int(now() // window_s))
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            key = self.k("count", name, window)
            pipe.incr(key)
            pipe.expire(key, window_s * 2)
        return [int(n) for n in pipe.execute()[::2]]

    def count(self, name: str, window_s: int) -> int:
        v = self._redis.get(self.k("count", name, str(int(now() // window_s))))
        return int(v) if v else 0

    def incr(self, name: str) -> int:
        """Add one to the counter *name* (no window: it lasts); returns its value."""
        return int(self._redis.incr(self.k(name)))

    # ------------------------------------------------------------------ Celery queues
    def queue_lengths(self, queues: Iterable[str] = ("default", "ssh", "ansible", "fl")) -> dict[str, int]:
        """Messages waiting in each Celery queue (the broker shares this Redis)."""
        pipe = self._redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        return {q: int(n) for q, n in zip(queues, pipe.execute(), strict=True)}

    # ------------------------------------------------------------------ generic kv for features
    def put_json(self, name: str, value: Any, ttl_s: int | None = None) -> None:
        self._redis.set(self.k(name), json.dumps(value), ex=ttl_s)

    def get_json(self, name: str) -> Any:
        v = self._redis.get(self.k(name))
        return json.loads(v) if v is not None else None
