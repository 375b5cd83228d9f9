"""RedisWorkflowStorage: workflow state in Redis (the ``redis`` extra, redis-py asyncio).

Keys under ``key_prefix``: a hash per run and per step, a list plus a hash per run for its
step history, and per workflow a sorted set of runs a worker may claim, scored by when
(creation time while queued, lease expiry while running). Every multi-key change is one
Lua script (``redis_scripts``), so it is atomic; times are Redis server time. The run lock
is ``SET NX PX`` with an owner token, extended and released only by its owner (Lua), taken
with a bounded number of retries.

The scripts that start a run, hand it back or end it PUBLISH a wake-up, which waiters
receive on pub/sub connections of their own (``redis_wakeups``). Ended runs are indexed
by end time, so that ``prune`` finds them without scanning.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, Unpack

import anyio

from .._core.errors import DatabaseError, InvalidArgumentError
from .._core.validate import check_seconds, to_json
from . import redis_scripts as scripts
from . import storage
from .redis_wakeups import wakeups
from .storage import RunRecord, RunStatus, StepAttempt, StepRecord, StepStatus, Wakeup

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisWorkflowStorage"]

P = ParamSpec("P")
R = TypeVar("R")
_LOCK_TRIES = 3
_LOCK_RETRY_DELAY = 0.05
_PRUNE_BATCH = 200
"""Runs deleted per script call: each call blocks the server while it runs."""
_PRUNE_LOCK_TTL = 60.0
"""Seconds the prune lock outlives a process that died holding it (renewed per batch)."""


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
                "create": scripts.CREATE,
                "claim": scripts.CLAIM,
                "renew": scripts.RENEW,
                "update": scripts.UPDATE,
                "cancel": scripts.CANCEL,
                "retry": scripts.RETRY,
                "attempt": scripts.ATTEMPT,
                "mark": scripts.MARK,
                "prune": scripts.PRUNE,
                "extend": scripts.EXTEND_LOCK,
                "release": scripts.RELEASE_LOCK,
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
            f"{p}steps:{workflow_id}",  # every step key of the run, for pruning
        ]

    # -- runs --------------------------------------------------------------------------

    @_translated
    async def create_run(
        self, workflow_id: str, workflow: str, input: Any
    ) -> tuple[RunRecord, bool]:
        text = to_json("input", input)
        created, raw = await self._scripts["create"](
            keys=[self._run_key(workflow_id), self._ready_key(workflow)],
            args=[workflow_id, workflow, text, self.key_prefix],
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
        self, workflow_id: str, status: RunStatus, **change: Unpack[storage.RunChange]
    ) -> bool:
        owner, output, error = change.get("owner"), change.get("output"), change.get("error")
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
    async def retry_run(self, workflow_id: str) -> RunRecord | None:
        raw = await self._scripts["retry"](
            keys=[self._run_key(workflow_id)], args=[self.key_prefix, workflow_id]
        )
        return _record(workflow_id, _pairs(raw)) if raw else None

    @_translated
    async def run_history(self, workflow_id: str) -> list[StepAttempt]:
        _, history, entries, _ = self._step_keys(workflow_id, "")
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
        key, _, _, steps = self._step_keys(workflow_id, name)
        await self._redis.sadd(steps, key)  # first: a step key pruning cannot find is never made
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
            retried_attempts=int(h.get("retried") or 0),
        )

    @_translated
    async def create_attempt(self, workflow_id: str, name: str) -> int:
        return int(
            await self._scripts["attempt"](keys=self._step_keys(workflow_id, name), args=[name])
        )

    @_translated
    async def mark_step(
        self, workflow_id: str, name: str, status: StepStatus, **change: Unpack[storage.StepChange]
    ) -> None:
        attempt, output, error = change.get("attempt"), change.get("output"), change.get("error")
        step, _, entries, steps = self._step_keys(workflow_id, name)
        await self._scripts["mark"](
            keys=[step, entries, steps],
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

    # -- waiting and retention ---------------------------------------------------------

    def work_wakeups(self) -> AbstractAsyncContextManager[Wakeup]:
        return wakeups(self._redis, f"{self.key_prefix}wake:work")

    def end_wakeups(self, workflow_id: str) -> AbstractAsyncContextManager[Wakeup]:
        return wakeups(self._redis, f"{self.key_prefix}wake:ended:{workflow_id}")

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        yield  # workers need nothing kept for them

    @_translated
    async def prune(self, older_than: float, *, exclusive: bool = False) -> int:
        """Runs that ended before this storage indexed runs by end time are not found."""
        age = int(check_seconds("older_than", older_than) * 1000)
        lock, token = f"{self.key_prefix}prune-lock", uuid.uuid4().hex
        ttl = int(_PRUNE_LOCK_TTL * 1000)
        if exclusive and not await self._redis.set(lock, token, nx=True, px=ttl):
            return 0  # another process is pruning
        total = 0
        try:
            while True:
                looked, gone = await self._scripts["prune"](
                    keys=[f"{self.key_prefix}ended"], args=[self.key_prefix, age, _PRUNE_BATCH]
                )
                total += int(gone)
                if int(looked) < _PRUNE_BATCH:
                    return total
                if exclusive and not await self._scripts["extend"](keys=[lock], args=[token, ttl]):
                    return total  # the lock lapsed: another process may have taken over
        finally:
            if exclusive:
                with anyio.CancelScope(shield=True):
                    await self._scripts["release"](keys=[lock], args=[token])

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
