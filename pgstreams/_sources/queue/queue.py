"""``PgQueue[T]``: a queue on a plain table, claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``.

Delivery:

* ``subscribe()`` (auto-ack) leases messages as it reads them and deletes each once the
  next message is asked for or the stream closes (at-least-once, see ``autoack``): a
  consumer that dies or loses its connection first gets nothing deleted, and the message
  comes back when its lease runs out.
* ``subscribe_ack()`` leases messages for ``visibility`` seconds (at-least-once). A lease that
  runs out makes the message visible again by itself -- no janitor process -- and every
  delivery counts an attempt. A message delivered ``max_attempts`` times that is nacked or
  whose lease runs out moves to the dead set with its last error (with either subscription).
* Messages read but never delivered -- read ahead by ``prefetch`` or by an operator such as
  ``buffer`` or ``batch`` when the stream closes -- go back as if never read.
* Publishing wakes idle subscribers with one NOTIFY per statement (PostgreSQL folds
  identical notifications of one transaction into one); polling is the fallback.
* A subscriber outlives connection failures: it backs off and retries, while the shared
  listener reconnects on its own. A failed read took nothing that does not come back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from psycopg import sql

from ..._core import telemetry
from ..._core.envelope import DeadMessage, Envelope
from ..._core.errors import DatabaseError, LeaseLostError
from ..._core.progress import ProgressCallback, Reporter, check_progress
from ..._core.publisher import Publisher, Sending
from ..._core.source import UNSET, HandOut, Retry, Unset, Waiting, channel_for, parse_headers
from ..._core.stream import Stream
from ..._core.validate import check_name, check_positive_int, check_seconds
from ..._pg import calls, queries
from ..._pg.database import Database
from ..._pg.locks import advisory_key
from ..._pg.migrate import QUEUES, migrate_instance
from .autoack import AutoAck

__all__ = ["DeadMessage", "PgQueue", "QueueMetrics"]

T = TypeVar("T")
logger = logging.getLogger("pgstreams.queue")

DEFAULT_POLL_INTERVAL = 5.0
SHARDS = 16
"""Completion counter rows per queue: concurrent consumers rarely update the same one."""
LIMIT_TTL = 5.0
"""Seconds a handle trusts its cached copy of the queue's stored max_attempts."""
REQUEUE_BATCH = 1000
"""Dead messages ``requeue_dead()`` moves per statement (and transaction)."""


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


class PgQueue(calls.SourceCalls, Publisher[T]):
    """A durable queue of JSON messages in one PostgreSQL table (see module docstring).

    ``await PgQueue.create(db, name)`` creates it (or opens it); ``PgQueue(db, name)`` opens
    an existing queue without touching the database.
    """

    _kind = "queue"
    _logger = logger

    def __init__(self, db: Database, name: str) -> None:
        self._db = db
        self.name = check_name("queue", name)
        self._channel = channel_for(db.schema, "queue", name)
        names = {
            "table": sql.Identifier(db.schema, f"q_{name}"),
            "stats": sql.Identifier(db.schema, "queue_stats"),
            "queues": sql.Identifier(db.schema, "queues"),
            "shards": sql.Literal(SHARDS),
        }
        self._limit: tuple[float, int] | None = None  # (read at, max_attempts)
        self._sql = queries.render(queries.load(__package__), names)

    @property
    def msg_id_source(self) -> str:
        """What names this queue in an id unique to a message (the NATS sink's)."""
        return self.name

    @classmethod
    async def create(
        cls, db: Database, name: str, *, max_attempts: int | Unset | None = UNSET
    ) -> PgQueue[Any]:
        """Create the queue if needed (idempotent, safe to race) and return a handle.

        ``max_attempts`` (None = unlimited) is stored with the queue and applies to every
        handle in every process. Leaving it out keeps the stored value (unlimited for a new
        queue).
        """
        if not isinstance(max_attempts, Unset) and max_attempts is not None:
            check_positive_int("max_attempts", max_attempts)
        queue: PgQueue[Any] = cls(db, name)
        await db.ensure_migrated()
        async with db.connection() as conn, conn.transaction():
            key = advisory_key("queue", db.schema, name)
            await conn.execute(queue._sql["lock"], {"key": key})
            await migrate_instance(conn, QUEUES, db.schema, name)  # its table, up to date
            params = {"queue": name, "max": max_attempts}
            keep = isinstance(max_attempts, Unset)
            await conn.execute(queue._sql["register_keep" if keep else "register_set"], params)
            await conn.execute(queue._sql["register_shards"], params)
        queue._limit = None
        return queue

    # -- publishing --------------------------------------------------------------------

    async def _send(self, payload: str, how: Sending) -> int:
        params = {"payload": payload, **self._sending(how)}
        row = await self._fetchone(self._sql["publish"], params, how.conn)
        return int(row[0])

    async def _send_batch(self, payloads: list[str], how: Sending) -> list[int]:
        params = {"payloads": payloads, **self._sending(how)}
        row = await self._fetchone(self._sql["publish_batch"], params, how.conn)
        return list(row[0])

    def _sending(self, how: Sending) -> dict[str, Any]:
        return {"headers": how.headers or "{}", "delay": how.delay, "channel": self._channel}

    # -- consuming ---------------------------------------------------------------------

    def subscribe(
        self,
        *,
        prefetch: int = 1,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        visibility: float = 30,
    ) -> Stream[T]:
        """Stream message values, deleting each once the next is asked for (auto-ack).

        At-least-once: a message is deleted once the next message is asked for or the
        stream closes; until then it is leased for ``visibility`` seconds from its read, and
        a consumer that dies or loses its connection before that gets it redelivered after
        the lease (with ``attempts`` counted, so ``max_attempts`` applies). ``prefetch``
        messages are read per round trip, and the statement that reads the next ones
        deletes them; one whose read's lease runs out before it is handed out goes back
        instead (another consumer may have it). Messages read but never delivered when the
        stream closes -- read ahead by ``prefetch`` or by an operator -- go back with their
        id and headers.
        """
        check_positive_int("prefetch", prefetch)
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        vis = check_seconds("visibility", visibility, allow_zero=False)
        return AutoAck(self, prefetch, vis, poll).stream()

    def subscribe_ack(
        self,
        *,
        visibility: float = 30,
        prefetch: int = 1,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> Stream[Envelope[T]]:
        """Stream leased messages; settle each with ``env.ack()`` / ``env.nack()``.

        A message is leased for ``visibility`` seconds from when it is read. Envelopes read
        but never delivered when the stream closes (read ahead by ``prefetch`` or by an
        operator) are released as if never read. An envelope delivered and never settled
        keeps its lease until it runs out: the library cannot know whether it was processed.
        """
        vis = check_seconds("visibility", visibility, allow_zero=False)
        check_positive_int("prefetch", prefetch)
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        return Stream(lambda: self._lease_loop(vis, prefetch, poll), putback=self._release)

    async def ack_many(self, envelopes: Iterable[Envelope[T]]) -> int:
        """Ack several envelopes in one round trip; returns how many leases were still held.

        Raises before touching anything if one of them is already settled.
        """
        envs = list(envelopes)
        for env in envs:
            env._check_unsettled()
        if not envs:
            return 0
        leases = {env._lease for env in envs}
        ids = [env.id for env in envs]
        if len(leases) == 1:
            params: dict[str, Any] = {"ids": ids, "lease": leases.pop(), "queue": self.name}
            row = await self._fetchone(self._sql["ack_many"], params)
        else:
            params = {"ids": ids, "leases": [e._lease for e in envs], "queue": self.name}
            row = await self._fetchone(self._sql["ack_pairs"], params)
        for env in envs:
            env._settled = True
        held = int(row[0]) if row else 0
        if (tel := telemetry.otel) is not None:
            tel.settled(self._kind, self.name, acked=held)
        return held

    async def _max_attempts(self) -> int:
        """The stored max_attempts (2**31-1 = unlimited), re-read every LIMIT_TTL seconds.

        Reading it from the registry inside every claim would cost a lookup each time;
        a change made by ``create(max_attempts=...)`` reaches running handles this soon.
        """
        now = anyio.current_time()
        if self._limit is None or now - self._limit[0] > LIMIT_TTL:
            row = await self._fetchone(self._sql["limit"], {"queue": self.name}, allow_none=True)
            if row is None:
                raise DatabaseError(f"queue {self.name!r} does not exist; create it first")
            self._limit = (now, int(row[0]))
        return self._limit[1]

    async def _lease_loop(
        self, visibility: float, prefetch: int, poll: float
    ) -> AsyncIterator[Envelope[T]]:
        params: dict[str, Any] = {"n": prefetch, "vis": visibility, "max": 0}
        retry = Retry(logger, f"queue {self.name}")
        logger.info("queue %s: consumer started (manual ack, %g s leases)", self.name, visibility)
        async with self._db.wakeups(self._channel) as wakeup:
            waiting = Waiting(wakeup, poll, retry)
            while True:
                rows = await self._read(self._sql["claim"], params, waiting)
                rows.sort(key=lambda r: r[0])
                envelopes = [self._envelope(row) for row in rows if not row[5]]
                if len(envelopes) < len(rows):
                    dead_letter_warning(self.name, len(rows) - len(envelopes))
                batch = HandOut(envelopes)
                if (tel := telemetry.otel) is not None:
                    read_at = tel.now()
                    tel.settled(self._kind, self.name, dead=len(rows) - len(envelopes))
                try:
                    for env in batch:
                        yield env
                finally:
                    if tel is not None:
                        enqueued = [e.enqueued_at for e in batch.given]
                        tel.delivered(self._kind, self.name, enqueued, read_at)
                    await self._release(batch.rest)

    async def _read(self, query: bytes, params: dict[str, Any], waiting: Waiting) -> list[Any]:
        """Take the next rows, sleeping while there are none and riding out failures."""
        wakeup, retry = waiting.wakeup, waiting.retry
        while True:
            # Outside the shield, so a busy consumer whose callback never awaits can still
            # be cancelled: the deadline fires during the (shielded) read below.
            await anyio.lowlevel.checkpoint_if_cancelled()
            wakeup.arm()
            try:
                if "max" in params:  # a lease: apply the queue's current max_attempts
                    params["max"] = await self._max_attempts()
                rows = await self._fetchall_shielded(query, params)
                if not rows:
                    await wakeup.wait(
                        await calls.idle_wait(self._db, self._sql["next_visible"], waiting.poll)
                    )
                    continue
            except DatabaseError as exc:
                await retry.after(exc)
                continue
            retry.reset()
            return rows

    def _envelope(self, row: Sequence[Any]) -> Envelope[T]:
        return Envelope(
            self,
            id=row[0],
            value=json.loads(row[1]),
            headers=parse_headers(row[2]),
            attempts=row[3],
            enqueued_at=row[4],
            lease=row[6],
        )

    # -- giving back leases read but not delivered --------------------------------------

    async def _release(self, envelopes: Sequence[Envelope[T]]) -> None:
        envs = [e for e in envelopes if not e.settled]
        if not envs:
            return
        params = {
            "ids": [e.id for e in envs],
            "leases": [e._lease for e in envs],
            "channel": self._channel,
        }
        await self._cleanup(self._sql["release"], params, f"release unread leases ({len(envs)})")

    # -- settling (called by Envelope) -------------------------------------------------

    async def _ack(self, env: Envelope[Any]) -> bool:
        params = {"id": env.id, "lease": env._lease, "queue": self.name}
        held = await self._fetchone(self._sql["ack"], params, allow_none=True) is not None
        if held and (tel := telemetry.otel) is not None:
            tel.settled(self._kind, self.name, acked=1)
        return held

    async def _nack(self, env: Envelope[Any], delay: float, error: str | None) -> bool:
        params = {
            "id": env.id,
            "lease": env._lease,
            "delay": delay,
            "error": error,
            "max": await self._max_attempts(),
            "channel": self._channel,
        }
        row = await self._fetchone(self._sql["nack"], params, allow_none=True)
        if row is not None and row[0]:
            dead_letter_warning(self.name, 1)
        if row is not None and (tel := telemetry.otel) is not None:
            tel.settled(self._kind, self.name, nacked=1, dead=int(row[0]))
        return row is not None

    async def _extend(self, env: Envelope[Any], seconds: float) -> None:
        params = {"id": env.id, "lease": env._lease, "seconds": seconds}
        if await self._fetchone(self._sql["extend"], params, allow_none=True) is None:
            raise LeaseLostError(f"message {env.id}: the lease of attempt {env.attempts} is lost")

    # -- administration ----------------------------------------------------------------

    async def metrics(self) -> QueueMetrics:
        """Exact counts at one instant (one consistent snapshot)."""
        row = await self._fetchone(self._sql["metrics"], {"queue": self.name})
        pending, processing, dead, completed = (int(v) for v in row)
        total = pending + processing + dead + completed
        return QueueMetrics(pending, processing, completed, dead, total)

    async def dead_letters(self, limit: int = 100) -> list[DeadMessage]:
        """The oldest ``limit`` messages of the dead set."""
        check_positive_int("limit", limit)
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql["dead"], {"limit": limit})
            rows = await cur.fetchall()
        return [
            DeadMessage(r[0], json.loads(r[1]), parse_headers(r[2]), r[3], r[4], r[5], r[6])
            for r in rows
        ]

    async def requeue_dead(self, *, progress: ProgressCallback | None = None) -> int:
        """Make every dead message deliverable again with attempts reset; returns the count.

        Works in batches of ``REQUEUE_BATCH`` messages, each its own transaction (consumers
        may take a batch's messages while the next is moved), and covers the messages dead
        when the call began. ``progress`` gets a ``Progress`` at the start and after each
        batch; progress is also logged on the ``pgstreams.queue`` logger.
        """
        check_progress(progress)
        report = Reporter("requeue_dead", progress, logger, f"requeue_dead {self.name}", "messages")
        row = await self._fetchone(self._sql["requeue_dead_start"], None)
        await report.start(int(row[0]), self.name)
        params: dict[str, Any] = {
            "cutoff": row[1],
            "after_at": datetime.min.replace(tzinfo=UTC),
            "after_id": 0,
            "n": REQUEUE_BATCH,
            "channel": self._channel,
        }
        while True:
            picked, last_at, last_id, moved, _ = await self._fetchone(
                self._sql["requeue_dead"], params
            )
            if moved:
                await report.advance(int(moved))
            if picked < REQUEUE_BATCH:
                break
            params["after_at"], params["after_id"] = last_at, last_id
        await report.finish()
        return report.done

    async def purge(self) -> int:
        """Delete every message (pending, leased and dead); returns how many."""
        row = await self._fetchone(self._sql["purge"], None)
        logger.info("queue %s: purged %d message(s)", self.name, int(row[0]))
        return int(row[0])

    async def drop(self) -> None:
        """Delete the queue, its messages and its counters."""
        async with self._db.connection() as conn, conn.transaction():
            key = advisory_key("queue", self._db.schema, self.name)
            await conn.execute(self._sql["lock"], {"key": key})
            await conn.execute(self._sql["drop_table"])
            await conn.execute(self._sql["unregister"], {"queue": self.name})
        logger.info("queue %s: dropped", self.name)

    # -- plumbing ----------------------------------------------------------------------

    async def _fetchall_shielded(self, query: bytes, params: Mapping[str, Any]) -> list[Any]:
        return await calls.fetchall_shielded(self._db, query, params)

    def __repr__(self) -> str:
        return f"PgQueue({self.name!r}, schema={self._db.schema!r})"


def dead_letter_warning(queue: str, count: int) -> None:
    """Messages that used up ``max_attempts`` went to the dead set (a WARNING per batch)."""
    logger.warning(
        "queue %s: %d message(s) used up max_attempts and went to the dead set"
        " (`pgstreams queue requeue-dead %s` makes them deliverable again)",
        queue,
        count,
        queue,
    )
