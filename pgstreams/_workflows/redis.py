"""RedisWorkflowStorage: workflow state in Redis (the ``redis`` extra, redis-py asyncio).

Keys under ``key_prefix``: a hash per run and per step, a list plus a hash per run for its
step history, and per workflow a sorted set of runs a worker may claim, scored by when
(creation time while queued, lease expiry while running). Every multi-key change is one
Lua script, so it is atomic; times are Redis server time. The run lock is ``SET NX PX``
with an owner token, extended and released only by its owner (Lua), taken with a bounded
number of retries.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio

from .._core.errors import DatabaseError, InvalidArgumentError
from .._core.validate import to_json
from .storage import RunRecord, RunStatus, StepAttempt, StepRecord, StepStatus

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisWorkflowStorage"]

P = ParamSpec("P")
R = TypeVar("R")
_LOCK_TRIES = 3
_LOCK_RETRY_DELAY = 0.05

# KEYS[1] run hash, KEYS[2] the workflow's ready set. ARGV: id, workflow, input json.
# Returns {created (1/0), the run's hash}.
_CREATE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('HGETALL', KEYS[1])} end
redis.call('HSET', KEYS[1], 'workflow', ARGV[2], 'status', 'queued', 'input', ARGV[3],
           'executions', 0, 'cancel_requested', 0, 'created_at', now, 'updated_at', now)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: ready sets of the workflows. ARGV: key prefix, owner, lease ms. Returns
# {id, the run's hash}, or false.
_CLAIM = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
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

# The ready set of the run in KEYS[1] (ARGV[1] is the key prefix): found by the script, so
# callers need no round trip to learn the run's workflow first.
_READY = """
local ready = ARGV[1] .. 'ready:' .. (redis.call('HGET', KEYS[1], 'workflow') or '')
"""

# KEYS[1] run. ARGV: key prefix, id, owner, lease ms. Returns 1 if renewed.
_RENEW = (
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
_UPDATE = (
    _READY
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4]
   or status == 'completed' or status == 'failed' or status == 'cancelled') then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'output', ARGV[5], 'error', ARGV[6],
           'updated_at', now)
redis.call('HDEL', KEYS[1], 'lease_until')
if ARGV[3] == 'queued' then
    redis.call('HDEL', KEYS[1], 'owner')
    redis.call('ZADD', ready, now, ARGV[2])
elseif ARGV[3] ~= 'running' then
    redis.call('ZREM', ready, ARGV[2])
end
return 1
"""
)

# KEYS[1] run. ARGV: key prefix, id. Returns the run's hash after (empty if none).
_CANCEL = (
    _READY
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {} end
if status == 'queued' then
    redis.call('HSET', KEYS[1], 'status', 'cancelled')
    redis.call('ZREM', ready, ARGV[2])
elseif status == 'running' then
    redis.call('HSET', KEYS[1], 'cancel_requested', 1)
end
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS[1] step, KEYS[2] history list, KEYS[3] history entries. ARGV: step name.
_ATTEMPT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running')
local entry = ARGV[1] .. '\\31' .. n
redis.call('RPUSH', KEYS[2], entry)
redis.call('HSET', KEYS[3], entry, cjson.encode({status = 'running', started_at = now}))
return n
"""

# KEYS[1] step, KEYS[2] history entries. ARGV: name, status, attempt ('' = none),
# output json ('' = none), error json ('' = none).
_MARK = """
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'output', ARGV[4], 'error', ARGV[5])
redis.call('HSETNX', KEYS[1], 'attempts', 0)
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

_EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _translated(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Redis errors as the library's: connection trouble and failover states are
    ``DatabaseError(transient=True)`` (a worker rides them out), anything else a plain
    ``DatabaseError``."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from redis import exceptions as e

        try:
            return await fn(*args, **kwargs)
        except (
            e.ConnectionError,
            e.TimeoutError,
            e.ReadOnlyError,  # a replica, right after a failover
            e.TryAgainError,
            e.ClusterDownError,
            e.MasterDownError,
            e.BusyLoadingError,
            e.OutOfMemoryError,
        ) as exc:
            raise DatabaseError(f"Redis: {exc}", transient=True) from exc
        except e.RedisError as exc:
            raise DatabaseError(f"Redis: {exc}") from exc

    return wrapper


class RedisWorkflowStorage:
    """Workflow state in Redis (see module docstring). Give a URL (the storage makes and
    closes its client) or a ``redis.asyncio.Redis`` you own (``close()`` leaves it open)."""

    def __init__(self, url_or_client: str | Redis, *, key_prefix: str = "pgstreams:wf:") -> None:
        try:
            from redis.asyncio import Redis
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise InvalidArgumentError(
                "RedisWorkflowStorage needs the redis extra: pip install 'pgstreams[redis]'"
            ) from exc
        if isinstance(url_or_client, str):
            self._redis: Redis = Redis.from_url(url_or_client)
            self._owned = True
        elif isinstance(url_or_client, Redis):
            self._redis = url_or_client
            self._owned = False
        else:
            raise InvalidArgumentError(f"expected a Redis URL or client, got {url_or_client!r}")
        if not isinstance(key_prefix, str):
            raise InvalidArgumentError(f"key_prefix must be a str, got {key_prefix!r}")
        self.key_prefix = key_prefix
        self._scripts = {
            name: self._redis.register_script(text)
            for name, text in {
                "create": _CREATE,
                "claim": _CLAIM,
                "renew": _RENEW,
                "update": _UPDATE,
                "cancel": _CANCEL,
                "attempt": _ATTEMPT,
                "mark": _MARK,
                "extend": _EXTEND_LOCK,
                "release": _RELEASE_LOCK,
            }.items()
        }

    # -- keys --------------------------------------------------------------------------

    def _run_key(self, workflow_id: str) -> str:
        return f"{self.key_prefix}run:{workflow_id}"

    def _ready_key(self, workflow: str) -> str:
        return f"{self.key_prefix}ready:{workflow}"

    def _step_keys(self, workflow_id: str, name: str) -> list[str]:
        p = self.key_prefix
        # The id's length keeps (run "a:b", step "c") apart from (run "a", step "b:c").
        return [
            f"{p}step:{len(workflow_id)}:{workflow_id}:{name}",
            f"{p}history:{workflow_id}",
            f"{p}attempts:{workflow_id}",
        ]

    # -- runs --------------------------------------------------------------------------

    @_translated
    async def create_run(
        self, workflow_id: str, workflow: str, input: Any
    ) -> tuple[RunRecord, bool]:
        text = to_json("input", input)
        created, raw = await self._scripts["create"](
            keys=[self._run_key(workflow_id), self._ready_key(workflow)],
            args=[workflow_id, workflow, text],
        )
        run = _record(workflow_id, _pairs(raw))
        assert run is not None
        return run, bool(created)

    @_translated
    async def get_run(self, workflow_id: str) -> RunRecord | None:
        raw = await self._redis.hgetall(self._run_key(workflow_id))
        return _record(workflow_id, {_text(k) or "": _text(v) for k, v in raw.items()})

    @_translated
    async def claim_run(
        self, workflows: Sequence[str], owner: str, lease: float
    ) -> RunRecord | None:
        if not workflows:
            return None
        claimed = await self._scripts["claim"](
            keys=[self._ready_key(w) for w in workflows],
            args=[self.key_prefix, owner, int(lease * 1000)],
        )
        if not claimed:
            return None
        return _record(_text(claimed[0]) or "", _pairs(claimed[1]))

    @_translated
    async def renew_run(self, workflow_id: str, owner: str, lease: float) -> bool:
        renewed = await self._scripts["renew"](
            keys=[self._run_key(workflow_id)],
            args=[self.key_prefix, workflow_id, owner, int(lease * 1000)],
        )
        return bool(renewed)

    @_translated
    async def update_run(
        self,
        workflow_id: str,
        status: RunStatus,
        *,
        owner: str | None = None,
        output: Any = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        updated = await self._scripts["update"](
            keys=[self._run_key(workflow_id)],
            args=[
                self.key_prefix,
                workflow_id,
                status,
                owner or "",
                "" if output is None else to_json("output", output),
                "" if error is None else json.dumps(error),
            ],
        )
        return bool(updated)

    @_translated
    async def request_cancel(self, workflow_id: str) -> RunRecord | None:
        raw = await self._scripts["cancel"](
            keys=[self._run_key(workflow_id)], args=[self.key_prefix, workflow_id]
        )
        return _record(workflow_id, _pairs(raw))

    @_translated
    async def run_history(self, workflow_id: str) -> list[StepAttempt]:
        _, history, entries = self._step_keys(workflow_id, "")
        order = [_text(e) or "" for e in await self._redis.lrange(history, 0, -1)]
        if not order:
            return []
        found = await self._redis.hmget(entries, order)
        attempts = []
        for key, raw in zip(order, found, strict=True):
            step, _, number = key.rpartition("\x1f")
            e = json.loads(_text(raw) or "{}")
            attempts.append(
                StepAttempt(
                    workflow_id=workflow_id,
                    step=step,
                    attempt=int(number),
                    status=e.get("status", "running"),
                    output=_json(e.get("output")),
                    error=_json(e.get("error")),
                    started_at=_time(e.get("started_at")),
                    finished_at=_time(e.get("finished_at")),
                )
            )
        return attempts

    # -- steps -------------------------------------------------------------------------

    @_translated
    async def insert_step(self, workflow_id: str, name: str) -> StepRecord:
        key = self._step_keys(workflow_id, name)[0]
        await self._redis.hsetnx(key, "status", "scheduled")
        await self._redis.hsetnx(key, "attempts", 0)
        step = await self.get_step(workflow_id, name)
        assert step is not None
        return step

    @_translated
    async def get_step(self, workflow_id: str, name: str) -> StepRecord | None:
        raw = await self._redis.hgetall(self._step_keys(workflow_id, name)[0])
        if not raw:
            return None
        h = {_text(k): _text(v) for k, v in raw.items()}
        return StepRecord(
            workflow_id=workflow_id,
            name=name,
            status=h["status"],  # type: ignore[arg-type]
            attempts=int(h.get("attempts") or 0),
            output=_json(h.get("output")),
            error=_json(h.get("error")),
        )

    @_translated
    async def create_attempt(self, workflow_id: str, name: str) -> int:
        return int(
            await self._scripts["attempt"](keys=self._step_keys(workflow_id, name), args=[name])
        )

    @_translated
    async def mark_step(
        self,
        workflow_id: str,
        name: str,
        status: StepStatus,
        *,
        attempt: int | None = None,
        output: Any = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        step, _, entries = self._step_keys(workflow_id, name)
        await self._scripts["mark"](
            keys=[step, entries],
            args=[
                name,
                status,
                "" if attempt is None else str(attempt),
                "" if output is None else to_json("step output", output),
                "" if error is None else json.dumps(error),
            ],
        )

    # -- the run lock ------------------------------------------------------------------

    def _lock_key(self, workflow_id: str) -> str:
        return f"{self.key_prefix}lock:{workflow_id}"

    @_translated
    async def lock_run(self, workflow_id: str, owner: str, ttl: float) -> bool:
        for attempt in range(_LOCK_TRIES):
            if await self._redis.set(
                self._lock_key(workflow_id), owner, nx=True, px=int(ttl * 1000)
            ):
                return True
            if attempt + 1 < _LOCK_TRIES:
                await anyio.sleep(_LOCK_RETRY_DELAY)
        return False

    @_translated
    async def extend_lock(self, workflow_id: str, owner: str, ttl: float) -> bool:
        extended = await self._scripts["extend"](
            keys=[self._lock_key(workflow_id)], args=[owner, int(ttl * 1000)]
        )
        return bool(extended)

    @_translated
    async def unlock_run(self, workflow_id: str, owner: str) -> None:
        with anyio.CancelScope(shield=True):
            await self._scripts["release"](keys=[self._lock_key(workflow_id)], args=[owner])

    async def close(self) -> None:
        if self._owned:
            await self._redis.aclose()

    def __repr__(self) -> str:
        return f"RedisWorkflowStorage(key_prefix={self.key_prefix!r})"


def _pairs(flat: list[Any]) -> dict[str, str | None]:
    """A hash as a script returns HGETALL: a flat list of fields and values."""
    return {_text(flat[i]) or "": _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _record(workflow_id: str, h: dict[str, str | None]) -> RunRecord | None:
    """A run from its hash (None for an empty one: no such run)."""
    if not h:
        return None
    return RunRecord(
        workflow_id=workflow_id,
        workflow=h.get("workflow") or "",
        status=h["status"],  # type: ignore[arg-type]
        input=_json(h.get("input")),
        output=_json(h.get("output")),
        error=_json(h.get("error")),
        executions=int(h.get("executions") or 0),
        cancel_requested=h.get("cancel_requested") == "1",
        owner=h.get("owner") or None,
        created_at=_time(h.get("created_at")),
        updated_at=_time(h.get("updated_at")),
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _json(text: Any) -> Any:
    return None if text in (None, "") else json.loads(text)


def _time(ms: Any) -> datetime | None:
    return None if ms in (None, "") else datetime.fromtimestamp(int(ms) / 1000, UTC)
