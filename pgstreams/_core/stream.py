"""``Stream[T]``: a lazy, pull-based, single-use async iterator with composable operators.

Guarantees a caller relies on:

* Nothing is pulled from upstream before downstream asks for it, except by operators that
  must look ahead (``buffer``, ``batch(within=)``, ``merge``, concurrent ``map``), and they
  hold at most a bounded number of items.
* Those four run their producers as tasks, in a task group that ``async with stream`` (or a
  terminal: ``for_each``, ``drain``, ``collect``, ``first``) opens and closes in the
  consumer's task. A chain containing one must be iterated that way: iterated bare, it
  raises ``PgStreamsError`` before reading anything. Nothing yields to the consumer from
  inside a scope of the library's, so the consumer's own timeouts and cancel scopes nest as
  written, ``aclose()`` works from any task, and a stream the garbage collector closes
  closes quietly.
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

import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, Generic, Self, TypeVar, overload

import anyio
from anyio.abc import TaskGroup

from . import stream_ops as ops
from .checkpoint import Checkpoint
from .errors import EmptyStreamError, InvalidArgumentError, PgStreamsError
from .stream_ops import MaybeAwaitable, PutBack, closing_cleanly
from .stream_tasks import BatchWithin, Buffer, MapConcurrent, Merge, Stage

__all__ = ["PutBack", "Stream", "closing_cleanly", "merge"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
U = TypeVar("U")


class _Scope:
    """The task group of a consumer's ``async with stream``, and the operators running
    tasks in it (which ``aclose()`` can end from any task)."""

    __slots__ = ("closed", "group", "stages")

    def __init__(self, group: TaskGroup) -> None:
        self.group = group
        self.stages: list[Stage[Any]] = []
        self.closed = False
        """Closed from another task: operators opened from now on end before they start."""


Opener = Callable[[_Scope | None], AsyncIterator[Any]]
"""Opens a stage, given the consumer's scope (None if there is none)."""


class Stream(Generic[T_co]):
    """A lazy async stream; operators return new streams, terminals consume them.

    A stream is single-use: iterate it once. Use ``async with stream:`` (or a terminal such
    as ``for_each``/``drain``/``collect``/``first``) so that breaking out of a loop closes
    the chain at once rather than when the garbage collector gets to it; a chain with
    ``buffer``, ``merge``, ``batch(within=)`` or ``map(concurrency>1)`` requires it.
    """

    __slots__ = (
        "_checkpoint",
        "_depth",
        "_group",
        "_iterator",
        "_open",
        "_owned",
        "_putback",
        "_sequential",
        "_started",
        "_tasks",
    )

    def __init__(
        self,
        source: AsyncIterable[T_co] | Callable[[], AsyncIterable[T_co]],
        *,
        putback: PutBack | None = None,
        sequential: str | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        tasks = False
        if isinstance(source, Stream):
            inner: Stream[Any] = source
            opener: Opener = inner._joined
            tasks = inner._tasks
            if sequential is None:
                sequential = inner._sequential  # wrapping a stream keeps its constraint
            if checkpoint is None:
                checkpoint = inner._checkpoint
        elif callable(source) and not isinstance(source, AsyncIterable):
            factory = source
            opener = lambda group: _opened(factory(), group)  # noqa: E731
        else:
            iterable = source
            opener = lambda group: aiter(iterable)  # noqa: E731
        self._setup(opener, putback, sequential, tasks, checkpoint)

    def _setup(
        self,
        opener: Opener,
        putback: PutBack | None,
        sequential: str | None,
        tasks: bool,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self._open = opener
        self._putback = putback
        self._checkpoint = checkpoint
        """The source's deferred commits, if it offers them (see ``_core.checkpoint``);
        passed on by operators that hand on upstream's own items."""
        self._sequential: str | None = sequential
        """Why this chain must stay sequential, if it must: its source takes "the
        downstream asks for the next item" to mean "the last one is finished" (a durable
        change consumer commits its position then). Operators that read ahead or run
        items concurrently refuse such a chain."""
        self._tasks = tasks
        """True if some operator of the chain runs tasks: it then needs a task group."""
        self._group: _Scope | None = None
        self._owned: _Scope | None = None
        self._depth = 0
        self._iterator: AsyncIterator[T_co] | None = None
        self._started = False

    @classmethod
    def _derived(
        cls,
        opener: Opener,
        *,
        putback: PutBack | None = None,
        sequential: str | None = None,
        tasks: bool,
        checkpoint: Checkpoint | None = None,
    ) -> Stream[Any]:
        stream: Stream[Any] = cls.__new__(cls)
        stream._setup(opener, putback, sequential, tasks, checkpoint)
        return stream

    def _joined(self, group: _Scope | None) -> Self:
        """This stream, in the scope of the stream that reads it (unless it has its own)."""
        if self._group is None:
            self._group = group
        return self

    # -- iteration ---------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T_co:
        if self._iterator is None:
            if self._started:
                raise StopAsyncIteration
            self._started = True
            self._iterator = self._open(self._group)
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        """Close the chain now; idempotent. Another task than the one iterating may call
        it, between two items (or while it waits inside an operator that runs tasks)."""
        self._started = True
        if self._group is not None and getattr(self._iterator, "ag_running", False):
            # A task is inside the chain (an async generator cannot be closed under it): end
            # the operators that run tasks; as their end reaches the iterating task, it
            # closes the rest of the chain itself.
            self._group.closed = True
            for stage in self._group.stages:
                await stage.aclose()
            return
        iterator, self._iterator = self._iterator, None
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> Self:
        self._depth += 1
        if self._tasks and self._group is None and not self._started:
            group = anyio.create_task_group()
            await group.__aenter__()
            self._group = self._owned = _Scope(group)
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._depth -= 1
        if self._depth:
            return
        token = ops.CLEAN_CLOSE.set(typ is None)
        try:
            await self.aclose()
        finally:
            ops.CLEAN_CLOSE.reset(token)
            scope, self._owned = self._owned, None
            if scope is not None:
                group = scope.group
                # Every operator has closed, so its tasks are done: leaving the group only
                # confirms it. The body's exception is not handed to the group, which would
                # wrap it in an ExceptionGroup; it propagates from here unchanged.
                group.cancel_scope.cancel()
                await group.__aexit__(None, None, None)

    def _pipe(
        self, op: Callable[[Stream[T_co]], AsyncIterator[U]], *, passthrough: bool = False
    ) -> Stream[U]:
        # An operator that hands on upstream's own items (filter, take, ...) can pass a
        # give-back request straight up; one that makes new items cannot.
        return Stream._derived(
            lambda group: op(self._joined(group)),
            putback=self._putback if passthrough else None,
            sequential=self._sequential,
            tasks=self._tasks,
            checkpoint=self._checkpoint if passthrough else None,
        )

    def _deferring(self) -> tuple[Stream[T_co], Checkpoint] | None:
        """This stream with its source's commits deferred to the checkpoint returned with
        it -- and so free to read ahead -- or None if the source offers no checkpoint.
        Call before iterating."""
        checkpoint = self._checkpoint
        if checkpoint is None or self._started:
            return None
        checkpoint.defer()
        free = Stream._derived(self._joined, putback=self._putback, tasks=self._tasks)
        return free, checkpoint

    def _staged(
        self,
        operator: str,
        make: Callable[[TaskGroup], Stage[U]],
        *,
        putback: PutBack | None = None,
    ) -> Stream[U]:
        """An operator whose producers run as tasks (see ``stream_tasks``)."""
        return Stream._derived(
            lambda group: _staged_open(operator, group, make), putback=putback, tasks=True
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
            return self._pipe(lambda src: ops.map_serial(src, fn))
        return self._staged(
            "map(concurrency > 1)",
            lambda group: MapConcurrent(group, self, fn, concurrency, ordered),
        )

    def filter(self, pred: Callable[[T_co], MaybeAwaitable[bool]]) -> Stream[T_co]:
        """Keep the items for which ``pred`` (sync or async) is true."""
        return self._pipe(lambda src: ops.filter_items(src, pred), passthrough=True)

    def take(self, n: int) -> Stream[T_co]:
        """The first ``n`` items; upstream is closed as soon as the n-th is handed on."""
        _check_int("n", n, minimum=0)
        return self._pipe(lambda src: ops.take(src, n), passthrough=True)

    def take_while(self, pred: Callable[[T_co], MaybeAwaitable[bool]]) -> Stream[T_co]:
        """Items up to (not including) the first for which ``pred`` is false."""
        return self._pipe(lambda src: ops.take_while(src, pred), passthrough=True)

    def skip(self, n: int) -> Stream[T_co]:
        """Drop the first ``n`` items."""
        _check_int("n", n, minimum=0)
        return self._pipe(lambda src: ops.skip(src, n), passthrough=True)

    def tap(self, fn: Callable[[T_co], MaybeAwaitable[object]]) -> Stream[T_co]:
        """Call ``fn`` on each item for its side effect and pass the item on unchanged."""
        return self._pipe(lambda src: ops.tap(src, fn), passthrough=True)

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

        given_back = putback if upstream is not None else None
        if within is None:
            return Stream._derived(
                lambda group: ops.batch(self._joined(group), size),
                putback=given_back,
                tasks=self._tasks,
            )
        return self._staged(
            "batch(within=)",
            lambda group: BatchWithin(group, self, size, within),
            putback=given_back,
        )

    def buffer(self, n: int) -> Stream[T_co]:
        """Read ahead up to ``n`` items in a background task (decouples producer and consumer)."""
        self._refuse_if_sequential("buffer")
        _check_int("n", n)
        return self._staged("buffer", lambda group: Buffer(group, self, n), putback=self._putback)

    def throttle(self, per_second: float) -> Stream[T_co]:
        """Emit at most ``per_second`` items per second (evenly spaced)."""
        if not per_second > 0 or math.isinf(per_second):
            raise InvalidArgumentError(f"per_second must be a positive number, got {per_second!r}")
        interval = 1.0 / per_second
        return self._pipe(lambda src: ops.throttle(src, interval), passthrough=True)

    def through(self, op: Callable[[Stream[T_co]], AsyncIterable[U]]) -> Stream[U]:
        """Apply a stream-to-iterable function, e.g. ``ps.trigger(...)``; closing the result
        closes both what ``op`` returned and this stream."""

        def opener(group: _Scope | None) -> AsyncIterator[U]:
            def bind(iterator: AsyncIterator[U]) -> None:
                if isinstance(iterator, Stream):
                    iterator._joined(group)

            return ops.through(self._joined(group), op, bind)

        # What `op` returns may run tasks (a stream with `buffer`, say): only opening it tells.
        return Stream._derived(opener, sequential=self._sequential, tasks=True)

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


def merge(*streams: AsyncIterable[T]) -> Stream[T]:
    """Interleave several streams as their items arrive; ends when all have ended.

    The first error from any input closes all of them and propagates unchanged. An item in
    transit when the merge closes goes back to the stream it came from.
    """
    inputs = [s if isinstance(s, Stream) else Stream(s) for s in streams]
    for stream in inputs:
        stream._refuse_if_sequential("merge")
    return Stream._derived(
        lambda group: _staged_open("merge", group, lambda g: Merge(g, inputs)), tasks=True
    )


def _staged_open(
    operator: str, scope: _Scope | None, make: Callable[[TaskGroup], Stage[T]]
) -> Stage[T]:
    if scope is None:
        raise _needs_scope(operator)
    stage = make(scope.group)
    if scope.closed:
        stage.stop()
    scope.stages.append(stage)
    return stage


def _needs_scope(operator: str) -> PgStreamsError:
    return PgStreamsError(
        f"{operator} runs background tasks, which must stop in the task that started them:"
        " iterate this stream inside `async with stream:` (or use a terminal: for_each,"
        " drain, collect, first)"
    )


def _opened(iterable: AsyncIterable[T], group: _Scope | None) -> AsyncIterator[T]:
    if isinstance(iterable, Stream):  # a factory that returns a stream: it joins the scope
        return iterable._joined(group)
    return aiter(iterable)


def _check_int(what: str, value: object, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum}, got {value!r}")
