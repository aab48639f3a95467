"""Clusters: records, their name index and memberships (a device is in one cluster at most)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from evc.errors import Conflict
from evc.model import Cluster
from evc.store._base import CLUSTER, StoreBase


class ClusterStore(StoreBase):
    def create_cluster(self, cl: Cluster) -> Cluster:
        if not self._redis.set(self.k("cluster-name", cl["name"]), cl["id"], nx=True):
            raise Conflict(f"a cluster named {cl['name']!r} exists", field="name")
        self._put(CLUSTER, cl)
        return cl

    def get_cluster(self, cluster_id: str) -> Cluster:
        return self._get(CLUSTER, cluster_id)

    def update_cluster(self, cluster_id: str, **changes: Any) -> Cluster:
        return self._update(CLUSTER, cluster_id, changes)

    def list_clusters(
        self, offset: int = 0, limit: int = 50, match: Callable[[Cluster], bool] | None = None
    ) -> tuple[list[Cluster], int]:
        return self._page(CLUSTER, offset, limit, match, newest_first=False)

    def delete_cluster(self, cluster_id: str) -> Cluster:
        cl = self.get_cluster(cluster_id)
        self._delete(CLUSTER, cluster_id, self.k("cluster-name", cl["name"]), self.k("cluster", cluster_id, "members"))
        return cl

    def rename_cluster(self, cluster_id: str, old: str, new: str) -> None:
        if not self._redis.set(self.k("cluster-name", new), cluster_id, nx=True):
            raise Conflict(f"a cluster named {new!r} exists", field="name")
        self._redis.delete(self.k("cluster-name", old))

    def claim_membership(self, cluster_id: str, device_id: str) -> str | None:
        """Make *device_id* a member of *cluster_id*; returns the cluster that already holds it
        (a device belongs to at most one cluster), or None when the claim succeeded."""
        key = self.k("device-cluster", device_id)
        if not self._redis.set(key, cluster_id, nx=True):
            holder = self._redis.get(key)
            held = holder.decode() if holder else None
            return None if held == cluster_id else held
        pipe = self._redis.pipeline(transaction=True)
        pipe.sadd(self.k("cluster", cluster_id, "members"), device_id)
        pipe.hset(self.k("device", device_id), "cluster_id", json.dumps(cluster_id))
        pipe.execute()
        return None

    def release_membership(self, cluster_id: str, device_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.srem(self.k("cluster", cluster_id, "members"), device_id)
        pipe.delete(self.k("device-cluster", device_id))
        pipe.hset(self.k("device", device_id), "cluster_id", json.dumps(None))
        pipe.execute()

    def cluster_members(self, cluster_id: str) -> list[str]:
        return sorted(m.decode() for m in self._redis.smembers(self.k("cluster", cluster_id, "members")))
