"""The Lua scripts of RedisWorkflowStorage: each multi-key change in one atomic script.

Keys, under the storage's key prefix ``p``: ``run:<id>`` (hash), ``ready:<workflow>``
(sorted set of claimable runs: creation time while queued, lease expiry while running),
``step:<len(id)>:<id>:<name>`` (hash), ``steps:<id>`` (set of the run's step keys, for
pruning), ``history:<id>`` (list) and ``attempts:<id>`` (hash) for the step history,
``ended`` (sorted set of ended runs by end time, for pruning), ``lock:<id>`` and
``prune-lock`` (owner-token locks). Times are Redis server time, in milliseconds.

Wake-ups are PUBLISHed by the scripts that make them true: ``<p>wake:work`` when a run is
created or handed back to the queue, ``<p>wake:ended:<id>`` when a run ends.
"""

from __future__ import annotations

__all__ = [
    "ATTEMPT",
    "CANCEL",
    "CLAIM",
    "CREATE",
    "EXTEND_LOCK",
    "MARK",
    "PRUNE",
    "RELEASE_LOCK",
    "RENEW",
    "RETRY",
    "UPDATE",
]

_NOW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
"""

# KEYS[1] run hash, KEYS[2] the workflow's ready set. ARGV: id, workflow, input json,
# key prefix. Returns {created (1/0), the run's hash}.
CREATE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('HGETALL', KEYS[1])} end
redis.call('HSET', KEYS[1], 'workflow', ARGV[2], 'status', 'queued', 'input', ARGV[3],
           'executions', 0, 'cancel_requested', 0, 'created_at', now, 'updated_at', now)
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PUBLISH', ARGV[4] .. 'wake:work', '')
return {1, redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: ready sets of the workflows. ARGV: key prefix, owner, lease ms. Returns
# {id, the run's hash}, or false.
CLAIM = (
    _NOW
    + """
local best, best_key, best_score = nil, nil, nil
for _, key in ipairs(KEYS) do
    local first = redis.call('ZRANGE', key, '-inf', now, 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
    if first[1] and (best_score == nil or tonumber(first[2]) < best_score) then
        best, best_key, best_score = first[1], key, tonumber(first[2])
    end
end
if best == nil then return false end
local run = ARGV[1] .. 'run:' .. best
local until_ms = now + tonumber(ARGV[3])
redis.call('HSET', run, 'status', 'running', 'owner', ARGV[2], 'lease_until', until_ms,
           'updated_at', now)
redis.call('HINCRBY', run, 'executions', 1)
redis.call('ZADD', best_key, until_ms, best)
return {best, redis.call('HGETALL', run)}
"""
)

# The ready set of the run in KEYS[1] (ARGV[1] is the key prefix): found by the script, so
# callers need no round trip to learn the run's workflow first.
_READY = """
local ready = ARGV[1] .. 'ready:' .. (redis.call('HGET', KEYS[1], 'workflow') or '')
"""

# A run that ended (the status in `status`, its id in ARGV[2]): indexed for pruning, and
# its result() waiters woken.
_ENDED = """
local function ended(status, id, now)
    if status == 'completed' or status == 'failed' or status == 'cancelled' then
        redis.call('ZADD', ARGV[1] .. 'ended', now, id)
        redis.call('PUBLISH', ARGV[1] .. 'wake:ended:' .. id, '')
    else
        redis.call('ZREM', ARGV[1] .. 'ended', id)
    end
end
"""

# KEYS[1] run. ARGV: key prefix, id, owner, lease ms. Returns 1 if renewed.
RENEW = (
    _READY
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[3]
   or redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local t = redis.call('TIME')
local until_ms = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'lease_until', until_ms)
redis.call('ZADD', ready, until_ms, ARGV[2])
return 1
"""
)

# KEYS[1] run. ARGV: key prefix, id, status, owner ('' = any), output, error.
UPDATE = (
    _READY
    + _ENDED
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4]
   or status == 'completed' or status == 'failed' or status == 'cancelled') then return 0 end
"""
    + _NOW
    + """
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'output', ARGV[5], 'error', ARGV[6],
           'updated_at', now)
redis.call('HDEL', KEYS[1], 'lease_until')
if ARGV[3] == 'queued' then
    redis.call('HDEL', KEYS[1], 'owner')
    redis.call('ZADD', ready, now, ARGV[2])
    redis.call('PUBLISH', ARGV[1] .. 'wake:work', '')
elseif ARGV[3] ~= 'running' then
    redis.call('ZREM', ready, ARGV[2])
end
ended(ARGV[3], ARGV[2], now)
return 1
"""
)

# KEYS[1] run. ARGV: key prefix, id. Returns the run's hash after (empty if none).
CANCEL = (
    _READY
    + _ENDED
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {} end
if status == 'queued' then
"""
    + _NOW
    + """
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'updated_at', now)
    redis.call('ZREM', ready, ARGV[2])
    ended('cancelled', ARGV[2], now)
elseif status == 'running' then
    redis.call('HSET', KEYS[1], 'cancel_requested', 1)
end
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS[1] run. ARGV: key prefix, id. A failed or cancelled run back to the queue, its
# unfinished steps with a fresh attempt budget. Returns the run's hash after, or {} when
# the run is unknown or in any other state.
RETRY = (
    _READY
    + _ENDED
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'failed' and status ~= 'cancelled' then return {} end
"""
    + _NOW
    + """
redis.call('HSET', KEYS[1], 'status', 'queued', 'output', '', 'error', '',
           'cancel_requested', 0, 'updated_at', now)
redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
for _, key in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'steps:' .. ARGV[2])) do
    if redis.call('HGET', key, 'status') ~= 'succeeded' then
        redis.call('HSET', key, 'status', 'scheduled',
                   'retried', redis.call('HGET', key, 'attempts') or 0)
    end
end
redis.call('ZADD', ready, now, ARGV[2])
ended('queued', ARGV[2], now)
redis.call('PUBLISH', ARGV[1] .. 'wake:work', '')
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS[1] step, KEYS[2] history list, KEYS[3] history entries, KEYS[4] the run's step set.
# ARGV: step name.
ATTEMPT = (
    _NOW
    + """
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('SADD', KEYS[4], KEYS[1])
local entry = ARGV[1] .. '\\31' .. n
redis.call('RPUSH', KEYS[2], entry)
redis.call('HSET', KEYS[3], entry, cjson.encode({status = 'running', started_at = now}))
return n
"""
)

# KEYS[1] step, KEYS[2] history entries, KEYS[3] the run's step set. ARGV: name, status,
# attempt ('' = none), output json ('' = none), error json ('' = none).
MARK = """
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'output', ARGV[4], 'error', ARGV[5])
redis.call('HSETNX', KEYS[1], 'attempts', 0)
redis.call('SADD', KEYS[3], KEYS[1])
if ARGV[3] ~= '' then
    local entry = ARGV[1] .. '\\31' .. ARGV[3]
    local old = redis.call('HGET', KEYS[2], entry)
    if old then
        local t = redis.call('TIME')
        local e = cjson.decode(old)
        e.status = ARGV[2]
        e.output = ARGV[4]
        e.error = ARGV[5]
        if ARGV[2] == 'succeeded' or ARGV[2] == 'failed' then
            e.finished_at = t[1] * 1000 + math.floor(t[2] / 1000)
        end
        redis.call('HSET', KEYS[2], entry, cjson.encode(e))
    end
end
return 1
"""

# KEYS[1] the ended set. ARGV: key prefix, age ms, n. Deletes the (at most n) runs that
# ended longest ago, if more than `age` ago, with their steps and history; a run found no
# longer ended (retried meanwhile) only leaves the set. Returns {runs looked at, deleted}.
PRUNE = (
    _NOW
    + """
local cutoff = '(' .. (now - tonumber(ARGV[2]))
local ids = redis.call('ZRANGE', KEYS[1], '-inf', cutoff, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]))
local gone = 0
for _, id in ipairs(ids) do
    local run = ARGV[1] .. 'run:' .. id
    local status = redis.call('HGET', run, 'status')
    if status == 'completed' or status == 'failed' or status == 'cancelled' then
        local steps = ARGV[1] .. 'steps:' .. id
        for _, key in ipairs(redis.call('SMEMBERS', steps)) do redis.call('DEL', key) end
        redis.call('DEL', run, steps, ARGV[1] .. 'history:' .. id, ARGV[1] .. 'attempts:' .. id)
        gone = gone + 1
    end
    redis.call('ZREM', KEYS[1], id)
end
return {#ids, gone}
"""
)

EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
