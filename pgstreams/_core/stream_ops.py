"""Stream operators that run in the consumer's own task, as plain async generators.

None of them opens a task group or a cancel scope that stays open across a ``yield``: the
consumer's code between two items never runs inside a scope of theirs, so its own timeouts
and cancellations nest as written. (Operators that need tasks are in ``stream_tasks``.)
Each closes its upstream when it ends, however it ends, and reports whether that close is
clean (see :func:`closing_cleanly`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar, Union

import anyio

if TYPE_CHECKING:
    from .stream import Stream

T = TypeVar("T")
U = TypeVar("U")

MaybeAwaitable: TypeAlias = Union[U, Awaitable[U]]  # noqa: UP007
PutBack: TypeAlias = Callable[[list[Any]], Awaitable[None]]
"""How a source takes back items that were read from it but never delivered."""

logger = logging.getLogger("pgstreams.stream")

CLEAN_CLOSE: ContextVar[bool] = ContextVar("pgstreams_clean_close", default=False)


def closing_cleanly() -> bool:
    """For a source closing: True if everything it handed downstream was finished with.

    True when the chain closes because it ended normally: ``take`` got its items, a
    terminal returned, ``async with stream`` exited without an exception. False when it
    closes because of an exception or a cancellation, when ``aclose()`` is called directly,
    or when the garbage collector closes it. Sources that commit progress (durable change
    consumers) commit the last item handed out only if this is True.
    """
    return CLEAN_CLOSE.get()


async def call(fn: Callable[[T], MaybeAwaitable[U]], item: T) -> U:
    """``fn(item)``, awaited if it returned an awaitable (callbacks may be sync or async)."""
    result = fn(item)
    if inspect.isawaitable(result):
        return await result
    return result


@asynccontextmanager
async def closing(iterator: AsyncIterable[Any]) -> AsyncIterator[None]:
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
            token = None if clean is None else CLEAN_CLOSE.set(clean)
            try:
                await aclose()
            finally:
                if token is not None:
                    CLEAN_CLOSE.reset(token)


async def give_back(putback: PutBack | None, items: list[Any]) -> None:
    """Return undelivered ``items`` through ``putback``, if the source has one (shielded).

    A failure is logged rather than raised: it must not mask the exception (or the
    cancellation) that is closing the chain.
    """
    if not items or putback is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await putback(items)
        except Exception:
            logger.exception("could not give %d unread items back to their source", len(items))


class _Rejected(Exception):
    """take_while's way to close its upstream as not clean (never escapes it)."""


def _reject() -> NoReturn:
    raise _Rejected


async def map_serial(src: Stream[T], fn: Callable[[T], Any]) -> AsyncIterator[Any]:
    async with closing(src):
        async for item in src:
            yield await call(fn, item)


async def filter_items(
    src: Stream[T], pred: Callable[[T], MaybeAwaitable[bool]]
) -> AsyncIterator[T]:
    async with closing(src):
        async for item in src:
            if await call(pred, item):
                yield item


async def take(src: Stream[T], n: int) -> AsyncIterator[T]:
    async with closing(src):
        if n == 0:
            return
        taken = 0
        async for item in src:
            yield item
            taken += 1
            if taken >= n:
                return


async def take_while(src: Stream[T], pred: Callable[[T], MaybeAwaitable[bool]]) -> AsyncIterator[T]:
    try:
        async with closing(src):
            async for item in src:
                if not await call(pred, item):
                    # Read, never handed on: close upstream as not clean, so that a source
                    # committing progress does not count it as finished.
                    _reject()
                yield item
    except _Rejected:
        return


async def skip(src: Stream[T], n: int) -> AsyncIterator[T]:
    async with closing(src):
        seen = 0
        async for item in src:
            if seen < n:
                seen += 1
                continue
            yield item


async def tap(src: Stream[T], fn: Callable[[T], MaybeAwaitable[object]]) -> AsyncIterator[T]:
    async with closing(src):
        async for item in src:
            await call(fn, item)
            yield item


async def throttle(src: Stream[T], interval: float) -> AsyncIterator[T]:
    async with closing(src):
        next_at = anyio.current_time()
        async for item in src:
            now = anyio.current_time()
            if now < next_at:
                try:
                    await anyio.sleep(next_at - now)
                except BaseException:
                    await give_back(src._putback, [item])
                    raise
            next_at = max(now, next_at) + interval
            yield item


async def batch(src: Stream[T], size: int) -> AsyncIterator[list[T]]:
    """Lists of ``size`` items (the last may be shorter); a partial batch never handed on
    goes back to the source."""
    items: list[T] = []
    try:
        async with closing(src):
            async for item in src:
                items.append(item)
                if len(items) >= size:
                    out, items = items, []
                    yield out
        if items:
            out, items = items, []
            yield out
    finally:
        await give_back(src._putback, items)


async def through(
    src: Stream[T],
    op: Callable[[Stream[T]], AsyncIterable[U]],
    bind: Callable[[AsyncIterator[U]], None],
) -> AsyncIterator[U]:
    """The items of ``op(src)``; closing closes both what ``op`` returned and ``src``."""
    async with closing(src):
        iterator = aiter(op(src))
        bind(iterator)  # a stream that op returned joins the consumer's scope
        async with closing(iterator):
            async for item in iterator:
                yield item
