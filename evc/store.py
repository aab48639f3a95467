"""The one module that talks to Redis: devices, tokens, jobs, job events, audit log, locks."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis

from evc.errors import Conflict, NotFound, StoreUnavailable
from evc.settings import Settings

JSON = dict[str, Any]

#: "partial": the job ended with some targets short of what was asked (per-target reasons in its results)
TERMINAL_STATES = frozenset({"succeeded", "partial", "failed", "cancelled"})
JOB_STATES = ("queued", "running", "succeeded", "partial", "failed", "cancelled")

# Move a job to ARGV[1] only when its current state is one of ARGV[2] (a JSON list);
# ARGV[3..] are extra field/value pairs set in the same step. Returns the state it had.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return false end
local allowed = cjson.decode(ARGV[2])
local ok = false
for _, s in ipairs(allowed) do if cjson.encode(s) == cur then ok = true end end
if not ok then return cur end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return cur
"""

# Consume one use of an enrollment token: KEYS[1] the record; ARGV[1] now. Returns
# 'ok', 'missing', 'expired', 'used_up' or 'revoked'.
_CONSUME = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('HGET', KEYS[1], 'revoked') == 'true' then return 'revoked' end
local exp = tonumber(redis.call('HGET', KEYS[1], 'expires_at'))
if exp and exp < tonumber(ARGV[1]) then return 'expired' end
local left = tonumber(redis.call('HGET', KEYS[1], 'uses_left'))
if left <= 0 then return 'used_up' end
redis.call('HSET', KEYS[1], 'uses_left', tostring(left - 1))
return 'ok'
"""

# Resolve a token in one round trip: KEYS[1] the hash index; ARGV[1] the record key prefix.
# Returns the record's fields (empty when unknown).
_RESOLVE = """
local id = redis.call('GET', KEYS[1])
if not id then return {} end
return redis.call('HGETALL', ARGV[1] .. id)
"""

# Revoke operator token KEYS[2] unless it is the last usable admin token: KEYS[1] the token
# index; ARGV[1] the record key prefix, ARGV[2] the token id, ARGV[3] now, ARGV[4] revoked_at.
# Returns 'missing', 'last_admin' or 'ok'.
_REVOKE_TOKEN = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 'missing' end
local function usable_admin(key)
  local f = redis.call('HMGET', key, 'scopes', 'revoked', 'expires_at')
  if not f[1] or f[2] == 'true' then return false end
  local exp = cjson.decode(f[3] or 'null')
  if exp ~= cjson.null and tonumber(exp) < tonumber(ARGV[3]) then return false end
  for _, s in ipairs(cjson.decode(f[1])) do if s == 'admin' then return true end end
  return false
end
if usable_admin(KEYS[2]) then
  local others = 0
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if id ~= ARGV[2] and usable_admin(ARGV[1] .. id) then others = others + 1; break end
  end
  if others == 0 then return 'last_admin' end
end
redis.call('HSET', KEYS[2], 'revoked', 'true', 'revoked_at', ARGV[4])
return 'ok'
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


#: what a record id looks like (see :func:`new_id`); anything else (``job_x:events`` would name
#: another key) is simply not found
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def now() -> float:
    return time.time()


def _dump(obj: JSON) -> dict[Any, Any]:
    return {k: json.dumps(v, separators=(",", ":")) for k, v in obj.items()}


def _load(raw: dict[Any, Any]) -> JSON:
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


class Store:
    """Typed access to EVC's state in Redis. Build one per process with :meth:`from_settings`."""

    def __init__(self, client: redis.Redis, prefix: str = "evc", settings: Settings | None = None):
        self.r = client
        self.prefix = prefix
        self.settings = settings or Settings()
        self._transition = self.r.register_script(_TRANSITION)
        self._consume = self.r.register_script(_CONSUME)
        self._release = self.r.register_script(_RELEASE)
        self._resolve = self.r.register_script(_RESOLVE)

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        return cls(redis_client(settings), settings.key_prefix, settings)

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis is unreachable: {exc}") from exc

    # ------------------------------------------------------------------ generic records
    def _put(self, kind: str, rec: JSON, score: float | None = None) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k(kind, rec["id"]), mapping=_dump(rec))
        pipe.zadd(self.k(kind + "s"), {rec["id"]: rec.get("created_at", now()) if score is None else score})
        pipe.execute()

    def _get(self, kind: str, rec_id: str) -> JSON:
        raw = self.r.hgetall(self.k(kind, rec_id)) if ID_RE.match(rec_id) else None
        if not raw:
            raise NotFound(f"{kind} {rec_id} not found", id=rec_id)
        return _load(raw)

    def _get_many(self, kind: str, ids: Iterable[str]) -> list[JSON]:
        ids = [i for i in ids if ID_RE.match(i)]
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.k(kind, i))
        return [_load(raw) for raw in pipe.execute() if raw]

    def _update(self, kind: str, rec_id: str, changes: JSON) -> JSON:
        key = self.k(kind, rec_id)
        if not ID_RE.match(rec_id) or not self.r.exists(key):
            raise NotFound(f"{kind} {rec_id} not found", id=rec_id)
        if changes:
            self.r.hset(key, mapping=_dump(changes))
        return self._get(kind, rec_id)

    def _ids(self, kind: str, newest_first: bool = True) -> Iterator[str]:
        key, start, batch = self.k(kind + "s"), 0, 500
        while True:
            if newest_first:
                chunk = self.r.zrevrange(key, start, start + batch - 1)
            else:
                chunk = self.r.zrange(key, start, start + batch - 1)
            if not chunk:
                return
            yield from (c.decode() for c in chunk)
            start += batch

    def _page(
        self,
        kind: str,
        offset: int,
        limit: int,
        match: Callable[[JSON], bool] | None = None,
        newest_first: bool = True,
    ) -> tuple[list[JSON], int]:
        """One page of records and the total that match (filters are applied in order)."""
        if match is None:
            key = self.k(kind + "s")
            total = int(self.r.zcard(key))
            rng = self.r.zrevrange if newest_first else self.r.zrange
            ids = [i.decode() for i in rng(key, offset, offset + limit - 1)]
            return self._get_many(kind, ids), total
        items: list[JSON] = []
        total = 0
        ids = list(self._ids(kind, newest_first))
        for start in range(0, len(ids), 500):
            for rec in self._get_many(kind, ids[start : start + 500]):
                if match(rec):
                    if offset <= total < offset + limit:
                        items.append(rec)
                    total += 1
        return items, total

    def _delete(self, kind: str, rec_id: str, *extra_keys: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.k(kind, rec_id), *extra_keys)
        pipe.zrem(self.k(kind + "s"), rec_id)
        pipe.execute()

    # ------------------------------------------------------------------ token lookup
    def resolve_token(self, index: str, kind: str, token_hash: str) -> JSON | None:
        """The record the token hash names (one round trip), or None."""
        raw = self._resolve(keys=[self.k(index, token_hash)], args=[self.k(kind) + ":"])
        if not raw:
            return None
        it = iter(raw)
        return {k.decode(): json.loads(v) for k, v in zip(it, it, strict=True)}

    # ------------------------------------------------------------------ devices
    def create_device(self, dev: JSON, token_hash: str) -> JSON:
        name_key = self.k("device-name", dev["name"])
        if not self.r.set(name_key, dev["id"], nx=True):
            raise Conflict(f"a device named {dev['name']!r} is already registered", field="name")
        dev = {**dev, "token_hash": token_hash}
        self._put("device", dev)
        self.r.set(self.k("device-token", token_hash), dev["id"])
        return dev

    def get_device(self, device_id: str) -> JSON:
        return self._get("device", device_id)

    def device_id_by_name(self, name: str) -> str | None:
        dev_id = self.r.get(self.k("device-name", name))
        return dev_id.decode() if dev_id else None

    def get_devices(self, ids: Iterable[str]) -> list[JSON]:
        return self._get_many("device", ids)

    def update_device(self, device_id: str, **changes: Any) -> JSON:
        return self._update("device", device_id, changes)

    def device_by_token(self, token_hash: str) -> JSON | None:
        dev_id = self.r.get(self.k("device-token", token_hash))
        if not dev_id:
            return None
        try:
            return self.get_device(dev_id.decode())
        except NotFound:
            return None

    def device_ids(self) -> list[str]:
        return list(self._ids("device", newest_first=False))

    def list_devices(
        self, offset: int = 0, limit: int = 50, match: Callable[[JSON], bool] | None = None
    ) -> tuple[list[JSON], int]:
        return self._page("device", offset, limit, match, newest_first=False)

    def all_devices(self) -> list[JSON]:
        return self._get_many("device", self.device_ids())

    def delete_device(self, device_id: str) -> JSON:
        dev = self.get_device(device_id)
        if dev.get("cluster_id"):
            self.r.srem(self.k("cluster", dev["cluster_id"], "members"), device_id)
        self._delete(
            "device",
            device_id,
            self.k("device-name", dev["name"]),
            self.k("device-token", dev.get("token_hash", "")),
            self.k("device-cluster", device_id),
        )
        return dev

    # ------------------------------------------------------------------ clusters
    def create_cluster(self, cl: JSON) -> JSON:
        if not self.r.set(self.k("cluster-name", cl["name"]), cl["id"], nx=True):
            raise Conflict(f"a cluster named {cl['name']!r} exists", field="name")
        self._put("cluster", cl)
        return cl

    def get_cluster(self, cluster_id: str) -> JSON:
        return self._get("cluster", cluster_id)

    def update_cluster(self, cluster_id: str, **changes: Any) -> JSON:
        return self._update("cluster", cluster_id, changes)

    def list_clusters(
        self, offset: int = 0, limit: int = 50, match: Callable[[JSON], bool] | None = None
    ) -> tuple[list[JSON], int]:
        return self._page("cluster", offset, limit, match, newest_first=False)

    def delete_cluster(self, cluster_id: str) -> JSON:
        cl = self.get_cluster(cluster_id)
        self._delete(
            "cluster", cluster_id, self.k("cluster-name", cl["name"]), self.k("cluster", cluster_id, "members")
        )
        return cl

    def rename_cluster(self, cluster_id: str, old: str, new: str) -> None:
        if not self.r.set(self.k("cluster-name", new), cluster_id, nx=True):
            raise Conflict(f"a cluster named {new!r} exists", field="name")
        self.r.delete(self.k("cluster-name", old))

    def claim_membership(self, cluster_id: str, device_id: str) -> str | None:
        """Make *device_id* a member of *cluster_id*; returns the cluster that already holds it
        (a device belongs to at most one cluster), or None when the claim succeeded."""
        key = self.k("device-cluster", device_id)
        if not self.r.set(key, cluster_id, nx=True):
            holder = self.r.get(key)
            held = holder.decode() if holder else None
            return None if held == cluster_id else held
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(self.k("cluster", cluster_id, "members"), device_id)
        pipe.hset(self.k("device", device_id), "cluster_id", json.dumps(cluster_id))
        pipe.execute()
        return None

    def release_membership(self, cluster_id: str, device_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(self.k("cluster", cluster_id, "members"), device_id)
        pipe.delete(self.k("device-cluster", device_id))
        pipe.hset(self.k("device", device_id), "cluster_id", json.dumps(None))
        pipe.execute()

    def cluster_members(self, cluster_id: str) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self.k("cluster", cluster_id, "members")))

    # ------------------------------------------------------------------ operator tokens
    def create_token(self, tok: JSON, token_hash: str) -> JSON:
        self._put("token", {**tok, "hash": token_hash})
        self.r.set(self.k("token-hash", token_hash), tok["id"])
        return tok

    def token_by_hash(self, token_hash: str) -> JSON | None:
        tok_id = self.r.get(self.k("token-hash", token_hash))
        if not tok_id:
            return None
        try:
            return self._get("token", tok_id.decode())
        except NotFound:
            return None

    def get_token(self, token_id: str) -> JSON:
        return self._get("token", token_id)

    def update_token(self, token_id: str, **changes: Any) -> JSON:
        return self._update("token", token_id, changes)

    def revoke_token(self, token_id: str) -> JSON:
        """Revoke an operator token, atomically refusing to revoke the last usable admin token."""
        script = self.__dict__.get("_revoke_token")
        if script is None:
            script = self.__dict__["_revoke_token"] = self.r.register_script(_REVOKE_TOKEN)
        res = script(
            keys=[self.k("tokens"), self.k("token", token_id)],
            args=[self.k("token") + ":", token_id, now(), json.dumps(now())],
        )
        res = res.decode() if isinstance(res, bytes) else str(res)
        if res == "missing":
            raise NotFound(f"token {token_id} not found", id=token_id)
        if res == "last_admin":
            raise Conflict(
                "this is the last admin token: create another admin token before revoking it "
                "(an operator with access to the data directory can recover with `evc bootstrap --reset-admin`)",
                id=token_id,
            )
        return self._get("token", token_id)

    def list_tokens(self, offset: int = 0, limit: int = 50) -> tuple[list[JSON], int]:
        return self._page("token", offset, limit, newest_first=False)

    # ------------------------------------------------------------------ enrollment tokens
    def create_enrollment(self, enr: JSON, token_hash: str) -> JSON:
        self._put("enrollment", {**enr, "hash": token_hash})
        self.r.set(self.k("enrollment-hash", token_hash), enr["id"])
        return enr

    def enrollment_by_hash(self, token_hash: str) -> JSON | None:
        enr_id = self.r.get(self.k("enrollment-hash", token_hash))
        if not enr_id:
            return None
        try:
            return self._get("enrollment", enr_id.decode())
        except NotFound:
            return None

    def get_enrollment(self, enrollment_id: str) -> JSON:
        return self._get("enrollment", enrollment_id)

    def consume_enrollment(self, enrollment_id: str) -> str:
        res = self._consume(keys=[self.k("enrollment", enrollment_id)], args=[now()])
        return res.decode() if isinstance(res, bytes) else str(res)

    def update_enrollment(self, enrollment_id: str, **changes: Any) -> JSON:
        return self._update("enrollment", enrollment_id, changes)

    def list_enrollments(self, offset: int = 0, limit: int = 50) -> tuple[list[JSON], int]:
        return self._page("enrollment", offset, limit)

    # ------------------------------------------------------------------ jobs
    def claim_idempotency_key(self, key: str, job_id: str) -> JSON | None:
        """Reserve *key* for *job_id*; if another job holds it, return that job.

        *key* may end with ``"\n" + fingerprint`` (a hash of the request, see
        :func:`evc.jobs.scoped_key`), kept next to the job id: the same key with another
        fingerprint is refused (409), never answered with an unrelated job."""
        name, _, fingerprint = key.partition("\n")
        ikey = self.k("idem", name)
        if self.r.set(ikey, f"{job_id} {fingerprint}", nx=True, ex=self.settings.idempotency_ttl_s):
            return None
        existing = self.r.get(ikey)
        for _ in range(50):  # the first creator may still be writing its job
            held, _, held_fp = (existing or b"").decode().partition(" ")
            if existing and held_fp != fingerprint:
                raise Conflict(
                    "this Idempotency-Key was already used with a different request; "
                    "repeat the same request to get its job, or use a new key",
                    field="Idempotency-Key",
                )
            if held and self.r.exists(self.k("job", held)):
                return self.get_job(held)
            time.sleep(0.01)
            existing = self.r.get(ikey)
        raise Conflict("a job with this Idempotency-Key is being created; retry")

    def create_job(
        self,
        job: JSON,
        idempotency_key: str | None = None,
        *,
        publish: Iterable[tuple[str, tuple[Any, ...]]] = (),
        pipe: Any = None,
    ) -> tuple[JSON, bool]:
        """Store *job* and run *publish* (Redis commands that enqueue its task) in one MULTI/EXEC,
        or queue both on the caller's *pipe*. With an idempotency key already used, return that
        job instead (and publish nothing)."""
        if idempotency_key:
            existing = self.claim_idempotency_key(idempotency_key, job["id"])
            if existing is not None:
                return existing, False
        p = pipe if pipe is not None else self.r.pipeline(transaction=True)
        p.hset(self.k("job", job["id"]), mapping=_dump(job))
        p.zadd(self.k("jobs"), {job["id"]: job["created_at"]})
        p.zadd(self.k("jobs-kind", job["kind"]), {job["id"]: job["created_at"]})
        for name, args in publish:
            getattr(p, name)(*args)
        if pipe is None:
            p.execute()
        return job, True

    def get_job(self, job_id: str) -> JSON:
        return self._get("job", job_id)

    def job_state(self, job_id: str) -> str | None:
        raw = self.r.hget(self.k("job", job_id), "state")
        return json.loads(raw) if raw else None

    def update_job(self, job_id: str, **changes: Any) -> None:
        self.r.hset(self.k("job", job_id), mapping=_dump(changes))

    def transition_job(self, job_id: str, state: str, allowed_from: Iterable[str], **changes: Any) -> bool:
        """Atomically move a job to *state* if it is in one of *allowed_from*."""
        args: list[Any] = [json.dumps(state), json.dumps(list(allowed_from))]
        for k, v in _dump(changes).items():
            args += [k, v]
        prev = self._transition(keys=[self.k("job", job_id)], args=args)
        if prev is None:
            raise NotFound(f"job {job_id} not found", id=job_id)
        return json.loads(prev) in set(allowed_from)

    def list_jobs(
        self,
        offset: int = 0,
        limit: int = 50,
        kind: str | None = None,
        match: Callable[[JSON], bool] | None = None,
    ) -> tuple[list[JSON], int]:
        if kind is None:
            return self._page("job", offset, limit, match)
        ids = [i.decode() for i in self.r.zrevrange(self.k("jobs-kind", kind), 0, -1)]
        if match is None:
            return self._get_many("job", ids[offset : offset + limit]), len(ids)
        recs = [j for j in self._get_many("job", ids) if match(j)]
        return recs[offset : offset + limit], len(recs)

    # a lease per job whose task body is executing: the worker renews it; the reaper re-queues
    # jobs whose lease expired (their worker was killed)
    def lease_jobs(self, job_ids: Iterable[str], ttl_s: float) -> None:
        ids = list(job_ids)
        if ids:
            until = now() + ttl_s
            self.r.zadd(self.k("job-leases"), dict.fromkeys(ids, until))

    def release_lease(self, job_id: str) -> None:
        self.r.zrem(self.k("job-leases"), job_id)

    def expired_leases(self) -> list[str]:
        return [j.decode() for j in self.r.zrangebyscore(self.k("job-leases"), "-inf", now())]

    def add_event(self, job_id: str, event: JSON) -> int:
        event = {"ts": now(), **event}
        seq = int(self.r.rpush(self.k("job", job_id, "events"), json.dumps(event)))
        return seq

    def add_events(self, job_id: str, events: list[JSON]) -> int:
        if not events:
            return int(self.r.llen(self.k("job", job_id, "events")))
        t = now()
        return int(self.r.rpush(self.k("job", job_id, "events"), *[json.dumps({"ts": t, **e}) for e in events]))

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[JSON]:
        raw = self.r.lrange(self.k("job", job_id, "events"), after, after + limit - 1)
        return [{"seq": after + i + 1, **json.loads(e)} for i, e in enumerate(raw)]

    def event_count(self, job_id: str) -> int:
        return int(self.r.llen(self.k("job", job_id, "events")))

    def set_result(self, job_id: str, target: str, result: JSON) -> bool:
        """Record a target's result; True when the target had none yet (a retry overwrites)."""
        return bool(self.r.hset(self.k("job", job_id, "results"), target, json.dumps(result)))

    def results(self, job_id: str) -> JSON:
        return _load(self.r.hgetall(self.k("job", job_id, "results")))

    # ------------------------------------------------------------------ audit log
    def audit(
        self, actor: str, action: str, target: str = "", ip: str = "", *, pipe: Any = None, **details: Any
    ) -> None:
        rec = {"ts": now(), "actor": actor, "action": action, "target": target, "ip": ip}
        if details:
            rec["details"] = details
        p = pipe if pipe is not None else self.r.pipeline(transaction=False)
        p.lpush(self.k("audit"), json.dumps(rec))
        p.ltrim(self.k("audit"), 0, self.settings.audit_history - 1)
        if pipe is None:
            p.execute()

    def pipeline(self) -> Any:
        """A MULTI/EXEC pipeline for a unit of work (the API uses one per request)."""
        return self.r.pipeline(transaction=True)

    def audit_log(self, offset: int = 0, limit: int = 50) -> tuple[list[JSON], int]:
        raw = self.r.lrange(self.k("audit"), offset, offset + limit - 1)
        return [json.loads(x) for x in raw], int(self.r.llen(self.k("audit")))

    # ------------------------------------------------------------------ fleet event log
    def log_event(self, event: JSON) -> None:
        """A fleet event (device state change, membership...), newest first, capped."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lpush(self.k("events"), json.dumps({"ts": now(), **event}))
        pipe.ltrim(self.k("events"), 0, self.settings.audit_history - 1)
        pipe.execute()

    def fleet_events(self, limit: int = 10_000) -> list[JSON]:
        return [json.loads(x) for x in self.r.lrange(self.k("events"), 0, limit - 1)]

    # ------------------------------------------------------------------ locks and counters
    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        return bool(self.r.set(self.k("lock", name), owner, nx=True, px=int(ttl_s * 1000)))

    def refresh_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        key = self.k("lock", name)
        if self.r.get(key) == owner.encode():
            return bool(self.r.pexpire(key, int(ttl_s * 1000)))
        return False

    def release_lock(self, name: str, owner: str) -> bool:
        return bool(self._release(keys=[self.k("lock", name)], args=[owner]))

    def lock_owner(self, name: str) -> str | None:
        v = self.r.get(self.k("lock", name))
        return v.decode() if v else None

    def hit(self, name: str, window_s: int) -> int:
        """Count one event in a fixed window; returns the count so far."""
        key = self.k("count", name, str(int(now() // window_s)))
        pipe = self.r.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, window_s * 2)
        return int(pipe.execute()[0])

    def hit_many(self, names: Sequence[str], window_s: int) -> list[int]:
        """:meth:`hit` for several counters in one round trip."""
        window = str(int(now() // window_s))
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            key = self.k("count", name, window)
            pipe.incr(key)
            pipe.expire(key, window_s * 2)
        return [int(n) for n in pipe.execute()[::2]]

    def count(self, name: str, window_s: int) -> int:
        v = self.r.get(self.k("count", name, str(int(now() // window_s))))
        return int(v) if v else 0

    # ------------------------------------------------------------------ Celery queues
    def queue_lengths(self, queues: Iterable[str] = ("default", "ssh", "ansible", "fl")) -> dict[str, int]:
        """Messages waiting in each Celery queue (the broker shares this Redis)."""
        pipe = self.r.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        return {q: int(n) for q, n in zip(queues, pipe.execute(), strict=True)}

    # ------------------------------------------------------------------ generic kv for features
    def put_json(self, name: str, value: Any, ttl_s: int | None = None) -> None:
        self.r.set(self.k(name), json.dumps(value), ex=ttl_s)

    def get_json(self, name: str) -> Any:
        v = self.r.get(self.k(name))
        return json.loads(v) if v is not None else None

    # ------------------------------------------------------------------ health (evc.health)
    # Bulk writes of a health sweep and reads of the fleet event log.

    #: HSET the field/value pairs ARGV into KEYS[1] only when that hash exists (1 if updated)
    _HSET_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

    def record_health(self, changes: dict[str, JSON], events: Iterable[JSON] = ()) -> int:
        """Apply per-device field changes and append fleet events in ONE pipelined round trip.

        A device removed meanwhile is skipped, never re-created. Returns how many were updated."""
        script = getattr(self, "_hset_existing", None)
        if script is None:
            script = self._hset_existing = self.r.register_script(self._HSET_EXISTING)
        events = list(events)
        pipe = self.r.pipeline(transaction=False)
        for device_id, fields in changes.items():
            args = [x for kv in _dump(fields).items() for x in kv]
            script(keys=[self.k("device", device_id)], args=args, client=pipe)
        if events:
            t = now()
            pipe.lpush(self.k("events"), *[json.dumps({"ts": t, **e}) for e in events])
            pipe.ltrim(self.k("events"), 0, self.settings.audit_history - 1)
        out = pipe.execute()
        return sum(1 for x in out[: len(changes)] if x == 1)

    def device_fields(self, ids: Iterable[str] | None, fields: Sequence[str]) -> list[JSON]:
        """Only *fields* of each device (every device when *ids* is None), in one round trip:
        a sweep of 1,000 devices need not decode their facts. Missing devices are left out."""
        ids = self.device_ids() if ids is None else list(ids)
        names = ["id", *(f for f in fields if f != "id")]
        pipe = self.r.pipeline(transaction=False)
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
            raw = self.r.lrange(key, offset, offset + limit - 1)
            return [json.loads(x) for x in raw], int(self.r.llen(key))
        items: list[JSON] = []
        total, start = 0, 0
        while True:
            chunk = self.r.lrange(key, start, start + batch - 1)
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

    # ------------------------------------------------------------------ federated learning (evc.fl)
    # One hash per FL job says where its rounds stand (round, token, phase, deadline, selected).
    # Each round attempt has a token; its outcomes and updates are hashes keyed by device, written
    # together and first-write-wins, so a redelivered training task is a no-op. Round records and
    # late results are kept per job; ``fl:active`` lists the jobs a worker start should check.

    #: compare-and-set on the job's FL hash: ARGV[1] = {field: [allowed encoded values]} (a
    #: missing field reads as 'null'); ARGV[2..] field/value pairs set when every field matches
    _FL_CAS = """
local expect = cjson.decode(ARGV[1])
for field, allowed in pairs(expect) do
  local cur = redis.call('HGET', KEYS[1], field) or 'null'
  local ok = false
  for _, v in ipairs(allowed) do if v == cur then ok = true end end
  if not ok then return 0 end
end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

    #: record one device's outcome (and update) for round token ARGV[1], only while that round
    #: is training; first write wins. Returns 'stored', 'duplicate' or 'late'.
    _FL_OUTCOME = """
local st = redis.call('HMGET', KEYS[1], 'token', 'phase')
if st[1] ~= ARGV[1] or st[2] ~= '"training"' then return 'late' end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 'duplicate' end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], ARGV[4]) end
return 'stored'
"""

    def _fl_script(self, name: str, source: str) -> Any:
        script = self.__dict__.get(name)
        if script is None:
            script = self.__dict__[name] = self.r.register_script(source)
        return script

    def fl_state(self, job_id: str) -> JSON | None:
        """Where an FL job's rounds stand, or None before its first start."""
        raw = self.r.hgetall(self.k("fl", job_id))
        return _load(raw) if raw else None

    def fl_init(self, job_id: str, state: JSON) -> None:
        """Replace the job's FL state (a start or resume) and list the job as active."""
        fields: dict[str | bytes, bytes | float | int | str] = {k: v for k, v in _dump(state).items()}
        pipe = self.r.pipeline(transaction=True)
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
        script = self._fl_script("_fl_cas_script", self._FL_CAS)
        return bool(script(keys=[self.k("fl", job_id)], args=args))

    def fl_record_outcome(self, job_id: str, token: str, device_id: str, outcome: JSON, update: str | None) -> str:
        """Store a device's outcome (and its base64 update) for round attempt *token*:
        ``stored``, ``duplicate`` (one is there already) or ``late`` (the round is not training)."""
        script = self._fl_script("_fl_outcome_script", self._FL_OUTCOME)
        res = script(
            keys=[self.k("fl", job_id), self.k("fl", job_id, token, "outcomes"),
                  self.k("fl", job_id, token, "updates")],
            args=[json.dumps(token), device_id, json.dumps(outcome), update or ""],
        )  # fmt: skip
        return res.decode() if isinstance(res, bytes) else str(res)

    def fl_outcomes(self, job_id: str, token: str) -> dict[str, JSON]:
        """Every outcome recorded for round attempt *token*, by device."""
        return _load(self.r.hgetall(self.k("fl", job_id, token, "outcomes")))

    def fl_has_outcome(self, job_id: str, token: str, device_id: str) -> bool:
        return bool(self.r.hexists(self.k("fl", job_id, token, "outcomes"), device_id))

    def fl_update(self, job_id: str, token: str, device_id: str) -> str | None:
        """One device's update (base64 ``.npz``), read one at a time by the aggregation."""
        raw = self.r.hget(self.k("fl", job_id, token, "updates"), device_id)
        return raw.decode() if raw is not None else None

    def fl_drop_round(self, job_id: str, token: str) -> None:
        """Forget a round attempt's outcomes and updates (after its checkpoint, or a discard)."""
        self.r.delete(self.k("fl", job_id, token, "outcomes"), self.k("fl", job_id, token, "updates"))

    def fl_put_round(self, job_id: str, round: int, record: JSON) -> None:
        """The record of a closed round (metrics, participants, failures)."""
        self.r.hset(self.k("fl", job_id, "rounds"), str(round), json.dumps(record))

    def fl_rounds(self, job_id: str) -> list[JSON]:
        """Closed-round records, in round order."""
        raw = self.r.hgetall(self.k("fl", job_id, "rounds"))
        return [json.loads(raw[k]) for k in sorted(raw, key=int)]

    def fl_add_late(self, job_id: str, record: JSON) -> None:
        """A result that came after its round closed: discarded, and kept here (capped)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(self.k("fl", job_id, "late"), json.dumps({"ts": now(), **record}))
        pipe.ltrim(self.k("fl", job_id, "late"), -1000, -1)
        pipe.execute()

    def fl_late(self, job_id: str) -> list[JSON]:
        return [json.loads(x) for x in self.r.lrange(self.k("fl", job_id, "late"), 0, -1)]

    def fl_active_jobs(self) -> list[str]:
        """FL jobs that may have rounds in flight (started and not yet finished)."""
        return sorted(m.decode() for m in self.r.smembers(self.k("fl", "active")))

    def fl_deactivate(self, job_id: str) -> None:
        self.r.srem(self.k("fl", "active"), job_id)


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client for *settings*: a URL, or Sentinel when sentinels are configured."""
    if settings.redis_sentinels:
        from redis.sentinel import Sentinel

        hosts = []
        for hp in settings.redis_sentinels.split(","):
            h, _, p = hp.strip().rpartition(":")
            hosts.append((h, int(p)))
        # the master's password and database ride in EVC_REDIS_URL (redis://:PASSWORD@any/DB)
        opts = redis.connection.parse_url(settings.redis_url) if settings.redis_url else {}
        return Sentinel(hosts, password=opts.get("password")).master_for(
            settings.redis_sentinel_master, db=int(opts.get("db") or 0)
        )
    if not settings.redis_url:
        raise StoreUnavailable("no Redis URL configured (set EVC_REDIS_URL or run `evc up`)")
    return redis.Redis.from_url(settings.redis_url, health_check_interval=30)
