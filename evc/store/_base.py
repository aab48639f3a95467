"""What every part of the store shares: the private client, key names, record helpers."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from json.encoder import encode_basestring_ascii
from typing import Any, Generic, TypeVar, cast

import redis
from redis.commands.core import Script

from evc.errors import NotFound, StoreUnavailable
from evc.model import JSON as JSON  # noqa: E402
from evc.model import Cluster, Device, Enrollment, FLState, Job, Token
from evc.settings import Settings
from evc.store import scripts
from evc.store.client import StorePipeline, store_client

#: what a record id looks like (see :func:`new_id`); anything else (``job_x:events`` would name
#: another key) is simply not found
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def now() -> float:
    return time.time()


#: a record type of :mod:`evc.model` (a TypedDict)
R = TypeVar("R", bound=Mapping[str, Any])


class Kind(Generic[R]):
    """A kind of record: its key name (a record is the hash ``<name>:<id>``, listed in the sorted
    set ``<name>s``) and, as its type parameter, the record type it is read back as."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Kind({self.name!r})"

    def record(self, obj: JSON) -> R:
        """*obj*, read back from Redis, as this kind's record: the store's one typing boundary
        (no check: records are JSON objects whose shape the store's writers keep)."""
        return cast(R, obj)


DEVICE: Kind[Device] = Kind("device")
CLUSTER: Kind[Cluster] = Kind("cluster")
TOKEN: Kind[Token] = Kind("token")
ENROLLMENT: Kind[Enrollment] = Kind("enrollment")
JOB: Kind[Job] = Kind("job")
#: an FL job's round-engine state (one hash per job, not listed)
FL_STATE: Kind[FLState] = Kind("fl")


#: ``json.dumps(value, separators=(",", ":"))`` without building an encoder per call
_compact = json.JSONEncoder(separators=(",", ":")).encode
_INFINITIES = (float("inf"), float("-inf"))


def dump_value(value: Any) -> str:
    """A field's value as the store writes it: exactly ``json.dumps(value, separators=(",", ":"))``,
    scalars (most fields) without the encoder's per-call setup (a job record: a fifth the time)."""
    t = type(value)
    if t is str:
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    if t is bool:
        return "true" if value else "false"
    if t is int:
        return int.__repr__(value)
    if t is float and value == value and value not in _INFINITIES:
        return float.__repr__(value)
    if not value and (t is dict or t is list):
        return "{}" if t is dict else "[]"
    return _compact(value)


def _dump(obj: Mapping[str, Any]) -> dict[Any, Any]:
    return {k: dump_value(v) for k, v in obj.items()}


def _load(raw: dict[Any, Any]) -> JSON:
    if raw and all(isinstance(k, bytes) and b'"' not in k and b"\\" not in k for k in raw):
        # one JSON document per record: a page of 50 jobs decodes in 50 calls, not 900
        try:
            return dict(json.loads(b"{" + b",".join(b'"' + k + b'":' + v for k, v in raw.items()) + b"}"))
        except (ValueError, TypeError):
            pass
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


def _text(raw: Any) -> str:
    """A script's string reply."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class StoreBase:
    """The Redis client (private: only the store's parts use it), key names and the generic
    record operations (a record is a hash ``<kind>:<id>`` listed in the sorted set ``<kind>s``)."""

    def __init__(self, client: redis.Redis, prefix: str = "evc", settings: Settings | None = None):
        self._redis = store_client(client)
        self.prefix = prefix
        self.settings = settings or Settings()
        self._scripts: dict[str, Script] = {}

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except StoreUnavailable as exc:  # said as `evc` and /readyz always said it
            raise StoreUnavailable(f"Redis is unreachable: {exc.__cause__ or exc}") from exc.__cause__

    def _script(self, source: str) -> Script:
        """The script *source* registered on the client (once; it is loaded on first use)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._redis.register_script(source)
        return script

    def unit_of_work(self) -> StorePipeline:
        """A MULTI/EXEC pipeline for a unit of work (the API uses one per request): pass it as
        ``pipe=`` to the methods that take one, then ``execute()`` it (or ``reset()`` it)."""
        return self._redis.pipeline(transaction=True)

    # ------------------------------------------------------------------ generic records
    def _put(self, kind: Kind[R], rec: R, score: float | None = None) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.k(kind.name, rec["id"]), mapping=_dump(rec))
        pipe.zadd(self.k(kind.name + "s"), {rec["id"]: rec.get("created_at", now()) if score is None else score})
        pipe.execute()

    def _get(self, kind: Kind[R], rec_id: str) -> R:
        raw = self._redis.hgetall(self.k(kind.name, rec_id)) if ID_RE.match(rec_id) else None
        if not raw:
            raise NotFound(f"{kind.name} {rec_id} not found", id=rec_id)
        return kind.record(_load(raw))

    def _get_many(self, kind: Kind[R], ids: Iterable[str]) -> list[R]:
        ids = [i for i in ids if ID_RE.match(i)]
        if not ids:
            return []
        try:
            found = json.loads(self._script(scripts.GET_MANY)(keys=[self.k(kind.name, i) for i in ids]))
            return [kind.record(rec) for rec in found]
        except ValueError:  # a field that is not a JSON value (written by hand): field by field
            pass
        pipe = self._redis.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.k(kind.name, i))
        return [kind.record(_load(raw)) for raw in pipe.execute() if raw]

    def _update(self, kind: Kind[R], rec_id: str, changes: JSON) -> R:
        key = self.k(kind.name, rec_id)
        if not ID_RE.match(rec_id) or not self._redis.exists(key):
            raise NotFound(f"{kind.name} {rec_id} not found", id=rec_id)
        if changes:
            self._redis.hset(key, mapping=_dump(changes))
        return self._get(kind, rec_id)

    def _ids(self, kind: Kind[Any], newest_first: bool = True) -> Iterator[str]:
        key, start, batch = self.k(kind.name + "s"), 0, 500
        while True:
            if newest_first:
                chunk = self._redis.zrevrange(key, start, start + batch - 1)
            else:
                chunk = self._redis.zrange(key, start, start + batch - 1)
            if not chunk:
                return
            yield from (c.decode() for c in chunk)
            start += batch

    def _page(
        self,
        kind: Kind[R],
        offset: int,
        limit: int,
        match: Callable[[R], bool] | None = None,
        newest_first: bool = True,
    ) -> tuple[list[R], int]:
        """One page of records and the total that match (filters are applied in order)."""
        if match is None:
            key = self.k(kind.name + "s")
            total = int(self._redis.zcard(key))
            rng = self._redis.zrevrange if newest_first else self._redis.zrange
            ids = [i.decode() for i in rng(key, offset, offset + limit - 1)]
            return self._get_many(kind, ids), total
        items: list[R] = []
        total = 0
        ids = list(self._ids(kind, newest_first))
        for start in range(0, len(ids), 500):
            for rec in self._get_many(kind, ids[start : start + 500]):
                if match(rec):
                    if offset <= total < offset + limit:
                        items.append(rec)
                    total += 1
        return items, total

    def _delete(self, kind: Kind[Any], rec_id: str, *extra_keys: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.k(kind.name, rec_id), *extra_keys)
        pipe.zrem(self.k(kind.name + "s"), rec_id)
        pipe.execute()
