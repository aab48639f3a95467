"""Profiles, calibrations and recommendations (:mod:`evc.recommend`).

Keys (under the store prefix):

- ``profile:<sha256>:<device>:<runtime>``: a variant measured on a device (one JSON value:
  ``batches`` {batch: figures}, ``peak_rss_bytes``, ``load``, ``facts`` fingerprint, ``at``);
- ``profiles``: the set of those keys' suffixes ``<sha256>:<device>:<runtime>``;
- ``calibration:<device>``: the device's calibration (coefficients, CPU quota, ``facts``);
- ``graph-features:<sha256>``: a model file's cost features (they never change);
- ``recommend-watch``: hash, model name -> the last recommendation asked for it (constraints
  and the variant chosen per device), which the fleet follower re-evaluates.

A profile or calibration whose ``facts`` fingerprint is not the device's current one has
expired: the readers leave it out (and :meth:`ProfileStore.expire_device` removes them).
"""

from __future__ import annotations

import json
from typing import Any

from evc.store._base import JSON, StoreBase


def _suffix(sha256: str, device: str, runtime: str) -> str:
    return f"{sha256}:{device}:{runtime}"


class ProfileStore(StoreBase):
    def put_profile(self, sha256: str, device: str, runtime: str, rec: JSON) -> None:
        suffix = _suffix(sha256, device, runtime)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self.k("profile", suffix), json.dumps({**rec, "sha256": sha256, "device": device, "runtime": runtime}))
        pipe.sadd(self.k("profiles"), suffix)
        pipe.execute()

    def profiles(self, device: str | None = None, sha256: str | None = None) -> list[JSON]:
        """Stored profiles (of *device*, of *sha256*, or all)."""
        suffixes = sorted(x.decode() for x in self._redis.smembers(self.k("profiles")))
        keep = [s for s in suffixes if (sha256 is None or s.split(":")[0] == sha256)
                and (device is None or s.split(":")[1] == device)]  # fmt: skip
        if not keep:
            return []
        raw = self._redis.mget([self.k("profile", s) for s in keep])
        return [json.loads(r) for r in raw if r is not None]

    def delete_profile(self, sha256: str, device: str, runtime: str) -> None:
        suffix = _suffix(sha256, device, runtime)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.k("profile", suffix))
        pipe.srem(self.k("profiles"), suffix)
        pipe.execute()

    def put_calibration(self, device: str, rec: JSON) -> None:
        self._redis.set(self.k("calibration", device), json.dumps({**rec, "device": device}))

    def calibration(self, device: str) -> JSON | None:
        raw = self._redis.get(self.k("calibration", device))
        return json.loads(raw) if raw is not None else None

    def calibrations(self, devices: list[str]) -> dict[str, JSON]:
        if not devices:
            return {}
        raw = self._redis.mget([self.k("calibration", d) for d in devices])
        return {d: json.loads(r) for d, r in zip(devices, raw, strict=True) if r is not None}

    def expire_device(self, device: str, fingerprint: str) -> int:
        """Remove the device's profiles and calibration measured under other facts; how many."""
        gone = 0
        for p in self.profiles(device=device):
            if p.get("facts") != fingerprint:
                self.delete_profile(p["sha256"], device, p["runtime"])
                gone += 1
        cal = self.calibration(device)
        if cal is not None and cal.get("facts") != fingerprint:
            self._redis.delete(self.k("calibration", device))
            gone += 1
        return gone

    def graph_features(self, sha256: str) -> dict[str, float] | None:
        raw = self._redis.get(self.k("graph-features", sha256))
        return json.loads(raw) if raw is not None else None

    def put_graph_features(self, sha256: str, features: dict[str, float]) -> None:
        self._redis.set(self.k("graph-features", sha256), json.dumps(features))

    def watch_recommendation(self, model: str, rec: JSON) -> None:
        self._redis.hset(self.k("recommend-watch"), model, json.dumps(rec))

    def recommendation_watches(self) -> dict[str, Any]:
        raw = self._redis.hgetall(self.k("recommend-watch"))
        return {k.decode(): json.loads(v) for k, v in raw.items()}
