"""``PgQueue[T]``: a queue on a plain table, claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``.

Delivery:

* ``subscribe()`` deletes each message as it is read (at-most-once).
* ``subscribe_ack()`` leases messages for ``visibility`` seconds (at-least-once). A lease that
  runs out makes the message visible again by itself -- no janitor process -- and every
  delivery counts an attempt. A message delivered ``max_attempts`` times that is nacked or
  whose lease runs out moves to the dead set with its last error.
* Publishing wakes idle subscribers with one NOTIFY per statement (PostgreSQL folds
  identical notifications of one transaction into one); polling is the fallback.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import anyio
from psycopg import AsyncConnection, sql

from . import _queue_sql as Q
from ._db import Database, translate_errors
from ._envelope import Envelope
from ._errors import DatabaseError, LeaseLostError
from ._migrate import advisory_key
from ._stream import Stream
from ._validate import (
    check_name,
    check_positive_int,
    check_seconds,
    headers_json,
    to_json,
)

__all__ = ["DeadMessage", "PgQueue", "QueueMetrics"]

T = TypeVar("T")
logger = logging.getLogger("pgstreams.queue")

DEFAULT_POLL_INTERVAL = 5.0
_UNLIMITED = 2**31 - 1
_MIN_IDLE_WAIT = 0.02
_RELEASE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """Counts for one queue. ``total`` = pending + processing + dead + completed."""

    pending: int
    """Waiting to be delivered, including delayed messages and expired leases."""
    processing: int
    """Leased to a consumer whose lease has not run out."""
    completed: int
    """Acked or auto-acked since the queue was created."""
    dead: int
    """Gave up after ``max_attempts``; see ``dead_letters()`` and ``requeue_dead()``."""
    total: int


@dataclass(frozen=True, slots=True)
class DeadMessage:
    """A message in the dead set, with the error of its last attempt."""

    id: int
    value: Any
    headers: Mapping[str, Any]
    attempts: int
    enqueued_at: datetime
    dead_at: datetime
    last_error: str | None


def _headers(text: str) -> Any:
    # Most messages carry no headers: skip the JSON parser for them.
    return {} if text == "{}" else json.loads(text)


def channel_for(schema: str, kind: str, name: str) -> str:
    """The NOTIFY channel of an object; hashed when it would exceed 63 bytes."""
    channel = f"pgstreams.{schema}.{kind}.{name}"
    if len(channel.encode()) > 63:
        channel = "pgstreams." + hashlib.blake2b(channel.encode(), digest_size=16).hexdigest()
    return channel


class PgQueue(Generic[T]):
    """A durable queue of JSON messages in one PostgreSQL table (see module docstring).

    Create or open one with ``await PgQueue.create(db, name)``.
    """

    def __init__(self, db: Database, name: str, *, max_attempts: int | None = None) -> None:
        self._db = db
        self.name = check_name("queue", name)
        if max_attempts is not None:
            check_positive_int("max_attempts", max_attempts)
        self.max_attempts = max_attempts
        self._max = max_attempts if max_attempts is not None else _UNLIMITED
        self._channel = channel_for(db.schema, "queue", name)
        names = {
            "table": sql.Identifier(db.schema, f"q_{name}"),
            "ready_idx": sql.Identifier(f"q_{name}_ready"),
            "stats": sql.Identifier(db.schema, "queue_stats"),
            "queues": sql.Identifier(db.schema, "queues"),
        }

        def render(template: str) -> bytes:
            # Rendered once: identifiers are fixed per queue, so each call sends ready bytes.
            return sql.SQL(template).format(**names).as_string().encode()  # type: ignore[arg-type,unused-ignore]

        self._sql = {
            key: render(getattr(Q, key))
            for key in (
                "CREATE",
                "REGISTER",
                "REGISTER_SHARDS",
                "PUBLISH",
                "PUBLISH_BATCH",
                "POP",
                "UNPOP",
                "CLAIM",
                "RELEASE",
                "ACK",
                "ACK_MANY",
                "NACK",
                "EXTEND",
                "NEXT_VISIBLE",
                "METRICS",
                "REQUEUE_DEAD",
                "DEAD",
                "PURGE",
                "DROP_TABLE",
                "UNREGISTER",
            )
        }

    @classmethod
    async def create(
        cls, db: Database, name: str, *, max_attempts: int | None = None
    ) -> PgQueue[Any]:
        """Create the queue if needed (idempotent, safe to race) and return a handle.

        ``max_attempts`` (None = unlimited) is stored with the queue; calling ``create``
        again with another value updates it.
        """
        queue: PgQueue[Any] = cls(db, name, max_attempts=max_attempts)
        await db.ensure_migrated()
        async with db.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", [advisory_key("queue", db.schema, name)]
            )
            await conn.execute(queue._sql["CREATE"])
            params = {"queue": name, "max": max_attempts, "shards": Q.SHARDS}
            await conn.execute(queue._sql["REGISTER"], params)
            await conn.execute(queue._sql["REGISTER_SHARDS"], params)
        return queue

    # -- publishing --------------------------------------------------------------------

    async def publish(
        self,
        value: T,
        *,
        delay: float = 0,
        headers: Mapping[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> int:
        """Append one message; returns its id.

        With ``conn`` the insert joins that connection's current transaction: the message
        exists (and subscribers are woken) only if and when the caller commits.
        """
        params = {
            "payload": to_json("message", value),
            "headers": headers_json(headers),
            "delay": check_seconds("delay", delay),
            "channel": self._channel,
        }
        row = await self._fetchone(self._sql["PUBLISH"], params, conn)
        assert row is not None
        return int(row[0])

    async def publish_batch(
        self,
        values: Iterable[T],
        *,
        delay: float = 0,
        headers: Mapping[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> list[int]:
        """Append many messages in one statement (all or none); returns their ids in order."""
        payloads = [to_json(f"message {i}", v) for i, v in enumerate(values)]
        params = {
            "payloads": payloads,
            "headers": headers_json(headers),
            "delay": check_seconds("delay", delay),
            "channel": self._channel,
        }
        if not payloads:
            return []
        row = await self._fetchone(self._sql["PUBLISH_BATCH"], params, conn)
        assert row is not None
        return list(row[0])

    # -- consuming ---------------------------------------------------------------------

    def subscribe(
        self, *, prefetch: int = 1, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> Stream[T]:
        """Stream message values, deleting each as it is read (auto-ack, at-most-once).

        ``prefetch`` messages are read per round trip; any read but not yet handed
        downstream when the stream closes are put back unchanged.
        """
        check_positive_int("prefetch", prefetch)
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        return Stream(lambda: self._pop_loop(prefetch, poll))

    def subscribe_ack(
        self,
        *,
        visibility: float = 30,
        prefetch: int = 1,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> Stream[Envelope[T]]:
        """Stream leased messages; settle each with ``env.ack()`` / ``env.nack()``.

        A message is leased for ``visibility`` seconds from when it is read. Envelopes read
        ahead (``prefetch`` > 1) but never handed downstream are released at close as if
        never read. An envelope handed downstream and never settled keeps its lease until it
        runs out: the library cannot know whether it was processed.
        """
        vis = check_seconds("visibility", visibility, allow_zero=False)
        check_positive_int("prefetch", prefetch)
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        return Stream(lambda: self._lease_loop(vis, prefetch, poll))

    async def ack_many(self, envelopes: Sequence[Envelope[T]]) -> int:
        """Ack several envelopes in one round trip; returns how many leases were still held."""
        for env in envelopes:
            env._settle()
        if not envelopes:
            return 0
        row = await self._fetchone(
            self._sql["ACK_MANY"],
            {
                "ids": [e.id for e in envelopes],
                "leases": list({e._lease for e in envelopes}),
                "queue": self.name,
            },
        )
        return int(row[0]) if row else 0

    async def _pop_loop(self, prefetch: int, poll: float) -> AsyncIterator[T]:
        async with self._db.wakeups(self._channel) as wakeup:
            while True:
                wakeup.arm()
                rows = await self._fetchall_shielded(
                    self._sql["POP"], {"n": prefetch, "queue": self.name}
                )
                if not rows:
                    await wakeup.wait(await self._idle_wait(poll))
                    continue
                handed = 0
                try:
                    for row in rows:
                        handed += 1
                        yield json.loads(row[1])
                finally:
                    if handed < len(rows):
                        await self._unpop(rows[handed:])

    async def _lease_loop(
        self, visibility: float, prefetch: int, poll: float
    ) -> AsyncIterator[Envelope[T]]:
        params = {"n": prefetch, "max": self._max, "vis": visibility}
        async with self._db.wakeups(self._channel) as wakeup:
            while True:
                wakeup.arm()
                rows = await self._fetchall_shielded(self._sql["CLAIM"], params)
                if not rows:
                    await wakeup.wait(await self._idle_wait(poll))
                    continue
                rows.sort(key=lambda r: r[0])
                envelopes = [self._envelope(row) for row in rows if not row[5]]
                handed = 0
                try:
                    for env in envelopes:
                        handed += 1
                        yield env
                finally:
                    if handed < len(envelopes):
                        await self._release(envelopes[handed:])

    def _envelope(self, row: Sequence[Any]) -> Envelope[T]:
        return Envelope(
            self,
            id=row[0],
            value=json.loads(row[1]),
            headers=_headers(row[2]),
            attempts=row[3],
            enqueued_at=row[4],
            lease=row[6],
        )

    async def _idle_wait(self, poll: float) -> float:
        """How long an idle subscriber may sleep: until the poll interval or the moment the
        next delayed message or expiring lease becomes visible, whichever is sooner."""
        row = await self._fetchone(self._sql["NEXT_VISIBLE"], None)
        if row is None or row[0] is None:
            return poll
        return min(poll, max(_MIN_IDLE_WAIT, float(row[0]) + 0.001))

    async def _unpop(self, rows: Sequence[Sequence[Any]]) -> None:
        params = {
            "ids": [r[0] for r in rows],
            "payloads": [r[1] for r in rows],
            "headers": [r[2] for r in rows],
            "attempts": [r[3] for r in rows],
            "enqueued": [r[4] for r in rows],
            "queue": self.name,
        }
        await self._cleanup(self._sql["UNPOP"], params, "put back unread messages")

    async def _release(self, envelopes: Sequence[Envelope[T]]) -> None:
        params = {"ids": [e.id for e in envelopes], "leases": list({e._lease for e in envelopes})}
        await self._cleanup(self._sql["RELEASE"], params, "release unread leases")

    async def _cleanup(self, query: bytes, params: Mapping[str, Any], what: str) -> None:
        # Runs while the stream closes, possibly because it was cancelled: shield it, bound
        # it, and never let it mask the exception that is closing the stream.
        with anyio.CancelScope(shield=True), anyio.move_on_after(_RELEASE_TIMEOUT):
            try:
                async with self._db.connection() as conn:
                    await conn.execute(query, params)
            except DatabaseError as exc:
                logger.warning("queue %s: could not %s: %s", self.name, what, exc)

    # -- settling (called by Envelope) -------------------------------------------------

    async def _ack(self, env: Envelope[Any]) -> bool:
        row = await self._fetchone(
            self._sql["ACK"], {"id": env.id, "lease": env._lease, "queue": self.name}
        )
        return row is not None

    async def _nack(self, env: Envelope[Any], delay: float, error: str | None) -> bool:
        params = {
            "id": env.id,
            "lease": env._lease,
            "delay": delay,
            "error": error,
            "max": self._max,
        }
        return await self._fetchone(self._sql["NACK"], params) is not None

    async def _extend(self, env: Envelope[Any], seconds: float) -> None:
        params = {"id": env.id, "lease": env._lease, "seconds": seconds}
        if await self._fetchone(self._sql["EXTEND"], params) is None:
            raise LeaseLostError(f"message {env.id}: attempt {env.attempts}'s lease is lost")

    # -- administration ----------------------------------------------------------------

    async def metrics(self) -> QueueMetrics:
        """Exact counts at one instant (one consistent snapshot)."""
        row = await self._fetchone(self._sql["METRICS"], {"queue": self.name})
        assert row is not None
        pending, processing, dead, completed = (int(v) for v in row)
        return QueueMetrics(
            pending, processing, completed, dead, pending + processing + dead + completed
        )

    async def dead_letters(self, limit: int = 100) -> list[DeadMessage]:
        """The oldest ``limit`` messages of the dead set."""
        check_positive_int("limit", limit)
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql["DEAD"], {"limit": limit})
            rows = await cur.fetchall()
        return [
            DeadMessage(r[0], json.loads(r[1]), _headers(r[2]), r[3], r[4], r[5], r[6])
            for r in rows
        ]

    async def requeue_dead(self) -> int:
        """Make every dead message deliverable again with attempts reset; returns the count."""
        row = await self._fetchone(self._sql["REQUEUE_DEAD"], {"channel": self._channel})
        return int(row[0]) if row else 0

    async def purge(self) -> int:
        """Delete every message (pending, leased and dead); returns how many."""
        row = await self._fetchone(self._sql["PURGE"], None)
        return int(row[0]) if row else 0

    async def drop(self) -> None:
        """Delete the queue, its messages and its counters."""
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)",
                [advisory_key("queue", self._db.schema, self.name)],
            )
            await conn.execute(self._sql["DROP_TABLE"])
            await conn.execute(self._sql["UNREGISTER"], {"queue": self.name})

    # -- plumbing ----------------------------------------------------------------------

    async def _fetchone(
        self,
        query: bytes,
        params: Mapping[str, Any] | None,
        conn: AsyncConnection[Any] | None = None,
    ) -> Any:
        if conn is not None:
            with translate_errors():
                cur = await conn.execute(query, params)
                return await cur.fetchone()
        async with self._db.connection() as own:
            cur = await own.execute(query, params)
            return await cur.fetchone()

    async def _fetchall_shielded(self, query: bytes, params: Mapping[str, Any]) -> list[Any]:
        # The statement takes rows (it deletes or leases them): once started, let it finish
        # even if cancelled, so that what it took reaches the loop that hands it out or
        # puts it back. The pool's own timeout bounds the wait for a connection.
        with anyio.CancelScope(shield=True):
            async with self._db.connection() as conn:
                cur = await conn.execute(query, params)
                rows = await cur.fetchall()
        return rows

    def __repr__(self) -> str:
        return f"PgQueue({self.name!r}, schema={self._db.schema!r})"
