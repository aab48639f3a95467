"""Inference serving: each device's load for the cluster endpoint (:mod:`evc.inference.routing`).

Keys (under the store prefix):

- ``infer-load:<deployment>``: hash, ``<device>:out`` -> requests in progress through EVC (an
  integer, shared by every API process), ``<device>:lat`` -> the recent latency in seconds (a
  moving average), ``<device>:fail`` -> when the device last failed a request (epoch seconds).
"""

from __future__ import annotations

from evc.store._base import StoreBase, now

#: a stale count (a process killed mid-request) never goes below zero, and expires with the key
LOAD_TTL_S = 3600


class InferenceStore(StoreBase):
    def infer_loads(self, deployment_id: str) -> dict[str, tuple[int, float | None, float | None]]:
        """Per device: (requests in progress, recent latency in s or None, last failure or None)."""
        raw = {k.decode(): v.decode() for k, v in self._redis.hgetall(self.k("infer-load", deployment_id)).items()}
        out: dict[str, tuple[int, float | None, float | None]] = {}
        for key in raw:
            dev, _, _ = key.rpartition(":")
            if dev not in out:
                lat, fail = raw.get(f"{dev}:lat"), raw.get(f"{dev}:fail")
                out[dev] = (
                    max(0, int(raw.get(f"{dev}:out", "0"))),
                    float(lat) if lat else None,
                    float(fail) if fail else None,
                )
        return out

    def infer_begin(self, deployment_id: str, device_id: str) -> None:
        key = self.k("infer-load", deployment_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, f"{device_id}:out", 1)
        pipe.expire(key, LOAD_TTL_S)
        pipe.execute()

    def infer_end(self, deployment_id: str, device_id: str, latency_s: float | None, alpha: float = 0.3) -> None:
        """A request ended: in progress down one; its latency into the average (None: it failed)."""
        key = self.k("infer-load", deployment_id)
        old = self._redis.hget(key, f"{device_id}:lat")
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, f"{device_id}:out", -1)
        if latency_s is None:
            pipe.hset(key, f"{device_id}:fail", repr(now()))
        else:
            lat = latency_s if old is None else alpha * latency_s + (1 - alpha) * float(old)
            pipe.hset(key, f"{device_id}:lat", repr(lat))
        pipe.execute()
