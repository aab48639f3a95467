"""The model registry's records: model versions, their variants, and which records reference
each stored blob (:mod:`evc.models` owns the blobs themselves, on disk).

Keys (under the store prefix):

- ``model-names``: sorted set of model names, scored by their first version's creation;
- ``model:<name>:versions``: sorted set of a model's versions, by creation;
- ``model-version:<name>:<version>``: the version's record (one JSON value, written once:
  versions are immutable);
- ``model-variants:<name>:<version>``: sorted set of the version's variant names;
- ``model-variant:<name>:<version>:<variant>``: a variant's record (written once);
- ``model-blob-refs:<sha256>``: the set of records (``name:version[:variant]``, ``eval-set``)
  that use the blob with that digest; an unreferenced blob may be removed;
- ``eval-sets``: hash, sha256 -> the evaluation set's record (JSON: ``sha256``, ``size``,
  ``dataset``, ``storage``, ``created_at``, ``created_by``).

Names, versions and variants never hold ``:`` (:data:`evc.models.registry.NAME_RE`).
"""

from __future__ import annotations

import json
from typing import Any

from evc.store._base import JSON, StoreBase, now


class ModelStore(StoreBase):
    # ------------------------------------------------------------------ versions
    def create_model_version(self, rec: JSON) -> tuple[JSON, bool]:
        """Store a version's record unless one exists: returns (the stored record, created)."""
        name, version = rec["name"], rec["version"]
        key = self.k("model-version", name, version)
        if self._redis.set(key, json.dumps(rec), nx=True):
            pipe = self._redis.pipeline(transaction=True)
            pipe.zadd(self.k("model-names"), {name: rec.get("created_at", now())}, nx=True)
            pipe.zadd(self.k("model", name, "versions"), {version: rec.get("created_at", now())})
            pipe.execute()
            return rec, True
        return self._load_json(key) or rec, False

    def get_model_version(self, name: str, version: str) -> JSON | None:
        return self._load_json(self.k("model-version", name, version))

    def model_versions(self, name: str) -> list[JSON]:
        """Every version of *name*, oldest first."""
        versions = [v.decode() for v in self._redis.zrange(self.k("model", name, "versions"), 0, -1)]
        return self._load_many([self.k("model-version", name, v) for v in versions])

    def model_names(self, offset: int = 0, limit: int | None = None) -> tuple[list[str], int]:
        key = self.k("model-names")
        end = -1 if limit is None else offset + limit - 1
        return [n.decode() for n in self._redis.zrange(key, offset, end)], int(self._redis.zcard(key))

    def delete_model_version(self, name: str, version: str) -> list[JSON]:
        """Remove a version and its variants; returns the removed records (version first)."""
        rec = self.get_model_version(name, version)
        if rec is None:
            return []
        variants = self.model_variants(name, version)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.k("model-version", name, version), self.k("model-variants", name, version))
        for v in variants:
            pipe.delete(self.k("model-variant", name, version, v["variant"]))
        pipe.zrem(self.k("model", name, "versions"), version)
        pipe.execute()
        if not self._redis.zcard(self.k("model", name, "versions")):
            self._redis.zrem(self.k("model-names"), name)
        return [rec, *variants]

    # ------------------------------------------------------------------ variants
    def create_model_variant(self, rec: JSON) -> tuple[JSON, bool]:
        """Store a variant's record unless one exists: returns (the stored record, created)."""
        name, version, variant = rec["name"], rec["version"], rec["variant"]
        key = self.k("model-variant", name, version, variant)
        if self._redis.set(key, json.dumps(rec), nx=True):
            self._redis.zadd(self.k("model-variants", name, version), {variant: rec.get("created_at", now())})
            return rec, True
        return self._load_json(key) or rec, False

    def delete_model_variant(self, name: str, version: str, variant: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.k("model-variant", name, version, variant))
        pipe.zrem(self.k("model-variants", name, version), variant)
        pipe.execute()

    def get_model_variant(self, name: str, version: str, variant: str) -> JSON | None:
        return self._load_json(self.k("model-variant", name, version, variant))

    def model_variants(self, name: str, version: str) -> list[JSON]:
        names = [v.decode() for v in self._redis.zrange(self.k("model-variants", name, version), 0, -1)]
        return self._load_many([self.k("model-variant", name, version, v) for v in names])

    # ------------------------------------------------------------------ blob references
    def ref_blob(self, digest: str, ref: str) -> None:
        self._redis.sadd(self.k("model-blob-refs", digest), ref)

    def unref_blob(self, digest: str, ref: str) -> int:
        """Drop *ref* from the blob's references; returns how many remain."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.srem(self.k("model-blob-refs", digest), ref)
        pipe.scard(self.k("model-blob-refs", digest))
        return int(pipe.execute()[1])

    def blob_refs(self, digest: str) -> set[str]:
        return {r.decode() for r in self._redis.smembers(self.k("model-blob-refs", digest))}

    # ------------------------------------------------------------------ evaluation sets
    def put_eval_set(self, rec: JSON) -> None:
        self._redis.hset(self.k("eval-sets"), rec["sha256"], json.dumps(rec))

    def get_eval_set(self, digest: str) -> JSON | None:
        raw = self._redis.hget(self.k("eval-sets"), digest)
        return json.loads(raw) if raw is not None else None

    def eval_sets(self) -> list[JSON]:
        recs = [json.loads(v) for v in self._redis.hvals(self.k("eval-sets"))]
        return sorted(recs, key=lambda r: r.get("created_at", 0))

    def delete_eval_set(self, digest: str) -> bool:
        return bool(self._redis.hdel(self.k("eval-sets"), digest))

    # ------------------------------------------------------------------ helpers
    def _load_json(self, key: str) -> JSON | None:
        raw = self._redis.get(key)
        return json.loads(raw) if raw is not None else None

    def _load_many(self, keys: list[str]) -> list[JSON]:
        if not keys:
            return []
        out: list[Any] = self._redis.mget(keys)
        return [json.loads(x) for x in out if x is not None]
