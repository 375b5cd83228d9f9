"""Operators that run background tasks, under cancellation and early exit (PEP 789).

``merge``, ``buffer``, ``batch(within=)`` and ``map(concurrency>1)`` read upstream in tasks.
Those tasks must live in a task group that the consumer's ``async with stream`` opens and
closes, never in a scope held open across a ``yield`` to the consumer: otherwise a timeout
or cancel scope of the consumer's own exits while the operator's scope is still on top, a
close from another task exits a scope in the wrong task, and the garbage collector's close
runs in yet another task.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pgstreams as ps


class Source:
    """Counts forever (or ``stall_after`` items, then waits forever); records pulls and close."""

    def __init__(self, stall_after: int | None = None) -> None:
        self.stall_after = stall_after
        self.pulled = 0
        self.closed = False

    def stream(self) -> ps.Stream[int]:
        async def gen() -> AsyncIterator[int]:
            try:
                for i in itertools.count():
                    if i == self.stall_after:
                        await anyio.sleep_forever()
                    await anyio.lowlevel.checkpoint()
                    self.pulled += 1
                    yield i
            finally:
                self.closed = True

        return ps.Stream(gen)


async def same(x: Any) -> Any:
    await anyio.lowlevel.checkpoint()
    return x


Make = Callable[[ps.Stream[int], ps.Stream[int]], ps.Stream[Any]]

CONCURRENT: dict[str, Make] = {
    "merge": lambda a, b: ps.merge(a, b),
    "map": lambda a, b: a.map(same, concurrency=4),
    "map_unordered": lambda a, b: a.map(same, concurrency=4, ordered=False),
    "buffer": lambda a, b: a.buffer(4),
    "batch": lambda a, b: a.batch(2, within=5),
    "chain": lambda a, b: ps.merge(a.buffer(2), b).map(same, concurrency=3).filter(bool),
}
concurrent = pytest.mark.parametrize("make", CONCURRENT.values(), ids=CONCURRENT.keys())


def opened(*sources: Source) -> list[Source]:
    return [s for s in sources if s.pulled]


@concurrent
async def test_break_inside_a_timeout_scope_of_the_consumer(make: Make) -> None:
    a, b = Source(), Source()
    stream = make(a.stream(), b.stream())
    async with stream:
        with anyio.move_on_after(30):
            async for _ in stream:
                break
        # The timeout scope ended while the stream is still open; the stream's tasks must
        # not have tangled it, so a later cancel scope works as usual.
        with anyio.CancelScope() as outer:
            outer.cancel()
            await anyio.sleep_forever()
        assert outer.cancelled_caught
    assert opened(a, b)
    assert all(s.closed for s in opened(a, b))


@concurrent
async def test_outer_cancel_reaches_a_consumer_busy_inside_the_loop(make: Make) -> None:
    a, b = Source(), Source()
    stream = make(a.stream(), b.stream())
    reached_after = False
    async with stream:
        with anyio.CancelScope() as outer:
            async for _ in stream:
                outer.cancel()
                await anyio.sleep_forever()  # the consumer's own wait, cancelled by `outer`
        assert outer.cancelled_caught
        reached_after = True
    assert reached_after
    assert all(s.closed for s in opened(a, b))


@concurrent
async def test_outer_cancel_reaches_a_consumer_waiting_for_the_next_item(make: Make) -> None:
    a, b = Source(stall_after=1), Source(stall_after=1)
    stream = make(a.stream(), b.stream())
    async with stream:
        with anyio.move_on_after(0.05) as timeout:
            async for _ in stream:
                pass  # the next item never comes: the wait is inside the stream
        assert timeout.cancelled_caught
    assert all(s.closed for s in opened(a, b))


class Boom(Exception):
    pass


def explode_at(n: int) -> Callable[[Any], Any]:
    async def fn(x: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        if x == n or (isinstance(x, list) and n in x):
            raise Boom(f"x={n}")
        return x

    return fn


@pytest.mark.parametrize(
    "make",
    [
        lambda s: s.map(explode_at(3), concurrency=4),
        lambda s: s.map(explode_at(3), concurrency=4, ordered=False),
        lambda s: ps.merge(s.map(explode_at(3)), Source(stall_after=0).stream()),
        lambda s: s.map(explode_at(3)).buffer(2),
        lambda s: s.map(explode_at(3)).batch(2, within=5),
    ],
    ids=["map", "map_unordered", "merge", "buffer", "batch"],
)
async def test_error_propagates_unchanged_to_a_consumer_with_its_own_timeouts(
    make: Callable[[ps.Stream[int]], ps.Stream[Any]],
) -> None:
    a = Source()
    stream = make(a.stream())

    async def consume() -> None:
        async with stream:
            while True:
                with anyio.fail_after(30):  # a deadline per item, as a consumer might set
                    await stream.__anext__()

    with pytest.raises(Boom, match="x=3") as raised:
        await consume()
    assert type(raised.value) is Boom  # not an ExceptionGroup, not a RuntimeError
    assert a.closed


@concurrent
async def test_aclose_from_another_task(make: Make) -> None:
    a, b = Source(), Source()
    stream = make(a.stream(), b.stream())
    got_one = anyio.Event()
    closed = anyio.Event()

    async def consumer() -> None:
        async with stream:
            await stream.__anext__()
            got_one.set()
            await closed.wait()
            # Closed by the other task: the stream has ended for this one too.
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await got_one.wait()
        await stream.aclose()
        assert all(s.closed for s in opened(a, b))
        closed.set()


@concurrent
async def test_bare_iteration_is_refused_before_anything_is_read(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # Without `async with`, nothing could stop the operator's tasks in the task that
    # started them once the loop is left: so it is refused, with a way out.
    a, b = Source(), Source()
    stream = make(a.stream(), b.stream())

    async def loop(s: ps.Stream[Any]) -> None:
        async for _ in s:
            break

    with pytest.raises(ps.PgStreamsError, match="async with"):
        await loop(stream)
    assert not opened(a, b)
    # Abandoned without aclose() and collected: nothing to finalize, nothing reported.
    del stream
    gc.collect()
    for _ in range(5):
        await anyio.lowlevel.checkpoint()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_abandoned_plain_chain_is_collected_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = Source()
    stream = a.stream().map(same).filter(bool).take(10)
    async for _ in stream:
        break
    del stream
    gc.collect()
    for _ in range(5):
        await anyio.lowlevel.checkpoint()
    assert a.closed  # the event loop's finalizer closed it
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@concurrent
async def test_cancelled_consumer_task_leaves_nothing_running(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = Source(), Source()
    started = anyio.Event()

    async def consumer() -> None:
        stream = make(a.stream(), b.stream())
        async with stream:
            async for _ in stream:
                started.set()
                await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await started.wait()
        tg.cancel_scope.cancel()
    gc.collect()
    for _ in range(5):
        await anyio.lowlevel.checkpoint()
    assert all(s.closed for s in opened(a, b))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_nested_scopes_inside_merge_inputs() -> None:
    # Each input of a merge is itself a stream with background tasks: each opens its own
    # scope inside the merge's task for it.
    a, b = Source(), Source()
    got = (
        await ps.merge(a.stream().buffer(2), b.stream().map(same, concurrency=2)).take(6).collect()
    )
    assert len(got) == 6
    assert a.closed and b.closed


async def test_through_binds_its_upstream_to_the_consumer_scope() -> None:
    async def pairs(s: ps.Stream[int]) -> AsyncIterator[tuple[int, int]]:
        async for x in s:  # iterated bare by `op`, inside the consumer's scope
            yield (x, x * x)

    a = Source()
    got = await a.stream().buffer(3).through(pairs).take(3).collect()
    assert got == [(0, 0), (1, 1), (2, 4)]
    assert a.closed


WAITING_BELOW: dict[str, Make] = {
    "buffer_filter": lambda a, b: a.buffer(2).filter(lambda x: True),
    "merge_map": lambda a, b: ps.merge(a, b).map(same),
    "map_take": lambda a, b: a.map(same, concurrency=2).take(100),
    "batch_tap": lambda a, b: a.batch(2, within=5).tap(lambda x: None),
}


@pytest.mark.parametrize("make", WAITING_BELOW.values(), ids=WAITING_BELOW.keys())
async def test_aclose_from_another_task_while_the_consumer_waits_below_an_operator(
    make: Make,
) -> None:
    # The consumer waits for its next item inside an operator that runs tasks, under a
    # same-task operator (an async generator, which another task cannot close itself).
    a, b = Source(stall_after=1), Source(stall_after=1)
    stream = make(a.stream(), b.stream())
    got_one = anyio.Event()
    ended = anyio.Event()

    async def consumer() -> None:
        async with stream:
            async for _ in stream:
                got_one.set()
            ended.set()  # the loop ended: the stream is closed for this task too

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await got_one.wait()
        await stream.aclose()
        with anyio.fail_after(10):
            await ended.wait()
    assert all(s.closed for s in opened(a, b))


async def test_through_may_return_a_stream_that_runs_tasks() -> None:
    # What `op` returns joins the consumer's scope: a terminal, or `async with`, is enough.
    a = Source()
    got = await a.stream().through(lambda s: s.buffer(2)).take(3).collect()
    assert got == [0, 1, 2]
    assert a.closed
    b = Source()
    stream = b.stream().through(lambda s: s.map(same, concurrency=2))
    async with stream:
        async for x in stream:
            if x == 2:
                break
    assert b.closed


async def test_aclose_from_another_task_before_an_operator_that_runs_tasks_opens() -> None:
    # The consumer is inside the chain, but the buffer below it has not opened yet (`op`
    # waits before it pulls): closed meanwhile, that buffer must not start reading.
    a = Source()
    pulling = anyio.Event()
    go = anyio.Event()

    async def op(s: ps.Stream[int]) -> AsyncIterator[int]:
        pulling.set()
        await go.wait()
        async for x in s:
            yield x

    stream = a.stream().buffer(2).through(op)
    got: list[int] = []
    ended = anyio.Event()

    async def consumer() -> None:
        async with stream:
            async for x in stream:
                got.append(x)
            ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await pulling.wait()
        await stream.aclose()
        go.set()
        with anyio.fail_after(10):
            await ended.wait()
    assert got == []
    assert a.pulled == 0
