"""Scheduler: schedules, leader passes, catch-up, overlap, manual ticks, DST, bad input,
consumers that do not run the scheduler, history kept after unregister.

Schedule time runs on a ManualClock, so days of cron pass in milliseconds; leases and
reconnects are real time. Fire-time arithmetic is in tests/unit/test_scheduler_timing.py,
injected failures in tests/faults/test_scheduler_faults.py.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import psycopg
import pytest

import pgstreams as ps

from ..scheduling import (
    START,
    caught_up,
    clean,
    eventually,
    held,
    history,
    leading,
    next_after,
    nothing_for,
    scheduler,
    two_instances,
)

NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture
async def db(db: ps.Database) -> ps.Database:
    return await clean(db)


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


async def test_stream_refuses_bad_arguments(db: ps.Database) -> None:
    sched = scheduler(db, ps.ManualClock(START))
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


async def test_outside_running_a_lease_is_not_renewed(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    first = scheduler(db, clock, lease=0.5, instance_id="first")
    second = ps.Scheduler(db, clock=clock, poll_interval=0.1, instance_id="second")
    await first.register("slow", interval=3600)
    tick = await first.trigger_now("slow")
    async with held(first, "slow") as mine:
        assert (await mine.next()).id == tick.id
        async with held(second, "slow") as theirs:  # takes it once the lease has run out
            again = await theirs.next()
            assert (again.id, again.attempt) == (tick.id, 2)
            with anyio.move_on_after(0.2):  # the first consumer is done: finishing it...
                await mine.next()
            (now,) = await first.history("slow")
            assert (now.status, now.attempt) == ("running", 2)  # ...leaves the new claim be
    (done,) = await first.history("slow")
    assert (done.status, done.attempt) == ("done", 2)


RUNS = pytest.mark.parametrize("runs", [True, False], ids=["running", "consumer-only"])


@asynccontextmanager
async def maybe_running(sched: ps.Scheduler, runs: bool) -> AsyncIterator[None]:
    """``sched.running()`` if ``runs``, else nothing: a process that only consumes."""
    async with AsyncExitStack() as stack:
        if runs:
            await stack.enter_async_context(sched.running())
        yield


@RUNS
async def test_notify_wakes_a_consumer_long_before_its_poll(
    db: ps.Database, dsn: str, runs: bool
) -> None:
    consumer = ps.Scheduler(db, poll_interval=30)  # the system clock: real waiting
    await consumer.register("job", interval=3600)
    async with (
        maybe_running(consumer, runs),
        held(consumer, "job") as ticks,
        ps.connect(dsn) as other,
    ):
        made, got = await next_after(
            ticks, db, lambda: ps.Scheduler(other).trigger_now("job"), leader=runs
        )
        assert got.id == made.id


@RUNS
async def test_polling_finds_a_tick_whose_notification_was_lost(
    db: ps.Database, runs: bool
) -> None:
    consumer = ps.Scheduler(db, poll_interval=0.2)
    await consumer.register("job", interval=3600)

    async def write_silently() -> None:
        async with db.connection() as conn:  # a tick written without its NOTIFY
            await conn.execute(
                "INSERT INTO pgstreams.schedule_ticks (schedule_id, scheduled_at, due_at, kind,"
                " serial, status, metadata, created_at)"
                " VALUES ('job', now(), now(), 'manual', false, 'pending', '{}', now())"
            )

    async with maybe_running(consumer, runs), held(consumer, "job") as ticks:
        _, got = await next_after(ticks, db, write_silently, leader=runs)
        assert got.manual


# -- a consumer that does not run the scheduler; history kept after unregister -----------


async def test_a_process_that_never_runs_the_scheduler_streams_the_leader_s_ticks(
    db: ps.Database, dsn: str
) -> None:
    clock = ps.ManualClock(START)
    async with two_instances(db, dsn, clock) as (leader, consumer):
        await leader.register("beat", interval=1, metadata={"n": 1})
        got: list[ps.ScheduleTick] = []
        async with leader.running(), held(consumer, "beat") as ticks:
            await leading(leader)
            for _ in range(3):
                clock.advance(1)
                got.append(await ticks.next())
            assert not consumer.is_leader
    assert [t.scheduled_at for t in got] == [START + timedelta(seconds=k) for k in (1, 2, 3)]
    assert all(t.metadata == {"n": 1} and not t.catch_up for t in got)
    assert [t.status for t in await history(leader, "beat")] == ["done"] * 3


async def test_unregister_keeps_the_history_unless_asked(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("job", interval=3600)
    first = await sched.trigger_now("job")
    async with sched.running(), held(sched, "job") as ticks:
        assert (await ticks.next()).id == first.id
    second = await sched.trigger_now("job")  # still pending when the schedule goes
    assert await sched.unregister("job") is True
    assert await sched.get("job") is None
    kept = {t.id: t.status for t in await sched.history("job")}
    assert kept == {first.id: "done", second.id: "cancelled"}
    await nothing_for(sched, "job", 0.3)  # its pending tick is never delivered
    assert await sched.unregister("job") is False  # no schedule: nothing to unregister
    assert await sched.unregister("job", keep_history=False) is False  # the kept ticks go
    assert await sched.history("job") == []

    await sched.register("other", interval=3600)
    await sched.trigger_now("other")
    assert await sched.unregister("other", keep_history=False) is True
    assert await sched.history("other") == []
    with pytest.raises(ps.InvalidArgumentError, match="keep_history"):
        await sched.unregister("other", keep_history="no")  # type: ignore[arg-type]


async def test_a_tick_held_when_its_schedule_is_unregistered(db: ps.Database) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("job", interval=3600)
    kept, failed = await sched.trigger_now("job"), await sched.trigger_now("job")

    async def fail_after_unregister() -> None:
        async with held(sched, "job") as two:
            assert (await two.next()).id == failed.id
            assert await sched.unregister("job") is True
            raise RuntimeError("handler failed")  # gives its tick back

    async with sched.running():
        async with held(sched, "job") as one:
            assert (await one.next()).id == kept.id
            with pytest.raises(RuntimeError, match="handler failed"):
                await fail_after_unregister()
        # one closed cleanly: its consumer finished its tick as usual

        async def settled() -> bool:
            statuses = {t.id: t.status for t in await sched.history("job")}
            return statuses == {kept.id: "done", failed.id: "cancelled"}

        clock.advance(1)  # a leader pass: the tick given back is not delivered, ever
        await eventually(settled, "the ticks to settle")
        await nothing_for(sched, "job", 0.2)


async def test_a_tick_given_back_after_its_schedule_came_back_is_not_delivered(
    db: ps.Database,
) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)  # no leader runs: nothing sweeps the old tick away
    await sched.register("job", interval=3600, metadata={"v": 1})
    old = await sched.trigger_now("job")

    async def fail_across_a_new_registration() -> None:
        async with held(sched, "job") as ticks:
            assert (await ticks.next()).id == old.id
            assert await sched.unregister("job") is True
            await sched.register("job", interval=3600, metadata={"v": 2})  # the same id
            raise RuntimeError("handler failed")  # gives its tick back

    with pytest.raises(RuntimeError, match="handler failed"):
        await fail_across_a_new_registration()
    # The tick of the schedule that was unregistered is never delivered again, not even as
    # one of the new schedule's.
    new = await sched.trigger_now("job")
    async with held(sched, "job") as ticks:
        got = await ticks.next()
        assert (got.id, got.metadata) == (new.id, {"v": 2})
    statuses = {t.id: t.status for t in await sched.history("job")}
    assert statuses == {old.id: "cancelled", new.id: "done"}


async def test_a_tick_whose_lease_ran_out_after_its_schedule_came_back_is_not_taken(
    db: ps.Database,
) -> None:
    clock = ps.ManualClock(START)
    first = scheduler(db, clock, lease=0.5, instance_id="first")  # never renews: not running
    second = ps.Scheduler(db, clock=clock, poll_interval=0.1, instance_id="second")
    await first.register("job", interval=3600)
    old = await first.trigger_now("job")
    async with held(first, "job") as stuck:  # as a consumer that hangs or died
        assert (await stuck.next()).id == old.id
        assert await first.unregister("job") is True
        await first.register("job", interval=3600)  # the same id again
        new = await first.trigger_now("job")
        async with held(second, "job") as theirs:
            assert (await theirs.next()).id == new.id
            # The old tick's lease runs out meanwhile: still never taken.
            with anyio.move_on_after(1.0):
                tick = await theirs.next()
                pytest.fail(f"unexpected tick {tick}")
    statuses = {t.id: t.status for t in await first.history("job")}
    assert statuses == {old.id: "done", new.id: "done"}  # the first consumer finished it


async def test_unregister_waits_for_a_manual_tick_being_made_and_cancels_it(
    db: ps.Database, dsn: str
) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock)
    await sched.register("job", interval=3600)
    async with await psycopg.AsyncConnection.connect(dsn) as other:
        # trigger_now's statement, in a transaction left open: it holds the schedule's row
        cur = await other.execute(sched._sql["trigger"], {"id": "job", "now": clock.now()})
        row = await cur.fetchone()
        assert row is not None
        async with anyio.create_task_group() as tg:
            done = anyio.Event()

            async def unregister() -> None:
                assert await sched.unregister("job") is True
                done.set()

            tg.start_soon(unregister)
            await anyio.sleep(0.2)
            assert not done.is_set()  # waits for the tick's transaction
            await other.commit()
    assert [(t.id, t.status) for t in await sched.history("job")] == [(row[0], "cancelled")]


async def test_retention_prunes_the_kept_history_of_an_unregistered_schedule(
    db: ps.Database,
) -> None:
    clock = ps.ManualClock(START)
    sched = scheduler(db, clock, keep_history=timedelta(seconds=25))
    await sched.register("gone", interval=10)
    await sched.register("stays", interval=10)
    async with sched.running():
        clock.advance(10)
        await caught_up(sched, clock)
        assert await sched.unregister("gone") is True
        assert [t.status for t in await history(sched, "gone")] == ["cancelled"]
        for _ in range(3):
            clock.advance(10)
            await caught_up(sched, clock)
    assert await history(sched, "gone") == []  # fired at +10 s, older than 25 s at +40 s
    stays = await history(sched, "stays")  # open ticks are kept however old
    assert [((t.scheduled_at - START).seconds, t.status) for t in stays] == [
        (10, "pending"),
        (20, "pending"),
        (30, "pending"),
        (40, "pending"),
    ]
