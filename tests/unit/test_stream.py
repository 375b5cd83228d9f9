"""Stream operators: list equivalence (property tests), closing, errors, concurrency."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pgstreams as ps

ints = st.lists(st.integers(-1000, 1000), max_size=40)


def run(coro_fn: Callable[[], Any]) -> Any:
    return anyio.run(coro_fn, backend="asyncio")


async def agen(items: list[int]) -> AsyncIterator[int]:
    for x in items:
        await anyio.lowlevel.checkpoint()
        yield x


def src(items: list[int]) -> ps.Stream[int]:
    return ps.Stream(lambda: agen(items))


@settings(max_examples=60, deadline=None)
@given(items=ints, n=st.integers(0, 45), concurrency=st.integers(1, 5), ordered=st.booleans())
def test_operators_match_list_equivalents(
    items: list[int], n: int, concurrency: int, ordered: bool
) -> None:
    async def check() -> None:
        assert await src(items).collect() == items
        assert await src(items).map(lambda x: x * 2).collect() == [x * 2 for x in items]

        async def double(x: int) -> int:
            await anyio.sleep(0.0005 * (x % 3))
            return x * 2

        mapped = await src(items).map(double, concurrency=concurrency, ordered=ordered).collect()
        if ordered:
            assert mapped == [x * 2 for x in items]
        else:
            assert sorted(mapped) == sorted(x * 2 for x in items)
        assert await src(items).filter(lambda x: x % 2 == 0).collect() == [
            x for x in items if x % 2 == 0
        ]
        assert await src(items).take(n).collect() == items[:n]
        assert await src(items).skip(n).collect() == items[n:]
        assert await src(items).take_while(lambda x: x < 500).collect() == list(
            itertools.takewhile(lambda x: x < 500, items)
        )
        size = max(1, n)
        expected = [items[i : i + size] for i in range(0, len(items), size)]
        assert await src(items).batch(size).collect() == expected
        assert await src(items).batch(size, within=5).collect() == expected
        assert await src(items).buffer(max(1, n)).collect() == items
        seen: list[int] = []
        assert await src(items).tap(seen.append).collect() == items
        assert seen == items
        assert await src(items).drain() == len(items)
        got: list[int] = []
        assert await src(items).for_each(got.append, concurrency=concurrency) == len(items)
        assert sorted(got) == sorted(items)
        merged = await ps.merge(src(items), src(items[::-1])).collect()
        assert sorted(merged) == sorted(items + items)
        if items:
            assert await src(items).first() == items[0]
        else:
            with pytest.raises(ps.EmptyStreamError):
                await src(items).first()

    run(check)


class Tracked:
    """A source that records whether it was closed and how many items were pulled."""

    def __init__(self, items: int | None = None) -> None:
        self.items = items
        self.pulled = 0
        self.closed = False

    def stream(self) -> ps.Stream[int]:
        async def gen() -> AsyncIterator[int]:
            try:
                for i in itertools.count() if self.items is None else range(self.items):
                    await anyio.lowlevel.checkpoint()
                    self.pulled += 1
                    yield i
            finally:
                self.closed = True

        return ps.Stream(gen)


async def test_take_closes_source_without_reading_ahead() -> None:
    t = Tracked()
    assert await t.stream().map(lambda x: x + 1).take(3).collect() == [1, 2, 3]
    assert t.closed
    assert t.pulled == 3


async def test_break_inside_async_with_closes_chain() -> None:
    t = Tracked()
    async with t.stream().filter(lambda x: True).buffer(2) as s:
        async for x in s:
            if x == 5:
                break
    assert t.closed


async def test_exception_in_callback_propagates_unchanged_after_cleanup() -> None:
    class Boom(Exception):
        pass

    def explode(x: int) -> int:
        if x == 3:
            raise Boom("x=3")
        return x

    for make in (
        lambda s: s.map(explode),
        lambda s: s.map(explode, concurrency=4),
        lambda s: s.map(explode, concurrency=4, ordered=False),
        lambda s: s.batch(2, within=1).map(lambda b: [explode(x) for x in b]),
        lambda s: s.buffer(3).map(explode),
        lambda s: ps.merge(s, Tracked(1).stream()).map(explode),
    ):
        t = Tracked()
        with pytest.raises(Boom, match="x=3"):
            await make(t.stream()).drain()
        assert t.closed


async def test_source_error_propagates_unchanged_through_concurrent_operators() -> None:
    async def bad() -> AsyncIterator[int]:
        yield 1
        raise KeyError("source")

    for op in (
        lambda s: s.map(lambda x: x, concurrency=3),
        lambda s: s.batch(5, within=0.5),
        lambda s: s.buffer(4),
        lambda s: ps.merge(s),
    ):
        with pytest.raises(KeyError, match="source"):
            await op(ps.Stream(bad)).drain()


async def test_cancellation_closes_chain() -> None:
    t = Tracked()
    with anyio.move_on_after(0.05):
        await t.stream().map(lambda x: anyio.sleep(0.01), concurrency=2).drain()
    assert t.closed


async def test_map_respects_concurrency_limit() -> None:
    running = 0
    peak = 0

    async def work(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1
        return x

    out = await src(list(range(20))).map(work, concurrency=4).collect()
    assert out == list(range(20))
    assert peak == 4


async def test_batch_flushes_partial_batch_on_timeout() -> None:
    async def slow() -> AsyncIterator[int]:
        yield 1
        yield 2
        await anyio.sleep(0.3)
        yield 3

    start = anyio.current_time()
    first = await ps.Stream(slow).batch(10, within=0.05).first()
    assert first == [1, 2]
    assert anyio.current_time() - start < 0.25


async def test_throttle_spaces_items() -> None:
    start = anyio.current_time()
    assert await src([1, 2, 3, 4, 5]).throttle(100).collect() == [1, 2, 3, 4, 5]
    assert anyio.current_time() - start >= 0.035


async def test_through_applies_operator() -> None:
    async def pairs(s: ps.Stream[int]) -> AsyncIterator[tuple[int, int]]:
        async for x in s:
            yield (x, x * x)

    assert await src([1, 2]).through(pairs).collect() == [(1, 1), (2, 4)]


async def test_stream_is_single_use() -> None:
    s = src([1, 2])
    assert await s.collect() == [1, 2]
    assert await s.collect() == []


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.take(-1),
        lambda s: s.skip(-2),
        lambda s: s.batch(0),
        lambda s: s.batch(3, within=0),
        lambda s: s.buffer(0),
        lambda s: s.throttle(0),
        lambda s: s.map(str, concurrency=0),
    ],
)
def test_bad_operator_arguments(call: Callable[[ps.Stream[int]], Any]) -> None:
    with pytest.raises(ps.InvalidArgumentError):
        call(src([]))


class Returnable:
    """A source that accepts items back, recording what was pulled and returned."""

    def __init__(self, n: int = 1000) -> None:
        self.n = n
        self.pulled: list[int] = []
        self.returned: list[int] = []
        self.closed = False

    def stream(self) -> ps.Stream[int]:
        async def gen() -> AsyncIterator[int]:
            try:
                for i in range(self.n):
                    await anyio.lowlevel.checkpoint()
                    self.pulled.append(i)
                    yield i
            finally:
                self.closed = True

        async def putback(items: list[Any]) -> None:
            self.returned.extend(items)

        return ps.Stream(gen, putback=putback)


async def slowly(x: Any) -> None:
    await anyio.sleep(0.005)  # lets the read-ahead operators fill up


@pytest.mark.parametrize(
    "chain",
    [
        lambda s: s.buffer(10).tap(slowly).take(3),
        lambda s: s.filter(lambda x: x % 2 == 0).buffer(7).tap(slowly).take(2),
        lambda s: s.batch(4, within=5).tap(slowly).take(2),
        lambda s: s.buffer(3).batch(5, within=5).tap(slowly).take(1),
        lambda s: ps.merge(s).tap(slowly).take(3),
        lambda s: s.throttle(1000).buffer(4).tap(slowly).take(2),
    ],
)
async def test_read_ahead_items_are_given_back_on_close(
    chain: Callable[[ps.Stream[int]], ps.Stream[Any]],
) -> None:
    src = Returnable()
    out = await chain(src.stream()).collect()
    delivered = [x for item in out for x in (item if isinstance(item, list) else [item])]
    assert src.closed
    # Everything pulled was either delivered, dropped by filter (delivered to its
    # predicate), or given back: nothing is silently lost.
    kept = [x for x in src.pulled if x not in delivered and x not in src.returned]
    assert all(x % 2 == 1 for x in kept)
    assert not set(src.returned) & set(delivered)
    assert src.returned  # something really was read ahead and came back


async def test_partial_batch_is_given_back_on_cancellation() -> None:
    src = Returnable(3)

    async def slow_tail() -> AsyncIterator[int]:
        async with src.stream() as s:
            async for x in s:
                yield x
        await anyio.sleep_forever()

    stream = ps.Stream(slow_tail, putback=src.stream()._putback).batch(10)
    with anyio.move_on_after(0.1):
        await stream.drain()
    assert src.returned == [0, 1, 2]


async def test_through_closes_its_upstream() -> None:
    t = Tracked()

    async def op(s: ps.Stream[int]) -> AsyncIterator[int]:
        async for x in s:
            yield x * 10

    assert await t.stream().through(op).take(2).collect() == [0, 10]
    assert t.closed


# -- clean close: what a source that commits progress relies on ----------------------------


def recording_source(closes: list[bool]) -> ps.Stream[int]:
    from pgstreams._core.stream import closing_cleanly

    async def gen() -> AsyncIterator[int]:
        try:
            for x in itertools.count():
                await anyio.lowlevel.checkpoint()
                yield x
        finally:
            closes.append(closing_cleanly())

    return ps.Stream(gen)


async def test_clean_close_after_normal_endings() -> None:
    closes: list[bool] = []
    assert await recording_source(closes).take(3).collect() == [0, 1, 2]
    assert await recording_source(closes).map(lambda x: x * 2).take(2).drain() == 2
    assert await recording_source(closes).filter(lambda x: x > 2).first() == 3
    async with recording_source(closes) as stream:
        async for x in stream:
            if x == 1:
                break
    assert closes == [True, True, True, True]


async def test_unclean_close_after_errors_and_cancellation() -> None:
    closes: list[bool] = []

    def boom(x: int) -> None:
        if x == 2:
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        await recording_source(closes).for_each(boom)

    async def fail_inside() -> None:
        async with recording_source(closes) as stream:
            async for x in stream:
                if x == 1:
                    raise LookupError(x)

    with pytest.raises(LookupError):
        await fail_inside()
    with anyio.move_on_after(0.05):
        await recording_source(closes).map(anyio.sleep).drain()  # sleeps 0, 1, ... seconds
    stream = recording_source(closes)
    await stream.__anext__()
    await stream.aclose()  # a bare aclose() cannot know whether the item was finished
    assert closes == [False, False, False, False]


async def test_take_while_closes_upstream_as_not_clean_after_a_rejection() -> None:
    # The rejected item was read but never handed on: a source that commits progress on a
    # clean close must not count it as finished.
    closes: list[bool] = []
    assert await recording_source(closes).take_while(lambda x: x < 3).collect() == [0, 1, 2]
    assert await recording_source(closes).take(2).take_while(lambda x: x < 5).collect() == [0, 1]
    assert closes == [False, True]
