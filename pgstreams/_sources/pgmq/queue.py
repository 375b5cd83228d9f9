"""``PgmqQueue[T]``: queues of the pgmq extension (SQS-like), consumed as streams.

pgmq is installed on first use when the database lacks it: ``CREATE EXTENSION pgmq`` if the
server ships the extension, otherwise the SQL-only install bundled with the ``pgmq``
package. Every operation is one statement, sent through psycopg's async driver: pgmq's own SQL
functions, except where a delivery is settled -- there the statement also checks that the
delivery is still current, which pgmq's functions cannot (see ``queries.sql``).

Delivery:

* ``subscribe()`` pops (deletes on read, at-most-once).
* ``subscribe_ack()`` reads with a visibility timeout (``vt``) and yields ``Envelope`` objects:
  ``ack`` deletes or archives, ``nack(delay)`` sets the visibility, ``extend`` pushes it out.
  A delivery is named by ``(msg_id, read_ct)``, so a consumer whose timeout ran out and
  whose message was read again can no longer settle it (``ack`` returns False).
* With ``max_attempts=N`` (stored with the queue), a message read more than N times moves to
  the queue ``<name>_dlq`` with the error of its last attempt in its headers
  (``pgstreams_dead``); ``requeue_dead()`` moves such messages back.
* Idle subscribers poll. After ``enable_notify()`` pgmq's insert trigger NOTIFYs and the
  shared listener wakes them at once. pgmq throttles those notifications; a subscriber
  woken by one looks again when the throttle interval has passed, so inserts whose
  notification was suppressed are not left to the next poll.

The class is assembled from one module per responsibility: ``publishing`` (send),
``auto_ack`` (``subscribe``), ``manual_ack`` (``subscribe_ack``, envelopes, ``ack_many``),
``dead_letters`` (the DLQ) on ``core`` (names, statements, settings); this module keeps
creating, listing, notifications, metrics, purging and dropping.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any, TypeVar

from psycopg import AsyncConnection

from ..._core.errors import InvalidArgumentError
from ..._core.source import UNSET, Unset
from ..._core.validate import check_positive_int
from ..._pg.database import Database
from ..._pg.locks import advisory_key
from .auto_ack import AutoAck
from .core import int_at_least, plain_statements
from .install import ensure_pgmq, pgmq_installed
from .manual_ack import ManualAck, ReadMode
from .publishing import Publishing

__all__ = ["PgmqMetrics", "PgmqQueue", "ReadMode"]

T = TypeVar("T")

_LIST = plain_statements("list")["list"]


@dataclass(frozen=True, slots=True)
class PgmqMetrics:
    """pgmq's metrics of one queue, plus the length of its dead-letter queue."""

    queue_length: int
    """Messages in the queue, visible or not."""
    visible: int
    """Messages that a read would return now."""
    newest_age: int | None
    """Seconds since the newest message was sent (None when empty)."""
    oldest_age: int | None
    """Seconds since the oldest message was sent (None when empty)."""
    total_sent: int
    """Messages ever sent to the queue."""
    dead: int
    """Messages in ``<name>_dlq``."""


class PgmqQueue(Publishing[T], AutoAck[T], ManualAck[T]):
    """A pgmq queue (see module docstring).

    ``await PgmqQueue.create(db, name)`` creates it (installing pgmq if needed);
    ``PgmqQueue(db, name)`` opens an existing queue without touching the database.
    """

    @classmethod
    async def create(
        cls,
        db: Database,
        name: str,
        *,
        partitioned: bool = False,
        unlogged: bool = False,
        max_attempts: int | Unset | None = UNSET,
    ) -> PgmqQueue[Any]:
        """Create the queue if needed (idempotent, safe to race) and return a handle.

        ``partitioned`` makes pgmq partition the queue with pg_partman (pgmq's defaults:
        10,000 msg_ids a partition, 100,000 kept); without that extension installed in the
        database it raises before anything is written. ``unlogged`` trades crash safety for
        speed. ``max_attempts`` (None = unlimited) is stored and applies to every handle;
        leaving it out keeps the stored value. Setting it creates ``<name>_dlq``.
        """
        if not isinstance(partitioned, bool) or not isinstance(unlogged, bool):
            raise InvalidArgumentError("partitioned and unlogged must be bools")
        if partitioned and unlogged:
            raise InvalidArgumentError("a pgmq queue cannot be both partitioned and unlogged")
        if not isinstance(max_attempts, Unset) and max_attempts is not None:
            check_positive_int("max_attempts", max_attempts)
        queue: PgmqQueue[Any] = cls(db, name)
        if partitioned:
            await queue._require_pg_partman()
        await db.ensure_migrated()
        await ensure_pgmq(db)
        async with db.connection() as conn, conn.transaction():
            await conn.execute(queue._sql["lock"], {"key": advisory_key("pgmq", name)})
            await queue._create_table(conn, name, partitioned=partitioned, unlogged=unlogged)
            if isinstance(max_attempts, int):
                await queue._create_table(conn, queue.dead_letter_queue)
            params = {"queue": name, "max": max_attempts}
            keep = isinstance(max_attempts, Unset)
            await conn.execute(queue._sql["register_keep" if keep else "register"], params)
        queue._settings = None
        return queue

    async def _require_pg_partman(self) -> None:
        """Refuse a partitioned queue, before anything is written, where pg_partman is missing.

        pgmq's ``create_partitioned`` makes and rotates the partitions with pg_partman; pgmq
        itself would fail only after pgstreams had installed pgmq and its own schema.
        """
        row = await self._fetchone(self._sql["partman_state"], None)
        installed, available = bool(row[0]), bool(row[1])
        if installed:
            return
        where = (
            "this server has it but this database has not installed it: run CREATE EXTENSION"
            " pg_partman first"
            if available
            else "this server does not have it: install pg_partman on the server and run CREATE"
            " EXTENSION pg_partman in this database, or leave partitioned out"
        )
        raise InvalidArgumentError(
            "partitioned=True needs the pg_partman extension (pgmq partitions queues with"
            f" it); {where}"
        )

    async def _create_table(
        self,
        conn: AsyncConnection[Any],
        name: str,
        *,
        partitioned: bool = False,
        unlogged: bool = False,
    ) -> None:
        cur = await conn.execute(self._sql["kind"], {"queue": name})
        row = await cur.fetchone()
        if row is not None:
            if (bool(row[0]), bool(row[1])) != (partitioned, unlogged):
                kind = "partitioned" if row[0] else "unlogged" if row[1] else "plain"
                raise InvalidArgumentError(f"pgmq queue {name!r} already exists as a {kind} queue")
            return
        how = "create_partitioned" if partitioned else "create_unlogged" if unlogged else "create"
        await conn.execute(self._sql[how], {"queue": name})

    @classmethod
    async def list(cls, db: Database) -> builtins.list[str]:
        """Names of every pgmq queue in the database (dead-letter queues included)."""
        async with db.connection() as conn:
            if not await pgmq_installed(conn):
                return []
            cur = await conn.execute(_LIST)
            return [str(r[0]) for r in await cur.fetchall()]

    # -- notifications -----------------------------------------------------------------

    async def enable_notify(self, throttle_ms: int = 250) -> None:
        """Have pgmq NOTIFY on insert (at most once per ``throttle_ms``) to wake subscribers."""
        int_at_least("throttle_ms", throttle_ms, 0)
        if throttle_ms > 2**31 - 1:
            raise InvalidArgumentError(f"throttle_ms must fit in an int4, got {throttle_ms}")
        await self._fetchone(self._sql["enable_notify"], {"queue": self.name, "ms": throttle_ms})
        self._settings = None

    async def disable_notify(self) -> None:
        """Stop pgmq's insert notifications; subscribers fall back to polling."""
        await self._fetchone(self._sql["disable_notify"], {"queue": self.name})
        self._settings = None

    # -- administration ----------------------------------------------------------------

    async def metrics(self) -> PgmqMetrics:
        row = await self._fetchone(
            self._sql["metrics"],
            {"queue": self.name, "dlq": self.dead_letter_queue, "dlq_table": self._dlq_table()},
        )
        length, visible, newest, oldest, total, dead = row
        return PgmqMetrics(int(length), int(visible), newest, oldest, int(total), int(dead))

    async def purge(self) -> int:
        """Delete every message, dead-lettered ones included; returns how many."""
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql["purge"], {"queue": self.name})
            row = await cur.fetchone()
            count = int(row[0]) if row else 0
            cur = await conn.execute(self._sql["exists"], {"table": self._dlq_table()})
            exists = await cur.fetchone()
            if exists and exists[0]:
                cur = await conn.execute(self._sql["purge"], {"queue": self.dead_letter_queue})
                row = await cur.fetchone()
                count += int(row[0]) if row else 0
        return count

    async def drop(self) -> None:
        """Delete the queue, its archive, its dead-letter queue and its settings."""
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute(self._sql["lock"], {"key": advisory_key("pgmq", self.name)})
            for name in (self.name, self.dead_letter_queue):
                cur = await conn.execute(self._sql["queue_exists"], {"queue": name})
                row = await cur.fetchone()
                if row and row[0]:
                    await conn.execute(self._sql["drop"], {"queue": name})
            await conn.execute(self._sql["unregister"], {"queue": self.name})
        self._settings = None
