"""PgQueue's auto-ack subscription: messages are taken inside a transaction the stream holds
open while it hands them out, and that transaction commits when the subscriber asks for
more, so a dropped connection or a dead consumer loses none.

The guarantee, at-least-once:

* A read deletes up to ``prefetch`` messages in a transaction of the stream's own
  connection (one per stream, outside the pool). Other consumers skip those rows; nothing is
  gone until the transaction commits, which happens in the same round trip as the next
  read -- when the subscriber asks for a message beyond those -- or when the stream closes.
  Closing puts back, before it commits, the messages read but never delivered, as they were
  (id, payload text, headers, attempt count, place in line).
* If the connection drops or the process dies before the commit (even after the read and
  before its rows arrived), the transaction rolls back and every message of the read is
  back in line at once, delivered ones included. A message never handed out after the read
  has been open ``visibility`` seconds (by this process's clock, counted from before the
  read was sent): the delivered ones are committed, the rest put back, and the stream reads
  again. The server ends a session left idle in the transaction ``visibility`` seconds
  after the read returned, so a consumer that hangs holds nothing longer than that; one that
  holds a message longer sees it delivered again (after its read rolled back).
* Attempts are not counted: a message whose consumer dies is delivered again as it was, so
  ``max_attempts`` does not apply to deaths of auto-ack consumers (``subscribe_ack()`` does
  count them). A message whose manual-ack lease ran out on its last attempt is moved to
  the dead set by the read that finds it, as ``subscribe_ack()`` would.
* "Asked for" is meant literally: an operator that reads ahead (``buffer``, ``batch``,
  ``merge``, a concurrent ``map``) asks on the subscriber's behalf. What it holds from the
  open read is put back at the close; what it holds from earlier reads was deleted already
  and is lost if the process dies (``subscribe_ack()`` does not have this limit). When the
  chain closes, what it gives back goes back to the queue with its id, payload text,
  headers and attempt count. A message handed to a callback that raises counts as delivered.
* The transaction is open while the subscriber handles the read's messages: keep
  ``prefetch`` times the handling time well under ``visibility`` (an open transaction holds
  back VACUUM for the whole database).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import psycopg
from psycopg import AsyncConnection

from ..._core import telemetry
from ..._core.errors import DatabaseError
from ..._core.source import Handed, Retry
from ..._core.stream import Stream
from ..._pg import calls
from ..._pg.database import translate_errors

if TYPE_CHECKING:
    from .queue import PgQueue

__all__ = ["AutoAck"]

T = TypeVar("T")
logger = logging.getLogger("pgstreams.queue")

_ID, _PAYLOAD, _HEADERS, _ATTEMPTS, _ENQUEUED, _VISIBLE = range(6)
"""Columns of a row read by the ``pop`` statement."""

_by_id = itemgetter(_ID)
_COMMIT, _ROLLBACK = b"COMMIT", b"ROLLBACK"


class AutoAck(Generic[T]):
    """One ``subscribe()`` stream: its connection, the open read and what it handed out."""

    def __init__(self, queue: PgQueue[T], prefetch: int, visibility: float, poll: float) -> None:
        self._queue = queue
        self._prefetch = prefetch
        self._visibility = visibility
        self._poll = poll
        self._handed = Handed()
        self._conn: AsyncConnection[Any] | None = None
        self._rows: list[Sequence[Any]] = []
        """The open read: messages deleted by the uncommitted transaction, in delivery order."""
        self._slots: list[Sequence[Any] | None] = []
        """The open read's entries in ``_handed``."""
        self._delivered = 0
        """How many of ``_rows`` were handed out."""
        self._expires = 0.0
        """When the open read must be settled (``anyio.current_time()``, early side)."""
        self._read_at = 0.0
        """When the open read returned (wall clock), with telemetry on."""
        self._kept: set[int] = set()
        """Ids of delivered rows of the open read an operator gave back."""
        self._closed = False

    def stream(self) -> Stream[T]:
        return Stream(self._loop, putback=self._give_back)

    async def _loop(self) -> AsyncIterator[T]:
        q = self._queue
        retry = Retry(logger, f"queue {q.name}")
        logger.info("queue %s: consumer started (auto-ack)", q.name)
        try:
            async with q._db.wakeups(q._channel) as wakeup:
                while True:
                    rows = await self._read(wakeup, retry)
                    values = [json.loads(r[_PAYLOAD]) for r in rows]
                    self._slots = self._handed.add(values, rows)
                    for value in values:
                        if self._delivered and anyio.current_time() >= self._expires:
                            # The server may end the session any moment: hand out no more.
                            await self._settle("lease ran out: ")
                            break
                        self._delivered += 1
                        yield value
        finally:
            self._closed = True
            with anyio.CancelScope(shield=True):
                try:
                    await self._settle("")
                finally:
                    await self._disconnect()

    # -- reading -----------------------------------------------------------------------

    async def _read(self, wakeup: Any, retry: Retry) -> list[Sequence[Any]]:
        """Commit the open read and take the next one (one round trip), sleeping while
        there is none and riding out lost connections."""
        q = self._queue
        while True:
            # Outside the shield, so a busy consumer whose callback never awaits can still
            # be cancelled: the deadline fires during the (shielded) read below.
            await anyio.lowlevel.checkpoint_if_cancelled()
            wakeup.arm()
            try:
                parts, params = self._settling()
                parts += [q._sql["pop_begin"], q._sql["pop"]]
                params |= {
                    "n": self._prefetch,
                    "max": await q._max_attempts(),
                    "idle_ms": str(max(1, round(self._visibility * 1000))),
                }
                with anyio.CancelScope(shield=True):
                    conn = await self._connection()
                    started = anyio.current_time()
                    rows = await _run(conn, parts, params, fetch=True)
                    self._forget()  # committed by the statement that read these
                    if not rows:
                        await _run(conn, [_COMMIT], {})
                if rows:
                    rows.sort(key=_by_id)
                    self._rows, self._expires = rows, started + self._visibility
                    if (tel := telemetry.otel) is not None:
                        self._read_at = tel.now()
                    retry.reset()
                    return rows
                await wakeup.wait(await calls.idle_wait(q._db, q._sql["next_visible"], self._poll))
            except DatabaseError as exc:
                # The transaction is gone with its connection: its messages are back in line.
                self._forget()
                await self._disconnect()
                await retry.after(exc)

    async def _connection(self) -> AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await self._queue._db.dedicated()
        return self._conn

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            await conn.close()  # an open transaction rolls back

    # -- settling the open read --------------------------------------------------------

    def _settling(self) -> tuple[list[bytes], dict[str, Any]]:
        """The statements that end the open read: delivered messages stay deleted (and are
        counted), the rest are put back; then the transaction ends."""
        rows, delivered = self._rows, self._delivered
        if not rows:
            return [], {}
        done = [r for r in rows[:delivered] if r[_ID] not in self._kept]
        if not done:
            return [_ROLLBACK], {}  # nothing to keep deleted: all of it goes back as it was
        q = self._queue
        parts = [q._sql["pop_count"]]
        params: dict[str, Any] = {"count": len(done), "queue": q.name, "channel": q._channel}
        back = [r for r in rows[:delivered] if r[_ID] in self._kept] + list(rows[delivered:])
        if back:
            parts.append(q._sql["pop_keep"])
            params |= {
                "ids": [r[_ID] for r in back],
                "payloads": [r[_PAYLOAD] for r in back],
                "headers": [r[_HEADERS] for r in back],
                "attempts": [r[_ATTEMPTS] for r in back],
                "enqueued": [r[_ENQUEUED] for r in back],
                "visible": [r[_VISIBLE] for r in back],
            }
        parts.append(_COMMIT)
        return parts, params

    def _forget(self) -> None:
        if self._delivered and (tel := telemetry.otel) is not None:
            # Counted as the read ends: what it handed out is known then.
            done = [r for r in self._rows[: self._delivered] if r[_ID] not in self._kept]
            enqueued = [telemetry.parse_time(r[_ENQUEUED]) for r in done]
            tel.delivered(self._queue._kind, self._queue.name, enqueued, self._read_at)
        self._rows, self._slots, self._delivered = [], [], 0
        self._kept.clear()

    async def _settle(self, why: str) -> None:
        """End the open read now (shielded, bounded, never raising: if it fails, the
        transaction rolls back with its connection and every message of the read goes back)."""
        rows, delivered = self._rows, self._delivered
        if not rows or self._conn is None:
            self._forget()
            return
        for i in range(delivered, len(self._slots)):
            self._slots[i] = None  # put back here, so never given back by an operator
        parts, params = self._settling()
        self._forget()
        failed: str | None = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(calls.CLEANUP_TIMEOUT) as scope:
            try:
                await _run(self._conn, parts, params)
            except DatabaseError as exc:
                failed = str(exc)
        if scope.cancelled_caught:
            failed = "timed out"
        if failed is not None:
            await self._disconnect()
            logger.warning(
                "queue %s: %scould not commit a read of %d messages (%s): all of them, "
                "%d delivered, go back in line",
                self._queue.name,
                why,
                len(rows),
                failed,
                delivered,
            )

    # -- giving back what an operator read ahead but never delivered -----------------------

    async def _give_back(self, values: list[Any]) -> None:
        q = self._queue
        rows, unknown = self._handed.split(values, f"queue {q.name}", logger)
        if not self._closed:
            # Given back before the stream closed (throttle does): rows of the open read are
            # put back by the statement that ends it.
            current = {id(r) for r in self._rows[: self._delivered]}
            self._kept.update(r[_ID] for r in rows if id(r) in current)
            rows = [r for r in rows if id(r) not in current]
        if rows:
            params = {
                "ids": [r[_ID] for r in rows],
                "payloads": [r[_PAYLOAD] for r in rows],
                "headers": [r[_HEADERS] for r in rows],
                "attempts": [r[_ATTEMPTS] for r in rows],
                "enqueued": [r[_ENQUEUED] for r in rows],
                "queue": q.name,
                "channel": q._channel,
            }
            what = f"put back {len(rows)} messages read ahead (lost if this fails)"
            await _retried(q, "unpop", params, what)
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


async def _run(
    conn: AsyncConnection[Any], parts: list[bytes], params: dict[str, Any], *, fetch: bool = False
) -> list[Any]:
    """Run statements in one round trip (client-side binding: several statements in one
    query); the rows of the last one if ``fetch``."""
    with translate_errors():
        cur = psycopg.AsyncClientCursor(conn)
        await cur.execute(b";\n".join(parts), params)
        while cur.nextset():
            pass
        return await cur.fetchall() if fetch else []


async def _retried(queue: PgQueue[Any], name: str, params: dict[str, Any], what: str) -> None:
    """Run an idempotent statement for a closing stream: shielded, bounded, tried again on a
    fresh connection while the failure is a lost connection, and never raising."""
    owner = f"queue {queue.name}: {what}"
    retry = Retry(logger, owner)
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(calls.CLEANUP_TIMEOUT) as scope:
            while True:
                try:
                    async with queue._db.connection() as conn:
                        await conn.execute(queue._sql[name], params)
                    return
                except DatabaseError as exc:
                    if not exc.transient:
                        logger.error("%s failed: %s", owner, exc)
                        return
                    await retry.after(exc)
        if scope.cancelled_caught:
            logger.error("%s timed out", owner)
