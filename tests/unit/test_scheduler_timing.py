"""Fire times of schedules: cron on a zone's wall clock across DST changes, and intervals
from an anchor (no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import islice, pairwise
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from pgstreams._sources.scheduler.timing import Timing

START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


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
