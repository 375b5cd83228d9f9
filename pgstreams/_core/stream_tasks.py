"""Stream operators whose producers run as tasks: ``buffer``, ``merge``, ``batch(within=)``
and ``map(concurrency>1)``.

Each is a class-based iterator, never an async generator. Its producers run in one host
task, started in the task group that the consumer's ``async with stream`` opened -- a group
entered and left in the consumer's task, around the consumer's code, like any task group.
The consumer's ``__anext__`` only awaits the hand-off; nothing is yielded to the consumer
from inside a scope of the operator's (the PEP 789 hazard), so:

* the consumer's own timeouts and cancel scopes nest as written, around or inside its loop;
* ``aclose()`` works from any task: it cancels the host's own scope (allowed from anywhere)
  and waits until the host has finished;
* an error from upstream or from a callback reaches the consumer unchanged, after the
  operator has closed: producers never raise into the task group, they hand failures over.

When an operator closes, its producers have stopped and closed their upstream before
``aclose()`` returns, and the items they read but never handed on go back to their source.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

import anyio
from anyio.abc import TaskGroup

from .stream_ops import call, give_back

if TYPE_CHECKING:
    from .stream import Stream

T = TypeVar("T")


@dataclass(slots=True)
class Failure:
    """An exception a producer hands over instead of raising it into the task group."""

    error: Exception


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


DONE = _Marker("DONE")
"""An upstream ended."""
_CLOSED = _Marker("CLOSED")
"""The hand-off was closed: the operator is closing."""
NOT_READY = _Marker("NOT_READY")
"""``Handoff.take_ready`` found nothing that may go now."""


class Handoff:
    """A bounded hand-over point from producer tasks to the consumer of an operator.

    Every item is at all times either still in here -- and can be given back to its source
    when the operator closes -- or taken by the consumer, so nothing falls in between, not
    even when a producer is cancelled while waiting for room or the consumer while waiting
    for an item. (An anyio memory stream cannot promise that: a sender cancelled while
    waiting cannot tell whether its item was taken.)
    """

    def __init__(self, capacity: int) -> None:
        self._items: deque[tuple[int, Any]] = deque()
        self._capacity = capacity
        self._changed: anyio.Event | None = None
        """Made by the first waiter, set and dropped by the next change: a burst of changes
        before a woken waiter runs makes no events."""
        self._closed = False

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    async def put(self, origin: int, item: Any) -> None:
        try:
            while len(self._items) >= self._capacity and not self._closed:
                await self._wait()
        finally:  # also when cancelled: then it stays here to be given back
            self.put_nowait(origin, item)

    async def room(self, free: int) -> None:
        """If the hand-off is full, wait until ``free`` places are (or it is closed): a
        producer that waits for several places at once wakes less often."""
        if len(self._items) < self._capacity:
            return
        while self._capacity - len(self._items) < free and not self._closed:
            await self._wait()

    async def arrival(self) -> None:
        """Wait until the hand-off holds something (or is closed); takes nothing."""
        while not self._items and not self._closed:
            await self._wait()

    def full(self) -> bool:
        return len(self._items) >= self._capacity

    def take_ready(self, ready: Callable[[Any], bool]) -> Any:
        """The oldest item if ``ready(item)`` says it may go now, else ``NOT_READY`` (and
        nothing taken): a consumer's fast path that needs no waiting."""
        if self._items and not self._closed:
            item = self._items[0][1]
            if ready(item):
                self._items.popleft()
                self._notify()
                return item
        return NOT_READY

    def put_nowait(self, origin: int, item: Any) -> None:
        self._items.append((origin, item))
        self._notify()

    async def get(self) -> tuple[int, Any]:
        """The oldest entry; ``(-1, _CLOSED)`` once closed (what is left stays here)."""
        await self.arrival()
        if self._closed:
            return -1, _CLOSED
        entry = self._items.popleft()
        self._notify()
        return entry

    def close(self) -> None:
        self._closed = True
        self._notify()

    def pending(self) -> list[Any]:
        """The items waiting here, oldest first (markers and failures excluded)."""
        return [item for _, item in self._items if not isinstance(item, _Marker | Failure)]

    def leftovers(self) -> dict[int, list[Any]]:
        """Take every item still held (markers and failures excluded), grouped by origin."""
        grouped: dict[int, list[Any]] = {}
        for origin, item in self._items:
            if not isinstance(item, _Marker | Failure):
                grouped.setdefault(origin, []).append(item)
        self._items.clear()
        return grouped


async def forward(src: Stream[Any], handoff: Handoff, origin: int) -> None:
    """Copy ``src`` into ``handoff`` in this task, ending with DONE or a Failure.

    ``src`` is entered here, so a stream with background operators of its own gets its
    scope in this task. Raises only when cancelled.
    """
    try:
        async with src:
            async for item in src:
                await handoff.put(origin, item)
    except Exception as exc:
        handoff.put_nowait(origin, Failure(exc))
        return
    handoff.put_nowait(origin, DONE)


class Stage(Generic[T]):
    """Base of an operator whose producers run in a host task of the consumer's task group.

    The host runs inside the operator's own cancel scope; closing cancels that scope,
    waits (shielded) for the host to finish, then gives back what it had read ahead.
    A host that has not started when the operator closes never starts its work.
    """

    def __init__(self, tg: TaskGroup, capacity: int) -> None:
        self._handoff = Handoff(capacity)
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._started = False
        self._closed = False
        tg.start_soon(self._host, name=f"pgstreams {type(self).__name__.lower()}")

    async def _host(self) -> None:
        if self._closed:
            return
        self._started = True
        try:
            with self._scope:
                await self._produce()
        except Exception as exc:  # producers hand failures over; this is a last resort
            self._handoff.put_nowait(0, Failure(exc))
        finally:
            self._done.set()

    async def _produce(self) -> None:
        raise NotImplementedError

    async def _give_back(self, leftovers: dict[int, list[Any]]) -> None:
        """Return items read ahead but never handed on (default: nothing to return)."""

    async def _next_message(self) -> tuple[int, Any]:
        """The next entry of the hand-off. A failure closes the operator and is raised
        unchanged; a closed operator ends the iteration."""
        if self._closed:
            raise StopAsyncIteration
        origin, msg = await self._handoff.get()
        if isinstance(msg, Failure):
            await self.aclose()
            raise msg.error
        if msg is _CLOSED:
            raise StopAsyncIteration
        return origin, msg

    async def _end(self) -> NoReturn:
        await self.aclose()
        raise StopAsyncIteration

    def __aiter__(self) -> Stage[T]:
        return self

    async def __anext__(self) -> T:
        raise NotImplementedError

    def stop(self) -> None:
        """End the iteration and cancel the producers (a host not started never starts)."""
        if not self._closed:
            self._closed = True
            self._scope.cancel()
            self._handoff.close()

    async def aclose(self) -> None:
        """Stop the producers and give back what they read ahead; idempotent, any task."""
        self.stop()
        if self._started:
            with anyio.CancelScope(shield=True):
                await self._done.wait()
        await self._give_back(self._handoff.leftovers())


class Buffer(Stage[T]):
    """``buffer(n)``: up to ``n`` items read ahead by a producer task."""

    def __init__(self, tg: TaskGroup, src: Stream[T], n: int) -> None:
        self._src = src
        super().__init__(tg, n)

    async def _produce(self) -> None:
        await forward(self._src, self._handoff, 0)

    async def __anext__(self) -> T:
        _, msg = await self._next_message()
        if msg is DONE:
            await self._end()
        item: T = msg
        return item

    async def _give_back(self, leftovers: dict[int, list[Any]]) -> None:
        await give_back(self._src._putback, leftovers.get(0, []))


class Merge(Stage[T]):
    """``merge(*streams)``: one producer task per input, items in arrival order."""

    def __init__(self, tg: TaskGroup, inputs: Sequence[Stream[T]]) -> None:
        self._inputs = inputs
        self._remaining = len(inputs)
        super().__init__(tg, 1)

    async def _produce(self) -> None:
        async with anyio.create_task_group() as tg:
            for origin, src in enumerate(self._inputs):
                tg.start_soon(forward, src, self._handoff, origin)

    async def __anext__(self) -> T:
        while self._remaining:
            _, msg = await self._next_message()
            if msg is DONE:
                self._remaining -= 1
                continue
            item: T = msg
            return item
        await self._end()

    async def _give_back(self, leftovers: dict[int, list[Any]]) -> None:
        for origin, items in leftovers.items():
            await give_back(self._inputs[origin]._putback, items)


class MapConcurrent(Stage[Any]):
    """``map(fn, concurrency>1)``: ``fn`` runs in worker tasks, at most ``concurrency`` at once.

    A slot is taken before an item is pulled and given back when its result is handed on,
    so nothing is read ahead of a free slot, and at most ``concurrency`` items are in flight
    or waiting to be handed on. An item handed to ``fn`` counts as delivered.
    """

    def __init__(
        self,
        tg: TaskGroup,
        src: Stream[T],
        fn: Callable[[T], Any],
        concurrency: int,
        ordered: bool,
    ) -> None:
        self._src: Stream[Any] = src
        self._fn: Callable[[Any], Any] = fn
        self._ordered = ordered
        self._slots = anyio.Semaphore(concurrency)
        self._pending: dict[int, Any] = {}
        self._next_index = 0
        self._end_index: int | None = None
        super().__init__(tg, concurrency + 1)  # results are put without waiting

    async def _produce(self) -> None:
        async with anyio.create_task_group() as workers:
            index = 0
            try:
                async with self._src:
                    while True:
                        await self._slots.acquire()
                        try:
                            item = await anext(self._src)
                        except StopAsyncIteration:
                            break
                        workers.start_soon(self._work, index, item)
                        index += 1
            except Exception as exc:
                self._handoff.put_nowait(index, Failure(exc))
                return
            self._handoff.put_nowait(index, DONE)

    async def _work(self, index: int, item: Any) -> None:
        try:
            result: Any = await call(self._fn, item)
        except Exception as exc:
            result = Failure(exc)
        self._handoff.put_nowait(index, result)

    async def __anext__(self) -> Any:
        while True:
            if self._next_index in self._pending:
                return self._hand_on(self._pending.pop(self._next_index))
            if self._end_index is not None and self._next_index >= self._end_index:
                await self._end()
            index, msg = await self._next_message()
            if msg is DONE:
                self._end_index = index
            elif not self._ordered:
                return self._hand_on(msg)
            else:
                self._pending[index] = msg

    def _hand_on(self, result: Any) -> Any:
        self._next_index += 1
        self._slots.release()
        return result


class BatchWithin(Stage[list[T]]):
    """``batch(size, within=)``: upstream is read by a task, so that waiting for the next
    item can time out without abandoning an item half-way through upstream's __anext__."""

    def __init__(self, tg: TaskGroup, src: Stream[T], size: int, within: float) -> None:
        self._src = src
        self._size = size
        self._within = within
        self._batch: list[T] = []
        self._deadline = math.inf
        super().__init__(tg, 1)

    async def _produce(self) -> None:
        await forward(self._src, self._handoff, 0)

    async def __anext__(self) -> list[T]:
        while True:
            entry: tuple[int, Any] | None = None
            with anyio.move_on_after(max(0.0, self._deadline - anyio.current_time())):
                entry = await self._next_message()
            if entry is None:  # timed out with a partial batch
                return self._flush()
            msg = entry[1]
            if msg is DONE:
                out = self._flush()
                if out:
                    await self.aclose()
                    return out
                await self._end()
            if not self._batch:
                self._deadline = anyio.current_time() + self._within
            self._batch.append(msg)
            if len(self._batch) >= self._size:
                return self._flush()

    def _flush(self) -> list[T]:
        out, self._batch, self._deadline = self._batch, [], math.inf
        return out

    async def _give_back(self, leftovers: dict[int, list[Any]]) -> None:
        items, self._batch = self._batch, []
        await give_back(self._src._putback, items + leftovers.get(0, []))
