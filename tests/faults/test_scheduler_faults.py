"""Scheduler under injected failures: the leader's connection terminated or its statement
cancelled, consumer processes killed while they hold a tick.

Schedule time runs on a ManualClock where the test allows; leases and reconnects are real
time.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import anyio
import psycopg
import pytest

import pgstreams as ps

from .._killed_consumer import kill_when_ready
from ..pgserver import allow_connections, terminate_backends
from ..scheduling import (
    START,
    caught_up,
    clean,
    eventually,
    held,
    history,
    leader_pid,
    leading,
    nothing_for,
    scheduler,
    two_instances,
)

TICK_CONSUMER = Path(__file__).parents[1] / "_tick_consumer.py"


@pytest.fixture
async def db(db: ps.Database) -> ps.Database:
    return await clean(db)


async def due_tick(db: ps.Database, schedule_id: str) -> int:
    """A serial scheduled tick of ``schedule_id``, due now (server time); its id."""
    async with db.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO pgstreams.schedule_ticks (schedule_id, scheduled_at, due_at, kind,"
            " serial, status, metadata, created_at)"
            " VALUES (%s, now(), now(), 'scheduled', true, 'pending', '{}', now()) RETURNING id",
            [schedule_id],
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# -- the leader ------------------------------------------------------------------------


async def test_two_instances_100_ticks_no_duplicate_no_gap_across_a_leader_kill(
    db: ps.Database, dsn: str
) -> None:
    clock = ps.ManualClock(START)
    async with two_instances(db, dsn, clock) as (a, b):
        await a.register("beat", interval=1, metadata={"n": 1})
        got: dict[str, list[ps.ScheduleTick]] = {"a": [], "b": []}

        async def consume(sched: ps.Scheduler) -> None:
            async with sched.stream("beat") as ticks:
                async for tick in ticks:
                    got[sched.instance_id].append(tick)

        async with a.running(), b.running(), anyio.create_task_group() as tg:
            tg.start_soon(consume, a)
            tg.start_soon(consume, b)
            await leading(a, b)
            for k in range(1, 101):
                if k == 50:
                    terminate_backends(dsn, pid=await leader_pid(dsn))
                clock.advance(1)
                await caught_up(a, clock)

            async def all_delivered() -> bool:
                return len(got["a"]) + len(got["b"]) >= 100

            await eventually(all_delivered, "100 ticks")
            await anyio.sleep(0.2)  # room for a duplicate to show up
            tg.cancel_scope.cancel()
    ticks = got["a"] + got["b"]
    assert sorted(t.scheduled_at for t in ticks) == [
        START + timedelta(seconds=k) for k in range(1, 101)
    ]
    assert all(not t.catch_up and not t.manual and t.metadata == {"n": 1} for t in ticks)


async def test_leader_connection_dies_and_the_other_instance_takes_over(
    db: ps.Database, dsn: str
) -> None:
    clock = ps.ManualClock(START)
    async with two_instances(db, dsn, clock) as (a, b):
        await a.register("beat", interval=10)
        async with a.running():
            await leading(a)
            async with b.running():
                await anyio.sleep(0.05)
                assert a.is_leader and not b.is_leader
                pid = await leader_pid(dsn)
                allow_connections(dsn, False)  # the old leader cannot come straight back
                try:
                    terminate_backends(dsn, pid=pid)
                    clock.advance(1)  # one poll interval

                    async def b_leads() -> bool:
                        return b.is_leader and not a.is_leader

                    await eventually(b_leads, "b to take over")
                finally:
                    allow_connections(dsn, True)
                clock.advance(9)
                await caught_up(b, clock)
                await anyio.sleep(0.5)  # a reconnects, and stays a follower
                assert b.is_leader and not a.is_leader
    assert [t.scheduled_at for t in await history(a, "beat")] == [START + timedelta(seconds=10)]


async def test_the_leader_survives_a_cancelled_statement(db: ps.Database, dsn: str) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("job", interval=60)
    async with sched.running():
        await leading(sched)
        async with await psycopg.AsyncConnection.connect(dsn) as holder:
            await holder.execute("SELECT 1 FROM pgstreams.schedules WHERE id = 'job' FOR UPDATE")
            clock.advance(60)  # the leader's pass now waits for that row lock
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:

                async def cancelled() -> bool:
                    cur = await admin.execute(
                        "SELECT count(*) FILTER (WHERE pg_cancel_backend(pid))"
                        " FROM pg_stat_activity WHERE application_name = 'pgstreams scheduler'"
                        " AND wait_event_type = 'Lock'"
                    )
                    row = await cur.fetchone()
                    return row is not None and row[0] == 1

                await eventually(cancelled, "the leader to wait for the lock")
            await holder.rollback()
        await caught_up(sched, clock)
        assert [t.scheduled_at for t in await history(sched, "job")] == [clock.now()]


# -- consumers killed while they hold a tick -------------------------------------------


@pytest.mark.parametrize("mode", ["running", "consumer"])
async def test_a_killed_consumer_s_tick_comes_back_after_its_lease_even_if_paused(
    db: ps.Database, dsn: str, mode: str
) -> None:
    sched = ps.Scheduler(db, lease=1.0)  # system clock: shared with the child process
    await sched.register("job", interval=3600, overlap="skip")
    tick_id = await due_tick(db, "job")
    # "consumer": a process that only streams ticks (no leader election, no renewals).
    assert await kill_when_ready(TICK_CONSUMER, dsn, "job", mode) == [tick_id]
    await sched.pause("job")
    manual = await sched.trigger_now("job")  # waits behind the dead consumer's serial tick
    async with sched.running(), held(sched, "job") as ticks:
        again = await ticks.next(within=10)
        assert (again.id, again.attempt, again.manual) == (tick_id, 2, False)
        assert (await ticks.next()).id == manual.id


async def test_a_dead_consumer_s_tick_of_an_unregistered_schedule_is_cancelled(
    db: ps.Database, dsn: str
) -> None:
    sched = ps.Scheduler(db, poll_interval=0.2)
    await sched.register("job", interval=3600, overlap="skip")
    tick_id = await due_tick(db, "job")
    assert await kill_when_ready(TICK_CONSUMER, dsn, "job", "consumer") == [tick_id]
    assert await sched.unregister("job") is True
    assert [t.status for t in await sched.history("job")] == ["running"]  # its lease runs

    async def cancelled() -> bool:
        return [t.status for t in await sched.history("job")] == ["cancelled"]

    async with sched.running():  # the leader closes it once its lease has run out
        await eventually(cancelled, "the dead consumer's tick to be cancelled")
        await sched.register("job", interval=3600, overlap="skip")  # the same id again
        await nothing_for(sched, "job", 0.3)  # the old tick is not delivered
