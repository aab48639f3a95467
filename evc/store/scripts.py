"""The Lua scripts of the store, as sources (each part registers the ones it runs)."""

# A job's indexes, kept by the scripts that change its state: ``jobs-state:<state>`` and
# ``jobs-ks:<kind>:<state>`` (scored by creation time) answer filtered listings without a scan;
# ``jobs-finished`` (scored by finish time) is what retention prunes. Every script reads the
# time from Redis (one clock for every host), in milliseconds.
JOB_LUA = """
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
TRANSITION = (
    JOB_LUA
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
START = (
    JOB_LUA
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
RENEW = (
    JOB_LUA
    + """
local now = now_ms()
if not live(ARGV[1], ARGV[2], KEYS[1], ARGV[3], now) then return 0 end
redis.call('ZADD', ARGV[1] .. ':job-leases', now + tonumber(ARGV[4]), ARGV[2])
return 1
"""
)

# Records KEYS as one JSON array: each hash's fields are already JSON values (see _dump), so
# Redis joins them into documents and the client parses one reply, not one per record.
GET_MANY = """
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
WALK_TARGET = """
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

# Run one write for (job, attempt) only while that attempt runs the job with a live lease:
# KEYS[1] the job, KEYS[2] the key written; ARGV[1] prefix, ARGV[2] id, ARGV[3] attempt, ARGV[4]
# the command, ARGV[5..] its arguments. Returns {ok, the command's reply}; ok 0: stale.
FENCED = (
    JOB_LUA
    + """
if not live(ARGV[1], ARGV[2], KEYS[1], ARGV[3], now_ms()) then return {0, false} end
return {1, redis.call(ARGV[4], KEYS[2], unpack(ARGV, 5))}
"""
)

# A job whose lease expired on Redis's clock (KEYS[1]; ARGV[1] prefix, ARGV[2] id, ARGV[3] how
# often its worker may be lost, ARGV[4] the time in JSON): counted as lost once more, then
# queued again (with an event) or failed when the count is used up. Returns {what, attempt,
# lost}: 'requeued', 'failed' or 'skipped' (not running, or its lease is live after all).
LOST = (
    JOB_LUA
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
TAKE_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
"""

# Expired leases on Redis's clock: KEYS[1] the lease set. Returns the job ids.
EXPIRED = """
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
"""

# Consume one use of an enrollment token: KEYS[1] the record; ARGV[1] now. Returns
# 'ok', 'missing', 'expired', 'used_up' or 'revoked'.
CONSUME = """
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
RESOLVE = """
local id = redis.call('GET', KEYS[1])
if not id then return {} end
return redis.call('HGETALL', ARGV[1] .. id)
"""

# Commit a request's unit of work as operator token ARGV[1], only while that token is what the
# API cached: KEYS[1] its hash index names it, its record KEYS[2] is not revoked and still has
# the scopes ARGV[2] and expiry ARGV[3] (JSON as stored). Then the commands, ARGV[4]: one JSON
# array of commands, each an array of its words (strings), run in order, atomically like
# MULTI/EXEC (one argument: the client packs one string, not a hundred). Returns 1, or 0 with
# nothing written.
COMMIT_AS_TOKEN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local f = redis.call('HMGET', KEYS[2], 'revoked', 'scopes', 'expires_at')
if f[1] ~= 'false' or f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then return 0 end
for _, words in ipairs(cjson.decode(ARGV[4])) do redis.call(unpack(words)) end
return 1
"""

# Revoke operator token KEYS[2] unless it is the last usable admin token: KEYS[1] the token
# index; ARGV[1] the record key prefix, ARGV[2] the token id, ARGV[3] now, ARGV[4] revoked_at.
# Returns 'missing', 'last_admin' or 'ok'.
REVOKE_TOKEN = """
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

# Release lock KEYS[1] if ARGV[1] holds it: 1 when released, else 0.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: HSET the field/value pairs ARGV into KEYS[1] only when that hash exists (1 if updated)
HSET_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

#: compare-and-set on an FL job's hash: ARGV[1] = {field: [allowed encoded values]} (a
#: missing field reads as 'null'); ARGV[2..] field/value pairs set when every field matches
FL_CAS = """
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
FL_OUTCOME = """
local st = redis.call('HMGET', KEYS[1], 'token', 'phase')
if st[1] ~= ARGV[1] or st[2] ~= '"training"' then return 'late' end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 'duplicate' end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], ARGV[4]) end
return 'stored'
"""
