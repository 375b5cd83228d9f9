"""Scheduler: schedules, leader election, catch-up, overlap, manual ticks, DST, bad input.

Schedule time runs on a ManualClock, so days of cron pass in milliseconds; leases and
reconnects are real time.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from itertools import islice, pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pgstreams as ps
from pgstreams._sources.scheduler.timing import Timing

from .._killed_consumer import kill_when_ready
from ..pgserver import allow_connections, terminate_backends
from ..streams import until_idle

START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


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


@pytest.fixture
async def db(db: ps.Database) -> ps.Database:
    """The shared Database, without schedules (the module shares one database)."""
    async with db.connection() as conn:
        await conn.execute("DELETE FROM pgstreams.schedules")
        await conn.execute("UPDATE pgstreams.scheduler_state SET alive_at = NULL")
    return db


async def history(sched: ps.Scheduler, id: str) -> list[ps.ScheduleTick]:
    return sorted(await sched.history(id, limit=10_000), key=lambda t: t.scheduled_at)


# -- fire times ------------------------------------------------------------------------


def fires(timing: Timing, after: datetime, n: int) -> list[datetime]:
    return list(islice(timing.forward(after), n))


def test_dst_spring_forward_fires_a_skipped_time_once_at_the_jump() -> None:
    ny = Timing("30 2 * * *", None, NY, START)
    day = fires(ny, datetime(2026, 3, 7, 12, tzinfo=UTC), 2)
    # 02:30 does not exist on 8 March in New York: it fires once, at 03:00 EDT.
    assert day == [datetime(2026, 3, 8, 7, 0, tzinfo=UTC), datetime(2026, 3, 9, 6, 30, tzinfo=UTC)]
    berlin = Timing("30 2 * * *", None, BERLIN, START)
    day = fires(berlin, datetime(2026, 3, 28, 12, tzinfo=UTC), 2)
    assert day == [
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),
    ]
    # Every half hour across the jump: each real half hour once.
    half = Timing("*/30 * * * *", None, NY, START)
    local = [
        f.astimezone(NY).strftime("%H:%M%z")
        for f in fires(half, datetime(2026, 3, 8, 6, 0, tzinfo=UTC), 4)
    ]
    assert local == ["01:30-0500", "03:00-0400", "03:30-0400", "04:00-0400"]


def test_dst_fall_back_fires_a_repeated_time_once() -> None:
    # 01:30 happens twice on 1 November in New York, 02:30 twice on 25 October in Berlin.
    ny = Timing("30 1 * * *", None, NY, START)
    assert fires(ny, datetime(2026, 10, 31, 12, tzinfo=UTC), 2) == [
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
        datetime(2026, 11, 2, 6, 30, tzinfo=UTC),
    ]
    ny = Timing("30 2 * * *", None, NY, START)
    assert fires(ny, datetime(2026, 10, 31, 12, tzinfo=UTC), 1) == [
        datetime(2026, 11, 1, 7, 30, tzinfo=UTC)
    ]
    berlin = Timing("30 2 * * *", None, BERLIN, START)
    assert fires(berlin, datetime(2026, 10, 24, 12, tzinfo=UTC), 2) == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
    ]
    # Starting inside the repeated hour (its second pass) does not fire it again.
    assert fires(berlin, datetime(2026, 10, 25, 1, 15, tzinfo=UTC), 1) == [
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC)
    ]


def test_walking_back_from_the_second_pass_of_a_repeated_hour_sees_the_first() -> None:
    half = Timing("*/30 * * * *", None, NY, START)
    # 06:10Z is 01:10 EST, the second pass of 01:00-02:00 on 1 November.
    back = list(islice(half.backward(datetime(2026, 11, 1, 6, 10, tzinfo=UTC)), 3))
    assert back == [datetime(2026, 11, 1, h, m, tzinfo=UTC) for h, m in ((5, 30), (5, 0), (4, 30))]


ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata"]
CRONS = ["30 2 * * *", "*/20 * * * *", "0 * * * *", "15 1,2,3 * * 0", "0 0 1 * *", "*/7 * * * * 5"]


@settings(max_examples=60, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    cron=st.sampled_from(CRONS),
    start=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31)),
)
def test_fire_times_ascend_and_walk_back_the_same_way(
    zone: str, cron: str, start: datetime
) -> None:
    timing = Timing(cron, None, ZoneInfo(zone), START)
    t = start.replace(tzinfo=UTC)
    ahead = fires(timing, t, 12)
    assert all(a < b for a, b in pairwise(ahead))
    assert ahead[0] > t
    back = list(islice(timing.backward(ahead[-1]), 12))
    assert back == ahead[::-1]
    assert timing.after(ahead[3]) == ahead[4]
    # From any instant, walking back starts at the latest fire time at or before it.
    probe = ahead[2] + (ahead[3] - ahead[2]) / 2
    assert next(timing.backward(probe)) == ahead[2]
    window = 2 * max(b - a for a, b in pairwise(ahead))  # reaches the fire before t
    earlier = [f for f in fires(timing, t - window, 500) if f <= t]
    assert next(timing.backward(t)) == earlier[-1]


@given(
    interval=st.floats(min_value=0.001, max_value=100_000, allow_nan=False),
    offset=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
)
def test_interval_fire_times_are_exact_multiples(interval: float, offset: float) -> None:
    micros = round(interval * 1_000_000)
    timing = Timing(None, micros, ZoneInfo("UTC"), START)
    t = START + timedelta(seconds=offset)
    first = timing.after(t)
    assert first is not None and first > t
    assert first - timedelta(microseconds=micros) <= t
    assert (first - START) % timedelta(microseconds=micros) == timedelta(0)
    assert next(timing.backward(first)) == first


# -- schedules -------------------------------------------------------------------------


BAD_REGISTRATIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"cron": "every day at noon"}, ps.InvalidArgumentError, "fields"),
    ({"cron": "61 * * * *"}, ps.InvalidArgumentError, "not a valid cron"),
    ({"cron": "* * *"}, ps.InvalidArgumentError, "fields"),
    ({"cron": "0 0 31 2 *"}, ps.InvalidArgumentError, "never fires"),
    (
        {"cron": "0 2 * * *", "timezone": "Mars/Olympus_Mons"},
        ps.InvalidArgumentError,
        "unknown time zone",
    ),
    ({"interval": 0}, ps.InvalidArgumentError, "positive"),
    ({"interval": -5}, ps.InvalidArgumentError, "positive"),
    ({"interval": math.nan}, ps.InvalidArgumentError, "positive"),
    ({"interval": "60"}, ps.InvalidArgumentError, "number"),
    ({"cron": "0 2 * * *", "interval": 60}, ps.InvalidArgumentError, "exactly one"),
    ({}, ps.InvalidArgumentError, "exactly one"),
    ({"interval": 60, "overlap": "sometimes"}, ps.InvalidArgumentError, "overlap"),
    ({"interval": 60, "jitter": -1}, ps.InvalidArgumentError, "jitter"),
    ({"interval": 60, "max_catch_up": -1}, ps.InvalidArgumentError, "max_catch_up"),
    ({"interval": 60, "max_catch_up": True}, ps.InvalidArgumentError, "max_catch_up"),
    ({"interval": 60, "metadata": {"at": object()}}, ps.PayloadError, "JSON"),
    ({"interval": 60, "metadata": [1, 2]}, ps.InvalidArgumentError, "mapping"),
    ({"cron": "R * * * *"}, ps.InvalidArgumentError, "not supported"),
    ({"cron": "0 0 * * *", "timezone": "localtime"}, ps.InvalidArgumentError, "time zone"),
    ({"interval": 3e11}, ps.InvalidArgumentError, "out of range"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_REGISTRATIONS)
async def test_bad_input_is_refused_before_anything_is_written(
    db: ps.Database, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    sched = scheduler(db, ps.ManualClock(START))
    with pytest.raises(error, match=match):
        await sched.register("bad", **kwargs)
    assert await sched.get("bad") is None
    with pytest.raises(ps.InvalidArgumentError):
        await sched.register("", interval=60)
    assert isinstance(error("x"), ValueError | TypeError)


async def test_register_is_an_upsert_and_timing_changes_restart_it(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    first = await sched.register("etl", interval=60, metadata={"pipeline": "a"}, name="ETL")
    assert first.next_fire_at == START + timedelta(seconds=60)
    assert (first.name, first.interval, first.overlap, first.max_catch_up) == (
        "ETL",
        60,
        "allow",
        1,
    )
    clock.advance(30)
    again = await sched.register("etl", interval=60, metadata={"pipeline": "b"}, max_catch_up=5)
    assert again.next_fire_at == first.next_fire_at  # same timing: the next fire time stays
    assert (again.metadata, again.max_catch_up, again.name) == ({"pipeline": "b"}, 5, None)
    moved = await sched.register("etl", interval=45)
    assert moved.next_fire_at == clock.now() + timedelta(seconds=45)
    cron = await sched.register("etl", cron="0 2 * * *", timezone="America/New_York")
    assert cron.next_fire_at == datetime(2026, 3, 3, 7, 0, tzinfo=UTC)  # 02:00 EST
    assert [s.id for s in await sched.list()] == ["etl"]
    assert await sched.unregister("etl") is True
    assert await sched.unregister("etl") is False
    for call in (sched.pause("etl"), sched.resume("etl"), sched.trigger_now("etl")):
        with pytest.raises(ps.ScheduleNotFoundError):
            await call


async def test_next_fire_times(db: ps.Database) -> None:
    clock = ps.ManualClock(datetime(2026, 3, 2, 10, 7, tzinfo=UTC))
    sched = scheduler(db, clock)
    await sched.register("quarter", cron="*/15 * * * *")
    assert await sched.next_fire_times("quarter", 3) == [
        datetime(2026, 3, 2, 10, m, tzinfo=UTC) for m in (15, 30, 45)
    ]
    await sched.register("seconds", cron="*/20 * * * * 30")  # sixth field: seconds
    assert (await sched.next_fire_times("seconds", 1))[0] == datetime(
        2026, 3, 2, 10, 20, 30, tzinfo=UTC
    )
    await sched.register("fast", interval=1.5)
    assert await sched.next_fire_times("fast", 2) == [
        clock.now() + timedelta(seconds=1.5),
        clock.now() + timedelta(seconds=3),
    ]
    with pytest.raises(ps.InvalidArgumentError):
        await sched.next_fire_times("fast", 0)


# -- running ---------------------------------------------------------------------------


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


async def test_catch_up_emits_only_the_most_recent_missed_fire_times(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("three", interval=60, max_catch_up=3)
    await sched.register("none", interval=60, max_catch_up=0)
    clock.advance(10 * 60 + 30)  # down for ten fire times
    async with sched.running():
        await caught_up(sched, clock)
        three = await history(sched, "three")
        assert [t.scheduled_at for t in three] == [START + timedelta(minutes=m) for m in (8, 9, 10)]
        assert all(t.catch_up and not t.manual for t in three)
        assert await history(sched, "none") == []
        clock.advance(30)  # the next fire time, on time
        await caught_up(sched, clock)
        for id in ("three", "none"):
            latest = (await history(sched, id))[-1]
            assert latest.scheduled_at == START + timedelta(minutes=11)
            assert not latest.catch_up
        async with held(sched, "none") as ticks:
            tick = await ticks.next()
            assert (tick.scheduled_at, tick.catch_up) == (START + timedelta(minutes=11), False)


@pytest.mark.parametrize(("max_catch_up", "expected"), [(0, [3600]), (2, [3598, 3599, 3600])])
async def test_after_downtime_only_the_newest_fire_time_is_on_time(
    db: ps.Database, max_catch_up: int, expected: list[int]
) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("fast", interval=1, max_catch_up=max_catch_up)
    clock.advance(3600)  # down for an hour: 3,600 fire times, the newest due just now
    async with sched.running():
        await caught_up(sched, clock)
    ticks = await history(sched, "fast")
    assert [(t.scheduled_at - START).seconds for t in ticks] == expected
    assert [t.catch_up for t in ticks] == [True] * max_catch_up + [False]


async def test_a_schedule_the_leader_cannot_compute_is_retried_a_minute_later(
    db: ps.Database,
) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("lost", cron="* * * * *", timezone="Europe/Berlin")
    await sched.register("fine", interval=60)
    async with db.connection() as conn:  # as if this host's tz database lacked the zone
        await conn.execute(
            "UPDATE pgstreams.schedules SET timezone = 'Nowhere/Void' WHERE id = 'lost'"
        )
    async with sched.running():
        clock.advance(60)
        await caught_up(sched, clock)
        lost = await sched.get("lost")
        assert lost is not None and lost.next_fire_at == clock.now() + timedelta(minutes=1)
        assert [t.scheduled_at for t in await history(sched, "fine")] == [clock.now()]


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


async def test_overlap_skip_records_fire_times_while_a_tick_is_open(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("job", interval=10, overlap="skip")
    async with sched.running(), held(sched, "job") as ticks:
        clock.advance(10)
        first = await ticks.next()
        clock.advance(10)  # first is still held
        await caught_up(sched, clock)
        assert [t.status for t in await history(sched, "job")] == ["running", "skipped"]
        async with anyio.create_task_group() as tg:
            got: list[ps.ScheduleTick] = []

            async def pull() -> None:
                got.append(await ticks.next())  # finishes the first, then waits

            tg.start_soon(pull)

            async def first_done() -> bool:
                return (await history(sched, "job"))[0].status == "done"

            await eventually(first_done, "the first tick to be done")
            clock.advance(10)
        assert got[0].scheduled_at == first.scheduled_at + timedelta(seconds=20)
        statuses = [t.status for t in await history(sched, "job")]
        assert statuses == ["done", "skipped", "running"]


async def test_overlap_allow_runs_ticks_side_by_side(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("job", interval=10)  # overlap="allow" is the default
    async with sched.running(), held(sched, "job") as one, held(sched, "job") as two:
        clock.advance(10)
        first = await one.next()
        clock.advance(10)
        second = await two.next()
        assert second.scheduled_at == first.scheduled_at + timedelta(seconds=10)
        assert [t.status for t in await history(sched, "job")] == ["running", "running"]


async def test_overlap_queue_one_keeps_one_waiting_and_runs_it_after(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("job", interval=10, overlap="queue_one")
    async with sched.running(), held(sched, "job") as ticks:
        clock.advance(10)
        first = await ticks.next()
        clock.advance(10)
        await caught_up(sched, clock)
        clock.advance(10)
        await caught_up(sched, clock)
        assert [t.status for t in await history(sched, "job")] == ["running", "pending", "skipped"]
        await nothing_for(sched, "job", 0.3)  # the queued tick waits for the running one
        queued = await ticks.next()  # finishes the first
        assert queued.scheduled_at == first.scheduled_at + timedelta(seconds=10)
        assert [t.status for t in await history(sched, "job")] == ["done", "running", "skipped"]


async def test_pause_and_resume_persist_across_a_restart(db: ps.Database, dsn: str) -> None:
    clock = ps.ManualClock(START)
    await scheduler(db, clock).register("job", interval=60)
    await scheduler(db, clock).pause("job")
    async with ps.connect(dsn) as fresh:  # a new process, as far as the database goes
        sched = scheduler(fresh, clock)
        assert (await sched.get("job")).paused  # type: ignore[union-attr]
        async with sched.running():
            await leading(sched)
            clock.advance(5 * 60)
            await anyio.sleep(0.2)
            assert await history(sched, "job") == []
            manual = await sched.trigger_now("job")  # manual ticks run even while paused
            async with held(sched, "job") as ticks:
                assert (await ticks.next()).id == manual.id
            await sched.resume("job")
            assert not (await sched.get("job")).paused  # type: ignore[union-attr]
            clock.advance(60)
            await caught_up(sched, clock)
            scheduled = [t for t in await history(sched, "job") if not t.manual]
            # Nothing from the paused minutes; the first fire time after resuming.
            assert [(t.scheduled_at, t.catch_up) for t in scheduled] == [
                (START + timedelta(minutes=6), False)
            ]


async def test_trigger_now_and_backfill_make_real_ticks(db: ps.Database) -> None:
    clock = ps.ManualClock(datetime(2026, 3, 10, 12, tzinfo=UTC))
    sched = scheduler(db, clock)
    await sched.register("daily", cron="0 2 * * *", metadata={"p": 1})
    start, end = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 5, 23, 59, tzinfo=UTC)
    made = await sched.backfill("daily", start=start, end=end)
    assert [t.scheduled_at.day for t in made] == [1, 2, 3, 4, 5]
    assert all(t.catch_up and t.manual and t.status == "pending" for t in made)
    assert await sched.backfill("daily", start=start, end=end) == []  # no duplicates
    edge = await sched.backfill(
        "daily", start=datetime(2026, 3, 6, 2, tzinfo=UTC), end=datetime(2026, 3, 6, 2, tzinfo=UTC)
    )
    assert len(edge) == 1  # both ends inclusive
    now = await sched.trigger_now("daily")
    assert (now.manual, now.catch_up, now.scheduled_at) == (True, False, clock.now())
    async with sched.running(), held(sched, "daily") as ticks:
        got = [await ticks.next() for _ in range(7)]
    assert [t.id for t in got] == [*(t.id for t in made), edge[0].id, now.id]
    assert all(t.metadata == {"p": 1} and t.fired_at == clock.now() for t in got)
    assert {t.status for t in await sched.history("daily")} == {"done"}


@pytest.mark.parametrize(
    ("start", "end", "match"),
    [
        (datetime(2026, 3, 5, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC), "after end"),
        (datetime(2026, 3, 1), datetime(2026, 3, 5, tzinfo=UTC), "timezone-aware"),
        (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC), "future"),
        (datetime(2000, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC), "more than"),
    ],
)
async def test_bad_backfill_is_refused_before_anything_is_written(
    db: ps.Database, start: datetime, end: datetime, match: str
) -> None:
    sched = scheduler(db, ps.ManualClock(datetime(2026, 3, 10, tzinfo=UTC)))
    await sched.register("minutely", cron="* * * * *")
    with pytest.raises(ps.InvalidArgumentError, match=match):
        await sched.backfill("minutely", start=start, end=end)
    assert await sched.history("minutely") == []
    with pytest.raises(ps.ScheduleNotFoundError):
        await sched.backfill(
            "nope", start=datetime(2026, 3, 1, tzinfo=UTC), end=datetime(2026, 3, 2, tzinfo=UTC)
        )


async def test_jitter_delays_delivery_and_is_recorded(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("spread", interval=60, jitter=30)
    async with sched.running(), held(sched, "spread") as ticks:
        clock.advance(60)
        await caught_up(sched, clock)
        (tick,) = await history(sched, "spread")
        assert 0 <= tick.jitter <= 30
        assert tick.due_at == tick.scheduled_at + timedelta(seconds=tick.jitter)
        if tick.jitter > 0.01:
            await nothing_for(sched, "spread", 0.2)
        assert tick.due_at is not None
        clock.set(tick.due_at)
        got = await ticks.next()
        assert (got.id, got.jitter) == (tick.id, tick.jitter)


async def test_a_failing_consumer_gives_its_tick_back(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("job", interval=60)
    async with sched.running():
        tick = await sched.trigger_now("job")

        async def fail(t: ps.ScheduleTick) -> None:
            raise RuntimeError("handler failed")

        with pytest.raises(RuntimeError, match="handler failed"):
            await sched.stream("job").for_each(fail)
        async with held(sched, "job") as ticks:
            again = await ticks.next()
        assert (again.id, again.attempt) == (tick.id, 2)


async def test_a_killed_consumer_s_tick_comes_back_after_its_lease_even_if_paused(
    db: ps.Database, dsn: str
) -> None:
    sched = ps.Scheduler(db, lease=1.0)  # system clock: shared with the child process
    await sched.register("job", interval=3600, overlap="skip")
    async with db.connection() as conn:  # a scheduled tick, due now
        cur = await conn.execute(
            "INSERT INTO pgstreams.schedule_ticks (schedule_id, scheduled_at, due_at, kind,"
            " serial, status, metadata, created_at)"
            " VALUES ('job', now(), now(), 'scheduled', true, 'pending', '{}', now()) RETURNING id"
        )
        row = await cur.fetchone()
        assert row is not None
    seen = await kill_when_ready(Path(__file__).parents[1] / "_tick_consumer.py", dsn, "job")
    assert seen == [row[0]]
    await sched.pause("job")
    manual = await sched.trigger_now("job")  # waits behind the dead consumer's serial tick
    async with sched.running(), held(sched, "job") as ticks:
        again = await ticks.next(within=10)
        assert (again.id, again.attempt, again.manual) == (row[0], 2, False)
        assert (await ticks.next()).id == manual.id


async def test_stream_needs_a_running_scheduler(db: ps.Database) -> None:
    sched = scheduler(db, ps.ManualClock(START))
    with pytest.raises(ps.PgStreamsError, match="running"):
        await sched.stream().first()
    with pytest.raises(ps.InvalidArgumentError):
        sched.stream("").batch(2)
    with pytest.raises(ps.InvalidArgumentError, match="one"):
        sched.stream("x").batch(2)


async def test_leader_ticks_across_dst_days(db: ps.Database) -> None:
    clock = ps.ManualClock(datetime(2026, 3, 7, 12, tzinfo=UTC))
    sched = scheduler(db, clock)
    for id, zone in (("ny", "America/New_York"), ("berlin", "Europe/Berlin")):
        # max_catch_up=0: the jump from March to October drops the fire times in between.
        await sched.register(id, cron="30 2 * * *", timezone=zone, max_catch_up=0)
    async with sched.running():
        await leading(sched)
        for day in (datetime(2026, 3, 7, 12, tzinfo=UTC), datetime(2026, 10, 24, 12, tzinfo=UTC)):
            clock.set(max(day, clock.now()))
            await caught_up(sched, clock)
            end = day + timedelta(days=2)
            while clock.now() < end:  # walk two days in 10-minute steps
                clock.advance(600)
                await caught_up(sched, clock)
    ny = [t.scheduled_at.astimezone(NY) for t in await history(sched, "ny")]
    berlin = [t.scheduled_at.astimezone(BERLIN) for t in await history(sched, "berlin")]
    assert [t.strftime("%m-%d %H:%M") for t in ny] == [
        "03-08 03:00",
        "03-09 02:30",
        "10-25 02:30",
        "10-26 02:30",
    ]
    assert [t.strftime("%m-%d %H:%M%z") for t in berlin] == [
        "03-08 02:30+0100",
        "03-09 02:30+0100",
        "10-25 02:30+0200",
        "10-26 02:30+0100",
    ]


async def test_serial_ticks_never_run_side_by_side_whatever_consumers_race(
    db: ps.Database,
) -> None:
    clock = ps.ManualClock(datetime(2026, 3, 10, tzinfo=UTC))
    sched = scheduler(db, clock)
    await sched.register("serial", cron="* * * * *", overlap="skip")
    await sched.backfill(
        "serial",
        start=datetime(2026, 3, 9, 0, 0, tzinfo=UTC),
        end=datetime(2026, 3, 9, 0, 39, tzinfo=UTC),
    )
    active, peak, handled = 0, 0, []

    async def consume() -> None:
        nonlocal active, peak
        async with sched.stream("serial") as ticks:
            async for tick in ticks:
                active += 1
                peak = max(peak, active)
                handled.append(tick.scheduled_at)
                await anyio.sleep(0.002)
                active -= 1  # the tick is done once the next one is asked for

    async with sched.running(), anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(consume)

        async def all_handled() -> bool:
            return len(handled) >= 40

        await eventually(all_handled, "40 ticks")
        tg.cancel_scope.cancel()
    assert peak == 1
    assert sorted(handled) == [datetime(2026, 3, 9, 0, m, tzinfo=UTC) for m in range(40)]


async def test_the_leader_deletes_finished_ticks_past_keep_history(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock, keep_history=timedelta(seconds=25))
    await sched.register("job", interval=10, overlap="skip")
    async with sched.running(), held(sched, "job") as ticks:
        clock.advance(10)
        await ticks.next()  # running: kept however old
        for _ in range(5):
            clock.advance(10)
            await caught_up(sched, clock)
    assert [(t.scheduled_at - START).seconds for t in await history(sched, "job")] == [
        10,
        40,
        50,
        60,
    ]
    with pytest.raises(ps.InvalidArgumentError, match="keep_history"):
        ps.Scheduler(db, keep_history=timedelta(0))


async def test_a_running_instance_keeps_the_lease_of_a_slow_tick(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock, lease=0.5)
    await sched.register("slow", interval=3600)
    async with sched.running():
        tick = await sched.trigger_now("slow")
        async with held(sched, "slow") as ticks:
            assert (await ticks.next()).id == tick.id
            await nothing_for(sched, "slow", 1.6)  # three leases long: renewed meanwhile
        (done,) = await sched.history("slow")
        assert (done.status, done.attempt) == ("done", 1)


async def next_after(ticks: Held, db: ps.Database, act: Callable[[], Awaitable[Any]]) -> Any:
    """Once the consumer pulling from ``ticks`` and the leader both sleep, ``act``; return
    what ``act`` returned and the tick that came (within 5 s)."""
    got: list[ps.ScheduleTick] = []

    async def pull() -> None:
        got.append(await ticks.next(within=5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(pull)
        await until_idle(db, 2)
        done = await act()
    return done, got[0]


async def test_notify_wakes_a_consumer_long_before_its_poll(db: ps.Database, dsn: str) -> None:
    consumer = ps.Scheduler(db, poll_interval=30)  # the system clock: real waiting
    await consumer.register("job", interval=3600)
    async with consumer.running(), held(consumer, "job") as ticks, ps.connect(dsn) as other:
        made, got = await next_after(ticks, db, lambda: ps.Scheduler(other).trigger_now("job"))
        assert got.id == made.id


async def test_polling_finds_a_tick_whose_notification_was_lost(db: ps.Database) -> None:
    consumer = ps.Scheduler(db, poll_interval=0.2)
    await consumer.register("job", interval=3600)

    async def write_silently() -> None:
        async with db.connection() as conn:  # a tick written without its NOTIFY
            await conn.execute(
                "INSERT INTO pgstreams.schedule_ticks (schedule_id, scheduled_at, due_at, kind,"
                " serial, status, metadata, created_at)"
                " VALUES ('job', now(), now(), 'manual', false, 'pending', '{}', now())"
            )

    async with consumer.running(), held(consumer, "job") as ticks:
        _, got = await next_after(ticks, db, write_silently)
        assert got.manual
