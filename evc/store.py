"""The one module that talks to Redis: devices, tokens, jobs, job events, audit log, locks."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis

from evc.errors import Conflict, NotFound, StaleAttempt, StoreUnavailable
from evc.settings import Settings

JSON = dict[str, Any]

#: "partial": the job ended with some targets short of what was asked (per-target reasons in its results)
TERMINAL_STATES = frozenset({"succeeded", "partial", "failed", "cancelled"})
JOB_STATES = ("queued", "running", "succeeded", "partial", "failed", "cancelled")

# A job's indexes, kept by the scripts that change its state: ``jobs-state:<state>`` and
# ``jobs-ks:<kind>:<state>`` (scored by creation time) answer filtered listings without a scan;
# ``jobs-finished`` (scored by finish time) is what retention prunes. Every script reads the
# time from Redis (one clock for every host), in milliseconds.
_JOB_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local TERMINAL = {succeeded = true, failed = true, cancelled = true, partial = true}
local function reindex(p, id, key, old, new, now)
  local meta = redis.call('HMGET', key, 'kind', 'created_at')
  local kind = cjson.decode(meta[1])
  local created = tonumber(meta[2]) or 0
  redis.call('ZREM', p .. ':jobs-state:' .. old, id)
  redis.call('ZREM', p .. ':jobs-ks:' .. kind .. ':' .. old, id)
  redis.call('ZADD', p .. ':jobs-state:' .. new, created, id)
  redis.call('ZADD', p .. ':jobs-ks:' .. kind .. ':' .. new, created, id)
  if new ~= 'running' then redis.call('ZREM', p .. ':job-leases', id) end
  if TERMINAL[new] then
    redis.call('ZADD', p .. ':jobs-finished', now, id)
  elseif TERMINAL[old] then
    redis.call('ZREM', p .. ':jobs-finished', id)
  end
end
-- is (job KEYS, attempt) the job's running attempt with a live lease?
local function live(p, id, key, attempt, now)
  local st = redis.call('HMGET', key, 'state', 'attempt')
  if st[1] ~= '"running"' or tonumber(st[2]) ~= tonumber(attempt) then return false end
  local exp = redis.call('ZSCORE', p .. ':job-leases', id)
  return exp ~= false and tonumber(exp) > now
end
local function add_event(p, id, now, ev)
  ev['ts'] = now / 1000
  return redis.call('RPUSH', p .. ':job:' .. id .. ':events', cjson.encode(ev))
end
"""

# Move a job to ARGV[1] only when its current state is one of ARGV[2] (a JSON list) and, when
# ARGV[5] is an attempt number, only while that attempt is the job's running one (else
# 'stale'); ARGV[3] the key prefix, ARGV[4] the job id, ARGV[6] an event to append ('' none),
# ARGV[7..] field/value pairs set in the same step. Returns the state it had.
_TRANSITION = (
    _JOB_LUA
    + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return false end
local now = now_ms()
if ARGV[5] ~= '' and not live(ARGV[3], ARGV[4], KEYS[1], ARGV[5], now) then return 'stale' end
local allowed = cjson.decode(ARGV[2])
local ok = false
for _, s in ipairs(allowed) do if cjson.encode(s) == cur then ok = true end end
if not ok then return cur end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local old, new = cjson.decode(cur), cjson.decode(ARGV[1])
if old ~= new then reindex(ARGV[3], ARGV[4], KEYS[1], old, new, now) end
if ARGV[6] ~= '' then add_event(ARGV[3], ARGV[4], now, cjson.decode(ARGV[6])) end
return cur
"""
)

# Start an execution of a job (KEYS[1]): ARGV[1] prefix, ARGV[2] job id, ARGV[3] lease ms,
# ARGV[4] how often its worker may be lost, ARGV[5] started_at (JSON). A queued job, or a running
# one whose lease has expired on Redis's clock (its worker was lost: counted, with an event),
# gets the next attempt number and a lease owned by it. Returns {what, attempt, lost}: what is
# 'started', 'busy' (a live attempt runs it), 'final' (or missing) or 'lost' (attempts used up:
# the job is failed here).
_START = (
    _JOB_LUA
    + """
local p, id = ARGV[1], ARGV[2]
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'final', 0, 0} end
local state = cjson.decode(cur)
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt')) or 0
local lost = tonumber(redis.call('HGET', KEYS[1], 'lost')) or 0
local now = now_ms()
if state == 'running' then
  local exp = redis.call('ZSCORE', p .. ':job-leases', id)
  if exp and tonumber(exp) > now then return {'busy', attempt, lost} end
  lost = lost + 1
  redis.call('HSET', KEYS[1], 'lost', tostring(lost))
  if lost >= tonumber(ARGV[4]) then
    local msg = 'worker lost ' .. lost .. ' times; giving up'
    redis.call('HSET', KEYS[1], 'state', '"failed"', 'finished_at', tostring(now / 1000),
      'error', cjson.encode({code = 'worker_lost', message = msg}))
    reindex(p, id, KEYS[1], 'running', 'failed', now)
    add_event(p, id, now, {type = 'job', state = 'failed', message = msg})
    return {'lost', attempt, lost}
  end
  add_event(p, id, now, {type = 'job', state = 'running', attempt = attempt + 1,
    message = 'the worker of attempt ' .. attempt .. ' was lost; attempt ' .. (attempt + 1) .. ' takes over'})
elseif state ~= 'queued' then
  return {'final', attempt, lost}
end
attempt = attempt + 1
redis.call('HSET', KEYS[1], 'state', '"running"', 'attempt', tostring(attempt), 'started_at', ARGV[5])
redis.call('ZADD', p .. ':job-leases', now + tonumber(ARGV[3]), id)
if state ~= 'running' then reindex(p, id, KEYS[1], state, 'running', now) end
return {'started', attempt, lost}
"""
)

# Renew the lease of (job, attempt): KEYS[1] the job; ARGV[1] prefix, ARGV[2] id, ARGV[3]
# attempt, ARGV[4] lease ms. 0 when that attempt is stale: another runs the job, or its lease
# expired (an expired lease is never revived: the attempt is presumed lost).
_RENEW = (
    _JOB_LUA
    + """
local now = now_ms()
if not live(ARGV[1], ARGV[2], KEYS[1], ARGV[3], now) then return 0 end
redis.call('ZADD', ARGV[1] .. ':job-leases', now + tonumber(ARGV[4]), ARGV[2])
return 1
"""
)

# Run one write for (job, attempt) only while that attempt runs the job with a live lease:
# KEYS[1] the job, KEYS[2] the key written; ARGV[1] prefix, ARGV[2] id, ARGV[3] attempt, ARGV[4]
# the command, ARGV[5..] its arguments. Returns {ok, the command's reply}; ok 0: stale.
# Records KEYS as one JSON array: each hash's fields are already JSON values (see _dump), so
# Redis joins them into documents and the client parses one reply, not one per record.
_GET_MANY = """
local out = {}
for _, key in ipairs(KEYS) do
  local h = redis.call('HGETALL', key)
  if #h > 0 then
    local parts = {}
    for j = 1, #h, 2 do parts[#parts + 1] = cjson.encode(h[j]) .. ':' .. h[j + 1] end
    out[#out + 1] = '{' .. table.concat(parts, ',') .. '}'
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""

# One device's jobs filtered by kind and/or state, newest first: KEYS[1] the device's index,
# ARGV[1] the key prefix, ARGV[2]/ARGV[3] the wanted kind/state as stored (JSON; '' any),
# ARGV[4] offset, ARGV[5] limit. Returns {total, id...}: the walk reads two fields per job in
# Redis, not a round trip per batch and a reply per job.
_WALK_TARGET = """
local want_kind, want_state = ARGV[2], ARGV[3]
local offset, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local out, total, start = {0}, 0, 0
while true do
  local ids = redis.call('ZREVRANGE', KEYS[1], start, start + 999)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local ks = redis.call('HMGET', ARGV[1] .. ':job:' .. id, 'kind', 'state')
    if (want_kind == '' or ks[1] == want_kind) and (want_state == '' or ks[2] == want_state) then
      if total >= offset and total < offset + limit then out[#out + 1] = id end
      total = total + 1
    end
  end
  start = start + 1000
end
out[1] = total
return out
"""

_FENCED = (
    _JOB_LUA
    + """
if not live(ARGV[1], ARGV[2], KEYS[1], ARGV[3], now_ms()) then return {0, false} end
return {1, redis.call(ARGV[4], KEYS[2], unpack(ARGV, 5))}
"""
)

# A job whose lease expired on Redis's clock (KEYS[1]; ARGV[1] prefix, ARGV[2] id, ARGV[3] how
# often its worker may be lost, ARGV[4] the time in JSON): counted as lost once more, then
# queued again (with an event) or failed when the count is used up. Returns {what, attempt,
# lost}: 'requeued', 'failed' or 'skipped' (not running, or its lease is live after all).
_LOST = (
    _JOB_LUA
    + """
local p, id = ARGV[1], ARGV[2]
local now = now_ms()
local st = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'lost')
local attempt, lost = tonumber(st[2]) or 0, (tonumber(st[3]) or 0) + 1
local exp = redis.call('ZSCORE', p .. ':job-leases', id)
if st[1] ~= '"running"' then
  if exp and tonumber(exp) <= now then redis.call('ZREM', p .. ':job-leases', id) end
  return {'skipped', attempt, lost - 1}
end
if exp and tonumber(exp) > now then return {'skipped', attempt, lost - 1} end
redis.call('HSET', KEYS[1], 'lost', tostring(lost))
if lost >= tonumber(ARGV[3]) then
  local msg = 'worker lost ' .. lost .. ' times; giving up'
  redis.call('HSET', KEYS[1], 'state', '"failed"', 'finished_at', ARGV[4],
    'error', cjson.encode({code = 'worker_lost', message = msg}))
  reindex(p, id, KEYS[1], 'running', 'failed', now)
  add_event(p, id, now, {type = 'job', state = 'failed', message = msg})
  return {'failed', attempt, lost}
end
redis.call('HSET', KEYS[1], 'state', '"queued"', 'queued_at', ARGV[4], 'not_before', 'null')
reindex(p, id, KEYS[1], 'running', 'queued', now)
add_event(p, id, now, {type = 'job', state = 'queued',
  message = 'the worker of attempt ' .. attempt .. ' was lost (lease expired); re-queued (lost '
    .. lost .. ' of ' .. ARGV[3] .. ')'})
return {'requeued', attempt, lost}
"""
)

# Take over a lock from an older holder: KEYS[1] the lock; ARGV[1] the holder expected, ARGV[2]
# the new owner, ARGV[3] ttl ms. 1 when it now belongs to the new owner.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
"""

# Expired leases on Redis's clock: KEYS[1] the lease set. Returns the job ids.
_EXPIRED = """
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
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

#: a job id inside a Celery task message (its task id and arguments name it)
_JOB_ID = re.compile(rb"job_[0-9a-f]{16}")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def now() -> float:
    return time.time()


def _dump(obj: JSON) -> dict[Any, Any]:
    return {k: json.dumps(v, separators=(",", ":")) for k, v in obj.items()}


def _load(raw: dict[Any, Any]) -> JSON:
    if raw and all(isinstance(k, bytes) and b'"' not in k and b"\\" not in k for k in raw):
        # one JSON document per record: a page of 50 jobs decodes in 50 calls, not 900
        try:
            return dict(json.loads(b"{" + b",".join(b'"' + k + b'":' + v for k, v in raw.items()) + b"}"))
        except (ValueError, TypeError):
            pass
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


class Store:
    """Typed access to EVC's state in Redis. Build one per process with :meth:`from_settings`."""

    def __init__(self, client: redis.Redis, prefix: str = "evc", settings: Settings | None = None):
        self.r = client
        self.prefix = prefix
        self.settings = settings or Settings()
        self._transition = self.r.register_script(_TRANSITION)
        self._start = self.r.register_script(_START)
        self._renew = self.r.register_script(_RENEW)
        self._fenced = self.r.register_script(_FENCED)
        self._many = self.r.register_script(_GET_MANY)
        self._walk_target = self.r.register_script(_WALK_TARGET)
        self._expired = self.r.register_script(_EXPIRED)
        self._lost = self.r.register_script(_LOST)
        self._take_over = self.r.register_script(_TAKE_OVER)
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
        if not ids:
            return []
        try:
            return list(json.loads(self._many(keys=[self.k(kind, i) for i in ids])))
        except ValueError:  # a field that is not a JSON value (written by hand): field by field
            pass
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
        p.zadd(self.k("jobs-state", job["state"]), {job["id"]: job["created_at"]})
        p.zadd(self.k("jobs-ks", job["kind"], job["state"]), {job["id"]: job["created_at"]})
        for target in dict.fromkeys(job.get("targets") or ()):
            p.zadd(self.k("jobs-target", target), {job["id"]: job["created_at"]})
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

    def update_job(self, job_id: str, *, fence: int | None = None, **changes: Any) -> None:
        """Set fields of a job; with *fence* (an attempt number), only while that attempt runs
        it (else :class:`~evc.errors.StaleAttempt`)."""
        if fence is None:
            self.r.hset(self.k("job", job_id), mapping=_dump(changes))
            return
        args = [x for kv in _dump(changes).items() for x in kv]
        self._fenced_write(job_id, fence, self.k("job", job_id), "HSET", *args)

    def _fenced_write(self, job_id: str, attempt: int, key: str, command: str, *args: Any) -> Any:
        ok, reply = self._fenced(keys=[self.k("job", job_id), key], args=[self.prefix, job_id, attempt, command, *args])
        if not ok:
            raise StaleAttempt(f"attempt {attempt} of job {job_id} no longer runs it", job_id=job_id)
        return reply

    def transition_job(
        self,
        job_id: str,
        state: str,
        allowed_from: Iterable[str],
        *,
        fence: int | None = None,
        event: JSON | None = None,
        **changes: Any,
    ) -> bool:
        """Atomically move a job to *state* if it is in one of *allowed_from* (and, with
        *fence* (an attempt number), only while that attempt runs it, else
        :class:`~evc.errors.StaleAttempt`), keeping its indexes and appending *event* in the
        same step."""
        args: list[Any] = [
            json.dumps(state), json.dumps(list(allowed_from)), self.prefix, job_id,
            "" if fence is None else fence, json.dumps(event) if event else "",
        ]  # fmt: skip
        for k, v in _dump(changes).items():
            args += [k, v]
        prev = self._transition(keys=[self.k("job", job_id)], args=args)
        if prev is None:
            raise NotFound(f"job {job_id} not found", id=job_id)
        if prev == b"stale":
            raise StaleAttempt(f"attempt {fence} of job {job_id} no longer runs it", job_id=job_id)
        return json.loads(prev) in set(allowed_from)

    def start_job(self, job_id: str, lease_s: float, max_lost: int) -> tuple[str, int, int]:
        """Begin an execution: ``(what, attempt, lost)``, what is ``started`` (with a new
        attempt number and a lease it owns), ``busy`` (a live attempt runs the job), ``final``
        or ``lost`` (its workers were lost *max_lost* times: the job is now failed)."""
        what, attempt, lost = self._start(
            keys=[self.k("job", job_id)],
            args=[self.prefix, job_id, int(lease_s * 1000), max_lost, json.dumps(now())],
        )
        return what.decode(), int(attempt), int(lost)

    def requeue_lost_job(self, job_id: str, max_lost: int) -> tuple[str, int, int]:
        """Re-queue (or fail, past *max_lost*) a running job whose lease expired on Redis's
        clock: ``(what, attempt, lost)``, what is ``requeued``, ``failed`` or ``skipped``."""
        what, attempt, lost = self._lost(
            keys=[self.k("job", job_id)], args=[self.prefix, job_id, max_lost, json.dumps(now())]
        )
        return what.decode(), int(attempt), int(lost)

    def claim_job_effect(self, job_id: str, effect: str, attempt: int | None) -> bool:
        """True the first time *effect* of the job is claimed (by a live attempt when given)."""
        key = self.k("job", job_id, "effects")
        if attempt is None:
            return bool(self.r.hsetnx(key, effect, json.dumps(None)))
        return bool(self._fenced_write(job_id, attempt, key, "HSETNX", effect, json.dumps(attempt)))

    def renew_lease(self, job_id: str, attempt: int, lease_s: float) -> bool:
        """Extend the lease of (job, attempt); False when that attempt is stale."""
        return bool(self._renew(keys=[self.k("job", job_id)], args=[self.prefix, job_id, attempt, int(lease_s * 1000)]))

    def list_jobs(
        self,
        offset: int = 0,
        limit: int = 50,
        kind: str | None = None,
        state: str | None = None,
        target: str | None = None,
    ) -> tuple[list[JSON], int]:
        """Jobs newest first, filtered by kind, state and target through their indexes."""
        if target is None:
            if kind and state:
                key = self.k("jobs-ks", kind, state)
            elif kind or state:
                key = self.k("jobs-kind", kind) if kind else self.k("jobs-state", state or "")
            else:
                key = self.k("jobs")
            pipe = self.r.pipeline(transaction=False)
            pipe.zcard(key)
            pipe.zrevrange(key, offset, offset + limit - 1)
            total, ids = pipe.execute()
            return self._get_many("job", (i.decode() for i in ids)), int(total)
        # one device's jobs: walk its index, reading only kind and state to filter
        key = self.k("jobs-target", target)
        if not (kind or state):
            pipe = self.r.pipeline(transaction=False)
            pipe.zcard(key)
            pipe.zrevrange(key, offset, offset + limit - 1)
            total, ids = pipe.execute()
            return self._get_many("job", (i.decode() for i in ids)), int(total)
        found = self._walk_target(
            keys=[key],
            args=[self.prefix, json.dumps(kind) if kind else "", json.dumps(state) if state else "", offset, limit],
        )
        return self._get_many("job", (i.decode() for i in found[1:])), int(found[0])

    def waiting_jobs(self, older_than_s: float, limit: int = 1000) -> list[JSON]:
        """Queued jobs (oldest first, at most *limit*) that have waited *older_than_s* past
        their queueing (or their countdown): ``id``, ``kind``, ``attempt`` of each."""
        ids = [i.decode() for i in self.r.zrange(self.k("jobs-state", "queued"), 0, limit - 1)]
        pipe = self.r.pipeline(transaction=False)
        names = ["id", "kind", "attempt", "state", "queued_at", "not_before", "created_at"]
        for i in ids:
            pipe.hmget(self.k("job", i), names)
        cutoff, out = now() - older_than_s, []
        for values in pipe.execute():
            if values[0] is None:
                continue
            rec = {n: json.loads(v) for n, v in zip(names, values, strict=True) if v is not None}
            since = max(float(rec.get(f) or 0) for f in ("queued_at", "not_before", "created_at"))
            if rec.get("state") == "queued" and since <= cutoff:
                out.append(rec)
        return out

    def jobs_in_queue(self, queue: str, max_scan: int = 100_000) -> set[str] | None:
        """Ids of the jobs whose task messages wait in Celery *queue* (None when the queue is
        longer than *max_scan*: too long to read)."""
        if int(self.r.llen(queue)) > max_scan:
            return None
        found: set[str] = set()
        start = 0
        while True:
            chunk = self.r.lrange(queue, start, start + 999)
            for raw in chunk:
                found.update(m.decode() for m in _JOB_ID.findall(raw))
            if len(chunk) < 1000:
                return found
            start += 1000

    def index_old_jobs(self, batch: int = 1000) -> int:
        """Add jobs stored before the state/target/finished indexes existed to them (once: a
        marker key records that it ran). Returns how many jobs were read."""
        marker = self.k("index-version", "jobs")
        if self.r.exists(marker):
            return 0
        seen, start = 0, 0
        names = ["id", "kind", "state", "targets", "created_at", "finished_at"]
        while True:
            ids = [i.decode() for i in self.r.zrange(self.k("jobs"), start, start + batch - 1)]
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self.k("job", i), names)
            rows = pipe.execute()
            pipe = self.r.pipeline(transaction=False)
            for values in rows:
                if values[0] is None:
                    continue
                rec = {n: json.loads(v) for n, v in zip(names, values, strict=True) if v is not None}
                jid, score = rec["id"], float(rec.get("created_at") or 0)
                pipe.zadd(self.k("jobs-state", rec["state"]), {jid: score})
                pipe.zadd(self.k("jobs-ks", rec["kind"], rec["state"]), {jid: score})
                for t in rec.get("targets") or []:
                    pipe.zadd(self.k("jobs-target", t), {jid: score})
                if rec["state"] in TERMINAL_STATES:
                    pipe.zadd(self.k("jobs-finished"), {jid: float(rec.get("finished_at") or score) * 1000})
            pipe.execute()
            seen += len(ids)
            start += batch
        self.r.set(marker, json.dumps(now()))
        return seen

    def prune_jobs(self, older_than_s: float, batch: int = 500) -> int:
        """Delete jobs finished more than *older_than_s* ago (on Redis's clock) with their
        events, results, FL records and index entries. Returns how many went."""
        self.index_old_jobs()
        sec, usec = self.r.time()
        cutoff = (int(sec) - older_than_s) * 1000 + int(usec) // 1000
        deleted = 0
        while True:
            ids = [i.decode() for i in self.r.zrangebyscore(self.k("jobs-finished"), "-inf", cutoff, 0, batch)]
            if not ids:
                return deleted
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self.k("job", i), ["kind", "state", "targets"])
            metas = pipe.execute()
            pipe = self.r.pipeline(transaction=True)
            for i, (kind, state, targets) in zip(ids, metas, strict=True):
                kind = json.loads(kind) if kind else ""
                state = json.loads(state) if state else ""
                pipe.delete(
                    self.k("job", i), self.k("job", i, "events"), self.k("job", i, "results"),
                    self.k("job", i, "effects"), self.k("fl", i), self.k("fl", i, "rounds"), self.k("fl", i, "late"),
                )  # fmt: skip
                pipe.zrem(self.k("jobs"), i)
                pipe.zrem(self.k("jobs-finished"), i)
                pipe.zrem(self.k("jobs-kind", kind), i)
                pipe.zrem(self.k("jobs-state", state), i)
                pipe.zrem(self.k("jobs-ks", kind, state), i)
                pipe.srem(self.k("fl", "active"), i)
                for t in json.loads(targets) if targets else []:
                    pipe.zrem(self.k("jobs-target", t), i)
            pipe.execute()
            deleted += len(ids)

    # a lease per job whose task body is executing, owned by its attempt and judged on Redis's
    # clock: the worker renews it; the reaper re-queues jobs whose lease expired
    def release_lease(self, job_id: str) -> None:
        self.r.zrem(self.k("job-leases"), job_id)

    def expired_leases(self) -> list[str]:
        return [j.decode() for j in self._expired(keys=[self.k("job-leases")])]

    def add_event(self, job_id: str, event: JSON, *, fence: int | None = None) -> int:
        return self.add_events(job_id, [event], fence=fence)

    def add_events(self, job_id: str, events: list[JSON], *, fence: int | None = None) -> int:
        key = self.k("job", job_id, "events")
        if not events:
            return int(self.r.llen(key))
        t = now()
        raw = [json.dumps({"ts": t, **e}) for e in events]
        if fence is not None:
            return int(self._fenced_write(job_id, fence, key, "RPUSH", *raw))
        return int(self.r.rpush(key, *raw))

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[JSON]:
        raw = self.r.lrange(self.k("job", job_id, "events"), after, after + limit - 1)
        return [{"seq": after + i + 1, **json.loads(e)} for i, e in enumerate(raw)]

    def event_count(self, job_id: str) -> int:
        return int(self.r.llen(self.k("job", job_id, "events")))

    def set_result(self, job_id: str, target: str, result: JSON, *, fence: int | None = None) -> bool:
        """Record a target's result; True when the target had none yet (a retry overwrites).
        With *fence*, only while that attempt runs the job (else StaleAttempt)."""
        key = self.k("job", job_id, "results")
        if fence is not None:
            return bool(self._fenced_write(job_id, fence, key, "HSET", target, json.dumps(result)))
        return bool(self.r.hset(key, target, json.dumps(result)))

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

    def take_over_lock(self, name: str, holder: str, owner: str, ttl_s: float) -> bool:
        """Give *owner* the lock that *holder* has (a stale attempt of the same job)."""
        return bool(self._take_over(keys=[self.k("lock", name)], args=[holder, owner, int(ttl_s * 1000)]))

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
