"""Deployments: a model version (or variant) running on devices (:mod:`evc.deployments`).

Keys (under the store prefix):

- ``deployment:<id>``: the deployment's record (one JSON value);
- ``deployments``: sorted set of deployment ids, by creation;
- ``deployment-devices:<id>``: hash, device id -> that device's state (JSON: ``state``
  pending|running|failed|removed, ``reason``, ``version``, ``sha256``, ``endpoint``);
- ``model-deployments:<name>:<version>``: the set of deployments of that version (or one of
  its variants): the model registry refuses to delete a version while it is not empty; after a
  rollout a deployment is in the sets of its version and of its ``previous`` one.
"""

from __future__ import annotations

import json
from typing import Any

from evc.errors import NotFound
from evc.store._base import ID_RE, JSON, StoreBase, now


class DeploymentStore(StoreBase):
    def create_deployment(self, rec: JSON) -> JSON:
        """Store a new deployment's record, its devices pending, and index it by model version."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self.k("deployment", rec["id"]), json.dumps(rec))
        pipe.zadd(self.k("deployments"), {rec["id"]: rec.get("created_at", now())})
        pipe.sadd(self.k("model-deployments", rec["model"], rec["version"]), rec["id"])
        pending = {"state": "pending", "reason": None, "updated_at": now()}
        for dev in rec["devices"]:
            pipe.hset(self.k("deployment-devices", rec["id"]), dev, json.dumps(pending))
        pipe.execute()
        return rec

    def get_deployment(self, deployment_id: str) -> JSON:
        raw = self._redis.get(self.k("deployment", deployment_id)) if ID_RE.match(deployment_id) else None
        if raw is None:
            raise NotFound(f"deployment {deployment_id} not found", id=deployment_id)
        return dict(json.loads(raw))

    def update_deployment(self, deployment_id: str, **changes: Any) -> JSON:
        rec = {**self.get_deployment(deployment_id), **changes, "updated_at": now()}
        self._redis.set(self.k("deployment", deployment_id), json.dumps(rec), xx=True)
        return rec

    def deployment_ids(self, offset: int = 0, limit: int | None = None) -> tuple[list[str], int]:
        key = self.k("deployments")
        end = -1 if limit is None else offset + limit - 1
        return [i.decode() for i in self._redis.zrange(key, offset, end)], int(self._redis.zcard(key))

    def deployment_records(self) -> list[JSON]:
        """Every deployment's record (one MGET)."""
        ids, _ = self.deployment_ids()
        raws = self._redis.mget([self.k("deployment", i) for i in ids]) if ids else []
        return [dict(json.loads(r)) for r in raws if r is not None]

    def set_deployment_device(self, deployment_id: str, device_id: str, state: JSON) -> None:
        value = json.dumps({**state, "updated_at": now()})
        self._redis.hset(self.k("deployment-devices", deployment_id), device_id, value)

    def deployment_devices(self, deployment_id: str) -> dict[str, JSON]:
        raw = self._redis.hgetall(self.k("deployment-devices", deployment_id))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def delete_deployment(self, deployment_id: str) -> None:
        rec = self.get_deployment(deployment_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.k("deployment", deployment_id), self.k("deployment-devices", deployment_id))
        pipe.zrem(self.k("deployments"), deployment_id)
        for version in {rec["version"], (rec.get("previous") or {}).get("version") or rec["version"]}:
            pipe.srem(self.k("model-deployments", rec["model"], version), deployment_id)
        pipe.execute()

    def index_deployment_versions(self, deployment_id: str, model: str, keep: set[str], drop: set[str]) -> None:
        """A rollout's versions: the deployment holds *keep* (its version and the previous one,
        for a rollback) and no longer *drop* (the registry may delete those again)."""
        pipe = self._redis.pipeline(transaction=True)
        for version in drop - keep:
            pipe.srem(self.k("model-deployments", model, version), deployment_id)
        for version in keep:
            pipe.sadd(self.k("model-deployments", model, version), deployment_id)
        pipe.execute()

    def model_deployments(self, name: str, version: str) -> set[str]:
        """The deployments of model *name* at *version* (any of its variants)."""
        return {i.decode() for i in self._redis.smembers(self.k("model-deployments", name, version))}
