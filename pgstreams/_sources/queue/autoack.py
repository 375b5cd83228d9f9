"""PgQueue's auto-ack subscription: messages are leased as they are read and deleted once the
subscriber has asked for more, so a dropped connection or a dead consumer loses none.

The guarantee, at-least-once:

* A message is deleted once the next message is asked for or the stream closes. A read
  takes up to ``prefetch`` messages under one lease; the statement that makes the next read
  -- when the subscriber asks for a message beyond those -- first deletes them. Closing the
  stream deletes the messages it delivered and releases those it read but never delivered.
* Until it is deleted a message is leased for ``visibility`` seconds from its read. If the
  consumer dies or the connection drops first (even after the read committed and before its
  rows arrived), the message becomes visible again when the lease runs out and is delivered
  again with ``attempts`` one higher; a message whose lease runs out on its
  ``max_attempts``-th delivery goes to the dead set instead, as with ``subscribe_ack()``.
  A consumer that holds a message longer than ``visibility`` may see it delivered
  elsewhere. A message read ahead (``prefetch``) is never handed out after its read's lease
  has run out (by this process's clock, counted from before the read was sent): the
  messages delivered so far are deleted, the rest released, and the stream reads again.
* "Asked for" is meant literally: an operator that reads ahead (``buffer``, ``batch``,
  ``merge``, a concurrent ``map``) asks on the subscriber's behalf, so what it holds is
  deleted already and is lost if the process dies (``subscribe_ack()`` does not have this
  limit). When the chain closes, what it gives back goes back to the queue with its id,
  payload text, headers and attempt count. A message handed to a callback that raises
  counts as delivered.
* The statements a closing stream runs are retried on a fresh connection while the failure
  is a lost connection, for up to ``CLEANUP_TIMEOUT`` seconds. If they still fail, the
  messages the close would have deleted or released keep their lease and come back when it
  runs out; values an operator gives back cannot (they were deleted) and are logged as lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ..._core.errors import DatabaseError
from ..._core.source import Handed, Retry
from ..._core.stream import Stream
from ..._pg import calls

if TYPE_CHECKING:
    from .queue import PgQueue

__all__ = ["AutoAck"]

T = TypeVar("T")
logger = logging.getLogger("pgstreams.queue")

_ID, _PAYLOAD, _HEADERS, _ATTEMPTS, _ENQUEUED, _DEAD, _LEASE = range(7)
"""Columns of a row read by the ``pop`` statement."""

_by_id = itemgetter(_ID)


class AutoAck(Generic[T]):
    """One ``subscribe()`` stream: the read it is delivering and what it handed out."""

    def __init__(self, queue: PgQueue[T], prefetch: int, visibility: float, poll: float) -> None:
        self._queue = queue
        self._params: dict[str, Any] = {
            "n": prefetch,
            "vis": visibility,
            "max": 0,
            "queue": queue.name,
            "done": [],
            "last_lease": None,
        }
        self._poll = poll
        self._handed = Handed()
        self._rows: list[Sequence[Any]] = []
        """The current read (one lease), in delivery order."""
        self._slots: list[Sequence[Any] | None] = []
        """The current read's entries in ``_handed``."""
        self._delivered = 0
        """How many of ``_rows`` were handed out."""
        self._expires = 0.0
        """When the current read's lease runs out (``anyio.current_time()``, early side)."""
        self._kept: set[int] = set()
        """Ids of delivered rows an operator gave back before the stream closed."""
        self._closed = False

    def stream(self) -> Stream[T]:
        return Stream(self._loop, putback=self._give_back)

    async def _loop(self) -> AsyncIterator[T]:
        q = self._queue
        retry = Retry(logger, f"queue {q.name}")
        try:
            async with q._db.wakeups(q._channel) as wakeup:
                while True:
                    # The subscriber asks for more: this read deletes all of the last one.
                    done = self._rows
                    self._params["done"] = [r[_ID] for r in done]
                    self._params["last_lease"] = done[0][_LEASE] if done else None
                    rows = await q._read(
                        q._sql["pop"], self._params, wakeup, self._poll, retry, sent=self._sent
                    )
                    # No await from the read to here: the rows are leased to this stream.
                    self._rows = rows = [r for r in rows if not r[_DEAD]]
                    rows.sort(key=_by_id)
                    values = [json.loads(r[_PAYLOAD]) for r in rows]
                    self._slots = self._handed.add(values, rows)
                    for value in values:
                        if self._delivered and anyio.current_time() >= self._expires:
                            # Another consumer may hold the rest already: hand none out.
                            await self._settle_read("lease ran out: ")
                            break
                        self._delivered += 1
                        yield value
        finally:
            self._closed = True
            await self._close()

    def _sent(self, started: float) -> None:
        """A read sent at ``started`` went through: the rows it deleted are gone for good,
        and those it leased are leased until ``visibility`` seconds after its start."""
        self._rows, self._slots, self._delivered = [], [], 0
        self._params["done"], self._params["last_lease"] = [], None
        self._expires = started + self._params["vis"]

    async def _close(self) -> None:
        await self._settle_read("")

    async def _settle_read(self, why: str) -> None:
        """Delete what the current read delivered and release the rest; forget the read."""
        rows, delivered = self._rows, self._delivered
        self._rows, self._delivered = [], 0
        if not rows:
            return
        for i in range(delivered, len(rows)):
            self._slots[i] = None  # released here, so never given back by an operator
        done = [r[_ID] for r in rows[:delivered] if r[_ID] not in self._kept]
        undone = [r[_ID] for r in rows[delivered:]] + sorted(self._kept)
        params = {
            "done": done,
            "undone": undone,
            "last_lease": rows[0][_LEASE],
            "queue": self._queue.name,
            "channel": self._queue._channel,
        }
        self._kept.clear()
        what = f"{why}delete {len(done)} delivered and release {len(undone)} unread messages"
        await self._settle("pop_close", params, what)

    # -- giving back what an operator read ahead but never delivered -----------------------

    async def _give_back(self, values: list[Any]) -> None:
        q = self._queue
        rows, unknown = self._handed.split(values, f"queue {q.name}", logger)
        if not self._closed:
            # Given back before the stream closed (throttle does): rows of the current read
            # are still leased here, and the close releases them instead of deleting them.
            current = {id(r) for r in self._rows[: self._delivered]}
            self._kept.update(r[_ID] for r in rows if id(r) in current)
            rows = [r for r in rows if id(r) not in current]
        if rows:
            params = {
                "ids": [r[_ID] for r in rows],
                "payloads": [r[_PAYLOAD] for r in rows],
                "headers": [r[_HEADERS] for r in rows],
                "attempts": [r[_ATTEMPTS] - 1 for r in rows],  # never delivered after all
                "enqueued": [r[_ENQUEUED] for r in rows],
                "queue": q.name,
                "channel": q._channel,
            }
            what = f"put back {len(rows)} messages read ahead (lost if this fails)"
            await self._settle("unpop", params, what)
        if unknown:
            # Not idempotent (each try appends), so tried once.
            params = {"payloads": unknown, "queue": q.name, "channel": q._channel}
            await calls.cleanup(
                q._db,
                q._sql["reinsert"],
                params,
                logger=logger,
                what=f"queue {q.name}: re-queue ({len(unknown)})",
            )

    async def _settle(self, name: str, params: Mapping[str, Any], what: str) -> None:
        """Run an idempotent statement for a closing stream: shielded, bounded, tried again
        on a fresh connection while the failure is a lost connection, and never raising
        (failures are logged: the leases they would have settled run out instead)."""
        q = self._queue
        owner = f"queue {q.name}: {what}"
        retry = Retry(logger, owner)
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(calls.CLEANUP_TIMEOUT) as scope:
                while True:
                    try:
                        async with q._db.connection() as conn:
                            await conn.execute(q._sql[name], params)
                        return
                    except DatabaseError as exc:
                        if not exc.transient:
                            logger.error("%s failed: %s", owner, exc)
                            return
                        await retry.after(exc)
            if scope.cancelled_caught:
                logger.error("%s timed out", owner)
