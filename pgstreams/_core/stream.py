"""``Stream[T]``: a lazy, pull-based, single-use async iterator with composable operators.

Guarantees a caller relies on:

* Nothing is pulled from upstream before downstream asks for it, except by operators that
  must look ahead (``buffer``, ``batch(within=)``, ``merge``, concurrent ``map``), and they
  hold at most a bounded number of items.
* Leaving early -- ``take``, ``first``, ``break`` inside ``async with stream``, an exception
  or a cancellation -- closes the whole chain from the bottom up, so sources return their
  connections, drop their LISTEN registrations and release unhanded leases.
* An exception raised by a callback or a source propagates unchanged (never wrapped in an
  ``ExceptionGroup``) after the chain has been closed.
* Items an operator read ahead but never handed on (in a ``buffer``, a partial ``batch``, in
  transit in ``merge``, or waiting in ``throttle``) are given back to their source when the
  chain closes, if the source accepts them (queues do: they put messages back or release
  leases). An item handed to a callback counts as delivered.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, Self, TypeAlias, TypeVar, Union, overload

import anyio

from .errors import EmptyStreamError, InvalidArgumentError

__all__ = ["PutBack", "Stream", "closing_cleanly", "merge"]

logger = logging.getLogger("pgstreams.stream")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
U = TypeVar("U")

MaybeAwaitable: TypeAlias = Union[U, Awaitable[U]]  # noqa: UP007
PutBack: TypeAlias = Callable[[list[Any]], Awaitable[None]]
"""How a source takes back items that were read from it but never delivered."""


async def _call(fn: Callable[[T], MaybeAwaitable[U]], item: T) -> U:
    result = fn(item)
    if inspect.isawaitable(result):
        return await result
    return result


@dataclass(slots=True)
class _Failure:
    error: BaseException


class _Done:
    pass


class _Rejected(Exception):
    """take_while's way to close its upstream as not clean (never escapes it)."""


def _reject() -> NoReturn:
    raise _Rejected


_DONE = _Done()


class Stream(Generic[T_co]):
    """A lazy async stream; operators return new streams, terminals consume them.

    A stream is single-use: iterate it once. Use ``async with stream:`` (or a terminal such
    as ``for_each``/``drain``/``collect``/``first``) so that breaking out of a loop closes
    the chain at once rather than when the garbage collector gets to it.
    """

    __slots__ = ("_factory", "_iterator", "_putback", "_sequential", "_started")

    def __init__(
        self,
        source: AsyncIterable[T_co] | Callable[[], AsyncIterable[T_co]],
        *,
        putback: PutBack | None = None,
        sequential: str | None = None,
    ) -> None:
        if callable(source) and not isinstance(source, AsyncIterable):
            self._factory: Callable[[], AsyncIterable[T_co]] = source
        else:
            iterable = source
            self._factory = lambda: iterable
        self._putback = putback
        if sequential is None and isinstance(source, Stream):
            sequential = _sequential_of(source)  # wrapping a stream keeps its constraint
        self._sequential: str | None = sequential
        """Why this chain must stay sequential, if it must: its source takes "the
        downstream asks for the next item" to mean "the last one is finished" (a durable
        change consumer commits its position then). Operators that read ahead or run
        items concurrently refuse such a chain."""
        self._iterator: AsyncIterator[T_co] | None = None
        self._started = False

    # -- iteration ---------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T_co:
        if self._iterator is None:
            if self._started:
                raise StopAsyncIteration
            self._started = True
            self._iterator = aiter(self._factory())
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        """Close the chain now; idempotent."""
        self._started = True
        iterator, self._iterator = self._iterator, None
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        token = _CLEAN_CLOSE.set(typ is None)
        try:
            await self.aclose()
        finally:
            _CLEAN_CLOSE.reset(token)

    def _pipe(
        self, op: Callable[[Stream[T_co]], AsyncIterator[U]], *, passthrough: bool = False
    ) -> Stream[U]:
        # An operator that hands on upstream's own items (filter, take, ...) can pass a
        # give-back request straight up; one that makes new items cannot.
        return Stream(
            lambda: op(self),
            putback=self._putback if passthrough else None,
            sequential=self._sequential,
        )

    def _refuse_if_sequential(self, operator: str) -> None:
        if self._sequential is not None:
            raise InvalidArgumentError(
                f"{operator} reads ahead or runs items concurrently, which this stream"
                f" cannot allow: {self._sequential}"
            )

    # -- operators ---------------------------------------------------------------------

    @overload
    def map(
        self, fn: Callable[[T_co], Awaitable[U]], *, concurrency: int = 1, ordered: bool = True
    ) -> Stream[U]: ...
    @overload
    def map(
        self, fn: Callable[[T_co], U], *, concurrency: int = 1, ordered: bool = True
    ) -> Stream[U]: ...
    def map(
        self, fn: Callable[[T_co], Any], *, concurrency: int = 1, ordered: bool = True
    ) -> Stream[Any]:
        """Apply ``fn`` (sync or async) to each item, up to ``concurrency`` at a time.

        With ``ordered=True`` results come out in input order; otherwise as they finish.
        """
        _check_int("concurrency", concurrency)
        if concurrency > 1:
            self._refuse_if_sequential("map(concurrency > 1)")
        if concurrency == 1:
            return self._pipe(lambda src: _map_serial(src, fn))
        return self._pipe(lambda src: _map_concurrent(src, fn, concurrency, ordered))

    def filter(self, pred: Callable[[T_co], MaybeAwaitable[bool]]) -> Stream[T_co]:
        """Keep the items for which ``pred`` (sync or async) is true."""

        async def op(src: AsyncIterator[T_co]) -> AsyncIterator[T_co]:
            async with _closing(src):
                async for item in src:
                    if await _call(pred, item):
                        yield item

        return self._pipe(op, passthrough=True)

    def take(self, n: int) -> Stream[T_co]:
        """The first ``n`` items; upstream is closed as soon as the n-th is handed on."""
        _check_int("n", n, minimum=0)

        async def op(src: AsyncIterator[T_co]) -> AsyncIterator[T_co]:
            async with _closing(src):
                if n == 0:
                    return
                taken = 0
                async for item in src:
                    yield item
                    taken += 1
                    if taken >= n:
                        return

        return self._pipe(op, passthrough=True)

    def take_while(self, pred: Callable[[T_co], MaybeAwaitable[bool]]) -> Stream[T_co]:
        """Items up to (not including) the first for which ``pred`` is false."""

        async def op(src: AsyncIterator[T_co]) -> AsyncIterator[T_co]:
            try:
                async with _closing(src):
                    async for item in src:
                        if not await _call(pred, item):
                            # Read, never handed on: close upstream as not clean, so that a
                            # source committing progress does not count it as finished.
                            _reject()
                        yield item
            except _Rejected:
                return

        return self._pipe(op, passthrough=True)

    def skip(self, n: int) -> Stream[T_co]:
        """Drop the first ``n`` items."""
        _check_int("n", n, minimum=0)

        async def op(src: AsyncIterator[T_co]) -> AsyncIterator[T_co]:
            async with _closing(src):
                seen = 0
                async for item in src:
                    if seen < n:
                        seen += 1
                        continue
                    yield item

        return self._pipe(op, passthrough=True)

    def tap(self, fn: Callable[[T_co], MaybeAwaitable[object]]) -> Stream[T_co]:
        """Call ``fn`` on each item for its side effect and pass the item on unchanged."""

        async def op(src: AsyncIterator[T_co]) -> AsyncIterator[T_co]:
            async with _closing(src):
                async for item in src:
                    await _call(fn, item)
                    yield item

        return self._pipe(op, passthrough=True)

    def batch(self, size: int, *, within: float | None = None) -> Stream[list[T_co]]:
        """Group items into lists of ``size``; with ``within``, a partial batch is emitted
        once ``within`` seconds have passed since its first item. The last partial batch
        is always emitted when upstream ends."""
        self._refuse_if_sequential("batch")
        _check_int("size", size)
        if within is not None and (not within > 0 or math.isinf(within)):
            raise InvalidArgumentError(f"within must be a positive number, got {within!r}")
        upstream = self._putback

        async def putback(batches: list[Any]) -> None:
            assert upstream is not None
            await upstream([item for batch in batches for item in batch])

        return Stream(
            lambda: _batch(self, size, within), putback=putback if upstream is not None else None
        )

    def buffer(self, n: int) -> Stream[T_co]:
        """Read ahead up to ``n`` items in a background task (decouples producer and consumer)."""
        self._refuse_if_sequential("buffer")
        _check_int("n", n)
        return self._pipe(lambda src: _buffer(src, n), passthrough=True)

    def throttle(self, per_second: float) -> Stream[T_co]:
        """Emit at most ``per_second`` items per second (evenly spaced)."""
        if not per_second > 0 or math.isinf(per_second):
            raise InvalidArgumentError(f"per_second must be a positive number, got {per_second!r}")
        interval = 1.0 / per_second

        async def op(src: AsyncIterator[T_co]) -> AsyncIterator[T_co]:
            async with _closing(src):
                next_at = anyio.current_time()
                async for item in src:
                    now = anyio.current_time()
                    if now < next_at:
                        try:
                            await anyio.sleep(next_at - now)
                        except BaseException:
                            await _give_back(src, [item])
                            raise
                    next_at = max(now, next_at) + interval
                    yield item

        return self._pipe(op, passthrough=True)

    def through(self, op: Callable[[Stream[T_co]], AsyncIterable[U]]) -> Stream[U]:
        """Apply a stream-to-iterable function, e.g. ``ps.trigger(...)``; closing the result
        closes both what ``op`` returned and this stream."""

        async def gen() -> AsyncIterator[U]:
            async with _closing(self):
                iterator = aiter(op(self))
                async with _closing(iterator):
                    async for item in iterator:
                        yield item

        return Stream(gen, sequential=self._sequential)

    # -- terminals ---------------------------------------------------------------------

    async def for_each(
        self, fn: Callable[[T_co], MaybeAwaitable[object]], *, concurrency: int = 1
    ) -> int:
        """Call ``fn`` on every item (up to ``concurrency`` at once); returns the count."""
        return await self.map(fn, concurrency=concurrency, ordered=False).drain()

    async def drain(self) -> int:
        """Consume the stream, discarding items; returns how many there were."""
        count = 0
        async with self:
            async for _ in self:
                count += 1
        return count

    async def collect(self) -> list[T_co]:
        """Consume the stream into a list."""
        async with self:
            return [item async for item in self]

    async def first(self) -> T_co:
        """The first item; the rest of the chain is closed. Raises EmptyStreamError if none."""
        async with self:
            async for item in self:
                return item
        raise EmptyStreamError("the stream ended without producing an item")


def _sequential_of(stream: Stream[Any]) -> str | None:
    return stream._sequential


def merge(*streams: AsyncIterable[T]) -> Stream[T]:
    """Interleave several streams as their items arrive; ends when all have ended.

    The first error from any input closes all of them and propagates unchanged. An item in
    transit when the merge closes goes back to the stream it came from.
    """

    for stream in streams:
        if isinstance(stream, Stream):
            stream._refuse_if_sequential("merge")

    async def gen() -> AsyncIterator[T]:
        handoff = _Handoff(1)
        remaining = len(streams)
        try:
            async with _TaskScope() as scope:
                for origin, source in enumerate(streams):
                    scope.start_soon(_forward, source, handoff, origin)
                while remaining:
                    _, msg = await handoff.get()
                    if isinstance(msg, _Done):
                        remaining -= 1
                    elif isinstance(msg, _Failure):
                        scope.fail(msg.error)
                        return
                    else:
                        yield msg
        finally:
            for origin, items in handoff.leftovers().items():
                await _give_back(streams[origin], items)

    return Stream(gen)


# -- operator implementations ----------------------------------------------------------


_CLEAN_CLOSE: ContextVar[bool] = ContextVar("pgstreams_clean_close", default=False)


def closing_cleanly() -> bool:
    """For a source closing: True if everything it handed downstream was finished with.

    True when the chain closes because it ended normally: ``take`` got its items, a
    terminal returned, ``async with stream`` exited without an exception. False when it
    closes because of an exception or a cancellation, when ``aclose()`` is called directly,
    or when the garbage collector closes it. Sources that commit progress (durable change
    consumers) commit the last item handed out only if this is True.
    """
    return _CLEAN_CLOSE.get()


@asynccontextmanager
async def _closing(iterator: AsyncIterable[Any]) -> AsyncIterator[None]:
    """Close ``iterator`` on exit if it can be closed (async generators and streams can).

    Closing after the body ended normally is clean; after an exception, not; when this
    operator is itself being closed (GeneratorExit), as clean as that close.
    """
    clean: bool | None = None
    try:
        yield
        clean = True
    except GeneratorExit:
        raise
    except BaseException:
        clean = False
        raise
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            token = None if clean is None else _CLEAN_CLOSE.set(clean)
            try:
                await aclose()
            finally:
                if token is not None:
                    _CLEAN_CLOSE.reset(token)


async def _give_back(source: object, items: list[Any]) -> None:
    """Return undelivered ``items`` to ``source`` if it takes them back (shielded)."""
    putback = source._putback if isinstance(source, Stream) else None
    if not items or putback is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await putback(items)
        except Exception:  # must not mask the exception that is closing the chain
            logger.exception("could not give %d unread items back to their source", len(items))


def _check_int(what: str, value: object, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum}, got {value!r}")


class _Handoff:
    """A bounded hand-over point from producer tasks to the consumer of an operator.

    Every item is at all times either still in here -- and can be given back to its source
    when the operator closes -- or taken by the consumer, so nothing falls in between, not
    even when a producer is cancelled while waiting for room.
    """

    def __init__(self, capacity: int) -> None:
        self._items: deque[tuple[int, Any]] = deque()
        self._capacity = capacity
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def put(self, origin: int, item: Any) -> None:
        try:
            while len(self._items) >= self._capacity:
                await self._changed.wait()
        finally:  # also when cancelled: then it stays here to be given back
            self.put_nowait(origin, item)

    def put_nowait(self, origin: int, item: Any) -> None:
        self._items.append((origin, item))
        self._notify()

    async def get(self) -> tuple[int, Any]:
        while not self._items:
            await self._changed.wait()
        entry = self._items.popleft()
        self._notify()
        return entry

    def leftovers(self) -> dict[int, list[Any]]:
        """Take every item still held (end markers excluded), grouped by origin."""
        grouped: dict[int, list[Any]] = {}
        for origin, item in self._items:
            if not isinstance(item, _Done | _Failure):
                grouped.setdefault(origin, []).append(item)
        self._items.clear()
        return grouped


async def _forward(source: AsyncIterable[Any], handoff: _Handoff, origin: int = 0) -> None:
    """Copy ``source`` into ``handoff``, ending with _DONE or a _Failure (never raising)."""
    try:
        iterator = aiter(source)
        async with _closing(iterator):
            async for item in iterator:
                await handoff.put(origin, item)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        handoff.put_nowait(origin, _Failure(exc))
        return
    handoff.put_nowait(origin, _DONE)


class _TaskScope:
    """A task group that is always cancelled on exit, re-raising a child's error unwrapped.

    Children report errors through ``fail()`` instead of raising, so the caller's exception
    never arrives wrapped in an ExceptionGroup.
    """

    def __init__(self) -> None:
        self._tg = anyio.create_task_group()
        self._error: BaseException | None = None

    async def __aenter__(self) -> _TaskScope:
        await self._tg.__aenter__()
        return self

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        self._tg.start_soon(fn, *args)

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        self._tg.cancel_scope.cancel()
        if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
            # The host's own exception (GeneratorExit on aclose, an error) must not be
            # handed to the task group, which would wrap it in an ExceptionGroup.
            await self._tg.__aexit__(None, None, None)
            return False
        await self._tg.__aexit__(typ, exc, tb)
        if self._error is not None and exc is None:
            raise self._error
        return False


async def _map_serial(src: Stream[T], fn: Callable[[T], Any]) -> AsyncIterator[Any]:
    async with _closing(src):
        async for item in src:
            yield await _call(fn, item)


async def _map_concurrent(
    src: Stream[T], fn: Callable[[T], Any], concurrency: int, ordered: bool
) -> AsyncIterator[Any]:
    # A slot is taken before an item is pulled and given back when its result is yielded,
    # so nothing is read ahead of a free slot, and at most `concurrency` items are in
    # flight or waiting to be yielded. An item handed to `fn` counts as delivered.
    slots = anyio.Semaphore(concurrency)
    send, receive = anyio.create_memory_object_stream[tuple[int, Any]](concurrency + 1)

    async def work(index: int, item: T) -> None:
        try:
            result: Any = await _call(fn, item)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            result = _Failure(exc)
        await send.send((index, result))

    async def produce(scope: _TaskScope) -> None:
        index = 0
        try:
            async with _closing(src):
                while True:
                    await slots.acquire()
                    try:
                        item = await anext(src)
                    except StopAsyncIteration:
                        break
                    scope.start_soon(work, index, item)
                    index += 1
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            await send.send((index, _Failure(exc)))
            return
        await send.send((index, _DONE))

    with send, receive:
        async with _TaskScope() as scope:
            scope.start_soon(produce, scope)
            pending: dict[int, Any] = {}
            next_index = 0
            end_index: int | None = None
            while end_index is None or next_index < end_index:
                index, result = await receive.receive()
                if isinstance(result, _Failure):
                    scope.fail(result.error)
                    return
                if isinstance(result, _Done):
                    end_index = index
                    continue
                if not ordered:
                    next_index += 1
                    slots.release()
                    yield result
                    continue
                pending[index] = result
                while next_index in pending:
                    ready = pending.pop(next_index)
                    next_index += 1
                    slots.release()
                    yield ready


async def _batch(src: Stream[T], size: int, within: float | None) -> AsyncIterator[list[T]]:
    batch: list[T] = []
    held: list[T] = []
    try:
        if within is None:
            async with _closing(src):
                async for item in src:
                    batch.append(item)
                    if len(batch) >= size:
                        out, batch = batch, []
                        yield out
            if batch:
                out, batch = batch, []
                yield out
            return
        # Upstream is read by a task, so that waiting for the next item can time out
        # without abandoning an item half-way through upstream's __anext__.
        handoff = _Handoff(1)
        try:
            async with _TaskScope() as scope:
                scope.start_soon(_forward, src, handoff)
                deadline = math.inf
                while True:
                    entry: tuple[int, Any] | None = None
                    with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                        entry = await handoff.get()
                    if entry is None:  # timed out with a partial batch
                        out, batch, deadline = batch, [], math.inf
                        yield out
                        continue
                    msg = entry[1]
                    if isinstance(msg, _Failure):
                        scope.fail(msg.error)
                        return
                    if isinstance(msg, _Done):
                        if batch:
                            out, batch = batch, []
                            yield out
                        return
                    if not batch:
                        deadline = anyio.current_time() + within
                    batch.append(msg)
                    if len(batch) >= size:
                        out, batch, deadline = batch, [], math.inf
                        yield out
        finally:
            held = handoff.leftovers().get(0, [])
    finally:
        await _give_back(src, batch + held)


async def _buffer(src: Stream[T], n: int) -> AsyncIterator[T]:
    handoff = _Handoff(n)
    try:
        async with _TaskScope() as scope:
            scope.start_soon(_forward, src, handoff)
            while True:
                _, msg = await handoff.get()
                if isinstance(msg, _Failure):
                    scope.fail(msg.error)
                    return
                if isinstance(msg, _Done):
                    return
                yield msg
    finally:
        await _give_back(src, handoff.leftovers().get(0, []))
