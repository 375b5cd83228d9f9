"""Helpers for the Scheduler's tests: a clean slate per test, instances on a shared
ManualClock, a stream pulled by hand, and waits for the leader and the consumers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import psycopg
import pytest

import pgstreams as ps

from .streams import until_idle

START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


async def clean(db: ps.Database) -> ps.Database:
    """``db`` without schedules or ticks (a test module shares one database)."""
    async with db.connection() as conn:
        await conn.execute("DELETE FROM pgstreams.schedules")
        await conn.execute("DELETE FROM pgstreams.schedule_ticks")
        await conn.execute("UPDATE pgstreams.scheduler_state SET alive_at = NULL")
    return db


def scheduler(db: ps.Database, clock: ps.ManualClock, **kwargs: Any) -> ps.Scheduler:
    return ps.Scheduler(db, clock=clock, poll_interval=1.0, **kwargs)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds (10 s at most)."""
    with anyio.fail_after(10):
        while not await check():  # noqa: ASYNC110 - the database has no event to await
            await anyio.sleep(0.01)


async def caught_up(sched: ps.Scheduler, clock: ps.ManualClock) -> None:
    """Wait until the leader has acted on every fire time up to the clock's now."""

    async def done() -> bool:
        return all(
            s.paused or s.next_fire_at is None or s.next_fire_at > clock.now()
            for s in await sched.list()
        )

    await eventually(done, "the leader to catch up")


async def leading(*scheds: ps.Scheduler) -> ps.Scheduler:
    found: list[ps.Scheduler] = []

    async def one() -> bool:
        found[:] = [s for s in scheds if s.is_leader]
        return len(found) == 1

    await eventually(one, "a leader")
    return found[0]


class Held:
    """A stream's iterator, pulled by hand: the current tick stays held until ``next``."""

    def __init__(self, stream: ps.Stream[ps.ScheduleTick]) -> None:
        self._stream = stream
        self._it = aiter(stream)

    async def next(self, within: float = 5) -> ps.ScheduleTick:
        with anyio.fail_after(within):
            return await anext(self._it)


@asynccontextmanager
async def held(sched: ps.Scheduler, schedule_id: str | None = None) -> AsyncIterator[Held]:
    async with sched.stream(schedule_id) as stream:
        yield Held(stream)


async def nothing_for(sched: ps.Scheduler, schedule_id: str, seconds: float) -> None:
    """A fresh consumer gets no tick of ``schedule_id`` within ``seconds``."""
    with anyio.move_on_after(seconds):  # cancelling it ends this consumer's stream
        tick = await sched.stream(schedule_id).first()
        pytest.fail(f"unexpected tick {tick}")


async def history(sched: ps.Scheduler, id: str) -> list[ps.ScheduleTick]:
    return sorted(await sched.history(id, limit=10_000), key=lambda t: t.scheduled_at)


async def leader_pid(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND a.application_name = 'pgstreams scheduler'"
        )
        rows = await cur.fetchall()
    assert len(rows) == 1, rows
    return int(rows[0][0])


@asynccontextmanager
async def two_instances(
    db: ps.Database, dsn: str, clock: ps.ManualClock
) -> AsyncIterator[tuple[ps.Scheduler, ps.Scheduler]]:
    """Schedulers "a" and "b" on one clock, each with its own Database (as two processes)."""
    async with ps.connect(dsn) as other:
        yield scheduler(db, clock, instance_id="a"), scheduler(other, clock, instance_id="b")


async def next_after(
    ticks: Held, db: ps.Database, act: Callable[[], Awaitable[Any]], *, leader: bool = True
) -> Any:
    """Once the consumer pulling from ``ticks`` and (if ``leader``) the leader both sleep,
    ``act``; return what ``act`` returned and the tick that came (within 5 s)."""
    got: list[ps.ScheduleTick] = []

    async def pull() -> None:
        got.append(await ticks.next(within=5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(pull)
        await until_idle(db, 2 if leader else 1)
        done = await act()
    return done, got[0]
