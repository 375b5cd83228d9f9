"""``PgmqQueue[T]``: queues of the pgmq extension (SQS-like), consumed as streams.

pgmq is installed on first use when the database lacks it: ``CREATE EXTENSION pgmq`` if the
server ships the extension, otherwise the SQL-only install bundled with the ``pgmq``
package. Every operation is one statement, sent through psycopg's async driver: pgmq's own SQL
functions, except where a delivery is settled -- there the statement also checks that the
delivery is still current, which pgmq's functions cannot (see ``_pgmq_sql``).

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
"""

from __future__ import annotations

import builtins
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.lowlevel
import psycopg
from psycopg import AsyncConnection, sql

from ..._core.envelope import DeadMessage, Envelope
from ..._core.errors import DatabaseError, InvalidArgumentError, LeaseLostError, PayloadError
from ..._core.source import UNSET, Handed, Retry, Unset, parse_headers
from ..._core.stream import Stream
from ..._core.validate import check_name, check_positive_int, check_seconds, headers_json, to_json
from ..._pg import calls
from ..._pg.database import Database, database_error
from ..._pg.listen import Wakeup
from ..._pg.migrate import advisory_key
from . import sql as S
from .install import ensure_pgmq, pgmq_installed

__all__ = ["PgmqMetrics", "PgmqQueue", "ReadMode"]

T = TypeVar("T")
logger = logging.getLogger("pgstreams.pgmq")

PGMQ_NAME_MAX = 43
"""pgmq allows 47 characters; 4 are kept for the ``_dlq`` suffix."""
DEFAULT_POLL_INTERVAL = 1.0
SETTINGS_TTL = 5.0
"""Seconds a handle trusts its cached max_attempts and notification throttle."""
_REQUEUE_CHUNK = 1000

AckMode = Literal["delete", "archive"]


def _int_at_least(what: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ReadMode:
    """How ``subscribe_ack`` reads: ``ReadMode.standard(vt, qty)`` or ``ReadMode.poll(...)``.

    ``vt`` is the visibility timeout in whole seconds (pgmq's unit), ``qty`` the number of
    messages per read. ``poll`` waits inside the server (``pgmq.read_with_poll``) up to
    ``max_poll_seconds``, re-checking every ``poll_interval_ms``.
    """

    vt: int = 30
    qty: int = 1
    max_poll_seconds: int | None = None
    """None: a standard read; a number: a server-side poll."""
    poll_interval_ms: int = 100

    def __post_init__(self) -> None:
        _int_at_least("vt", self.vt, 1)
        _int_at_least("qty", self.qty, 1)
        if self.max_poll_seconds is not None:
            _int_at_least("max_poll_seconds", self.max_poll_seconds, 1)
        _int_at_least("poll_interval_ms", self.poll_interval_ms, 1)

    @classmethod
    def standard(cls, vt: int = 30, qty: int = 1) -> ReadMode:
        return cls(vt, qty)

    @classmethod
    def poll(
        cls, vt: int = 30, qty: int = 1, max_poll_seconds: int = 5, poll_interval_ms: int = 100
    ) -> ReadMode:
        if max_poll_seconds is None:
            raise InvalidArgumentError("max_poll_seconds must be an integer >= 1, got None")
        return cls(vt, qty, max_poll_seconds, poll_interval_ms)


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


@dataclass(frozen=True, slots=True)
class _Row:
    msg_id: int
    read_ct: int
    enqueued_at: Any
    message: str | None
    headers: str | None


class _Subscription:
    """Settles the envelopes of one ``subscribe_ack`` stream in its ack mode."""

    __slots__ = ("ack_mode", "queue")

    def __init__(self, queue: PgmqQueue[Any], ack_mode: AckMode) -> None:
        self.queue = queue
        self.ack_mode = ack_mode

    async def _ack(self, env: Envelope[Any]) -> bool:
        q = self.queue
        query = q._sql["ACK_ARCHIVE" if self.ack_mode == "archive" else "ACK_DELETE"]
        params = {"id": env.id, "read_ct": env._lease}
        row = await q._fetchone(query, params, allow_none=True)
        return row is not None and bool(row[0])

    async def _nack(self, env: Envelope[Any], delay: float, error: str | None) -> bool:
        params = {"id": env.id, "read_ct": env._lease, "delay": delay, "error": error}
        return (
            await self.queue._fetchone(self.queue._sql["NACK"], params, allow_none=True) is not None
        )

    async def _extend(self, env: Envelope[Any], seconds: float) -> None:
        q = self.queue
        params = {"id": env.id, "read_ct": env._lease, "seconds": seconds}
        if await q._fetchone(q._sql["EXTEND"], params, allow_none=True) is None:
            raise LeaseLostError(f"message {env.id}: read {env.attempts} is no longer current")

    async def release(self, envelopes: Sequence[Envelope[Any]]) -> None:
        envs = [e for e in envelopes if not e.settled]
        if envs:
            params = {"ids": [e.id for e in envs], "read_cts": [e._lease for e in envs]}
            await self.queue._cleanup(self.queue._sql["RELEASE"], params, "release unread")


class PgmqQueue(Generic[T]):
    """A pgmq queue (see module docstring).

    ``await PgmqQueue.create(db, name)`` creates it (installing pgmq if needed);
    ``PgmqQueue(db, name)`` opens an existing queue without touching the database.
    """

    def __init__(self, db: Database, name: str) -> None:
        check_name("pgmq queue", name)
        if len(name) > PGMQ_NAME_MAX:
            raise InvalidArgumentError(
                f"pgmq queue name {name!r} is {len(name)} characters; the limit is"
                f" {PGMQ_NAME_MAX} (pgmq's 47, less room for the '_dlq' suffix)"
            )
        self._db = db
        self.name = name
        self.dead_letter_queue = f"{name}_dlq"
        self._channel = f"pgmq.q_{name}.INSERT"  # what pgmq's insert trigger notifies
        names = {
            "qtable": sql.Identifier("pgmq", f"q_{name}"),
            "atable": sql.Identifier("pgmq", f"a_{name}"),
            "dtable": sql.Identifier("pgmq", f"q_{self.dead_letter_queue}"),
            "registry": sql.Identifier(db.schema, "pgmq_queues"),
        }
        self._sql = calls.render_queries(S, names)
        self._settings: tuple[float, int | None, int | None] | None = None
        """(read at, max_attempts, notify throttle ms or None when notify is off)."""

    # -- creating ----------------------------------------------------------------------

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
            await _require_pg_partman(db)
        await db.ensure_migrated()
        await ensure_pgmq(db)
        async with db.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [advisory_key("pgmq", name)])
            await queue._create_table(conn, name, partitioned=partitioned, unlogged=unlogged)
            if isinstance(max_attempts, int):
                await queue._create_table(conn, queue.dead_letter_queue)
            params = {"queue": name, "max": max_attempts}
            keep = isinstance(max_attempts, Unset)
            await conn.execute(queue._sql["REGISTER_KEEP" if keep else "REGISTER"], params)
        queue._settings = None
        return queue

    async def _create_table(
        self,
        conn: AsyncConnection[Any],
        name: str,
        *,
        partitioned: bool = False,
        unlogged: bool = False,
    ) -> None:
        cur = await conn.execute(
            "SELECT is_partitioned, is_unlogged FROM pgmq.meta WHERE queue_name = %s", [name]
        )
        row = await cur.fetchone()
        if row is not None:
            if (bool(row[0]), bool(row[1])) != (partitioned, unlogged):
                kind = "partitioned" if row[0] else "unlogged" if row[1] else "plain"
                raise InvalidArgumentError(f"pgmq queue {name!r} already exists as a {kind} queue")
            return
        if partitioned:
            await conn.execute("SELECT pgmq.create_partitioned(%s)", [name])
        elif unlogged:
            await conn.execute("SELECT pgmq.create_unlogged(%s)", [name])
        else:
            await conn.execute("SELECT pgmq.create(%s)", [name])

    @classmethod
    async def list(cls, db: Database) -> builtins.list[str]:
        """Names of every pgmq queue in the database (dead-letter queues included)."""
        async with db.connection() as conn:
            if not await pgmq_installed(conn):
                return []
            cur = await conn.execute("SELECT queue_name FROM pgmq.list_queues() ORDER BY 1")
            return [str(r[0]) for r in await cur.fetchall()]

    # -- publishing --------------------------------------------------------------------

    async def publish(
        self,
        value: T,
        *,
        delay: float = 0,
        headers: Mapping[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> int:
        """Send one message; returns its msg_id. With ``conn``, joins its transaction."""
        params = {
            "queue": self.name,
            "msg": to_json("message", value),
            "headers": None if headers is None else headers_json(headers),
            "delay": check_seconds("delay", delay),
        }
        row = await self._fetchone(self._sql["SEND"], params, conn)
        return int(row[0])

    async def publish_batch(
        self,
        values: Iterable[T],
        *,
        delay: float = 0,
        headers: Mapping[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> builtins.list[int]:
        """Send many messages in one statement (all or none); returns their ids in order."""
        batch = builtins.list(values)
        seconds = check_seconds("delay", delay)
        params = {
            "queue": self.name,
            "msgs": _json_array(batch),
            "headers": None if headers is None else headers_json(headers),
            "delay": seconds,
        }
        if not batch:
            return []
        rows = await self._fetchall(self._sql["SEND_BATCH"], params, conn)
        return sorted(int(r[0]) for r in rows)

    # -- notifications -----------------------------------------------------------------

    async def enable_notify(self, throttle_ms: int = 250) -> None:
        """Have pgmq NOTIFY on insert (at most once per ``throttle_ms``) to wake subscribers."""
        _int_at_least("throttle_ms", throttle_ms, 0)
        if throttle_ms > 2**31 - 1:
            raise InvalidArgumentError(f"throttle_ms must fit in an int4, got {throttle_ms}")
        await self._fetchone(
            b"SELECT pgmq.enable_notify_insert(%(queue)s, %(ms)s::integer)",
            {"queue": self.name, "ms": throttle_ms},
        )
        self._settings = None

    async def disable_notify(self) -> None:
        """Stop pgmq's insert notifications; subscribers fall back to polling."""
        await self._fetchone(b"SELECT pgmq.disable_notify_insert(%(queue)s)", {"queue": self.name})
        self._settings = None

    # -- consuming ---------------------------------------------------------------------

    def subscribe(
        self, *, prefetch: int = 1, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> Stream[T]:
        """Stream message values, popping each as it is read (auto-ack, at-most-once).

        Messages read but never delivered when the stream closes go back exactly as they
        were (same msg_id, place in line and headers).
        """
        check_positive_int("prefetch", prefetch)
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        handed = Handed()

        async def putback(values: builtins.list[Any]) -> None:
            await self._give_back_values(handed, values)

        return Stream(lambda: self._pop_loop(prefetch, poll, handed), putback=putback)

    def subscribe_ack(
        self,
        *,
        read_mode: ReadMode | None = None,
        ack_mode: AckMode = "delete",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> Stream[Envelope[T]]:
        """Stream messages under a visibility timeout; settle each envelope.

        ``read_mode`` defaults to ``ReadMode.standard()`` (vt 30 s, one message per read).
        ``ack_mode`` "delete" removes acked messages, "archive" moves them to ``pgmq.a_<name>``.
        Envelopes read ahead but never delivered are handed back as if never read.
        """
        mode = read_mode if read_mode is not None else ReadMode()
        if not isinstance(mode, ReadMode):
            raise InvalidArgumentError("read_mode must be a ReadMode")
        if ack_mode not in ("delete", "archive"):
            raise InvalidArgumentError(f"ack_mode must be 'delete' or 'archive', got {ack_mode!r}")
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        sub = _Subscription(self, ack_mode)
        return Stream(lambda: self._lease_loop(sub, mode, poll), putback=sub.release)

    async def ack_many(self, envelopes: Iterable[Envelope[T]]) -> int:
        """Ack several envelopes in one round trip per ack mode; returns how many were held.

        Raises before touching anything if one of them is already settled or belongs to
        another queue.
        """
        envs = builtins.list(envelopes)
        groups: dict[str, builtins.list[Envelope[T]]] = {}
        for env in envs:
            env._check_unsettled()
            sub = env._queue
            if not isinstance(sub, _Subscription) or sub.queue is not self:
                raise InvalidArgumentError(f"message {env.id} was not read from this queue")
            groups.setdefault(sub.ack_mode, []).append(env)
        held = 0
        for mode, group in groups.items():
            params = {
                "ids": ",".join([str(e.id) for e in group]),
                "read_cts": ",".join([str(e._lease) for e in group]),
            }
            query = self._sql["ACK_MANY_ARCHIVE" if mode == "archive" else "ACK_MANY_DELETE"]
            row = await self._fetchone(query, params)
            for env in group:
                env._settled = True
            held += int(row[0])
        return held

    async def _pop_loop(self, prefetch: int, poll: float, handed: Handed) -> AsyncIterator[T]:
        await self._db.ensure_migrated()
        params = {"queue": self.name, "qty": prefetch}
        retry = Retry(logger, f"pgmq queue {self.name}")
        async with self._db.wakeups(self._channel) as wakeup:
            idle = _Idle()
            while True:
                rows, _ = await self._read_standard(
                    self._sql["POP"], params, wakeup, poll, retry, idle
                )
                rows.sort(key=_msg_id)  # pgmq returns what it took in no set order
                values: builtins.list[Any] = [
                    None if r[1] is None else json.loads(r[1]) for r in rows
                ]
                slots = handed.add(values, rows)
                delivered = 0
                try:
                    for value in values:
                        delivered += 1
                        yield value
                finally:
                    if delivered < len(rows):
                        for i in range(delivered, len(rows)):
                            slots[i] = None
                        await self._unpop(rows[delivered:])

    async def _lease_loop(
        self, sub: _Subscription, mode: ReadMode, poll: float
    ) -> AsyncIterator[Envelope[T]]:
        await self._db.ensure_migrated()
        retry = Retry(logger, f"pgmq queue {self.name}")
        # A server-side poll does not wait for notifications: it registers none.
        channel = self._channel if mode.max_poll_seconds is None else None
        async with self._db.wakeups(channel) as wakeup:
            idle = _Idle()
            while True:
                # Nothing that can be cancelled or fail lies between a read and the try
                # below that hands back what is not delivered: the limit comes with the rows.
                if mode.max_poll_seconds is None:
                    params = {"queue": self.name, "vt": mode.vt, "qty": mode.qty}
                    rows, limit = await self._read_standard(
                        self._sql["READ"], params, wakeup, poll, retry, idle
                    )
                else:
                    rows, limit = await self._read_polling(sub, mode, retry)
                rows.sort(key=_msg_id)
                if limit is not None and any(r[2] > limit for r in rows):
                    await self._dead_letter([r for r in rows if r[2] > limit])
                    rows = [r for r in rows if r[2] <= limit]
                envelopes = [self._envelope(sub, r) for r in rows]
                delivered = 0
                try:
                    for env in envelopes:
                        delivered += 1
                        yield env
                finally:
                    if delivered < len(envelopes):
                        await sub.release(envelopes[delivered:])

    def _envelope(self, sub: _Subscription, row: Sequence[Any]) -> Envelope[T]:
        return Envelope(
            sub,
            id=row[0],
            value=json.loads(row[1]) if row[1] is not None else _none(),
            headers={} if row[4] is None else parse_headers(row[4]),
            attempts=row[2],
            enqueued_at=row[3],
            lease=row[2],
        )

    async def _read_standard(
        self,
        query: bytes,
        params: dict[str, Any],
        wakeup: Wakeup,
        poll: float,
        retry: Retry,
        idle: _Idle,
    ) -> tuple[builtins.list[Any], int | None]:
        """The next rows of a standard read or pop and the queue's max_attempts, sleeping
        while there are none."""
        while True:
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                limit, throttle = await self._current_settings()
                if wakeup.arm():  # notified while busy: a throttle window is open now
                    idle.woken(throttle)
                rows = await self._fetchall_shielded(query, params)
                if rows:
                    retry.reset()
                    return rows, limit
                timeout = idle.timeout(
                    await calls.idle_wait(self._db, self._sql["NEXT_VISIBLE"], poll)
                )
                if await wakeup.wait(timeout):
                    idle.woken(throttle)
            except DatabaseError as exc:
                await retry.after(exc)

    async def _read_polling(
        self, sub: _Subscription, mode: ReadMode, retry: Retry
    ) -> tuple[builtins.list[Any], int | None]:
        """The next rows of ``pgmq.read_with_poll`` (which waits inside the server) and
        the queue's max_attempts."""
        params = {
            "queue": self.name,
            "vt": mode.vt,
            "qty": mode.qty,
            "max_poll": mode.max_poll_seconds,
            "interval_ms": mode.poll_interval_ms,
        }
        while True:
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                limit = (await self._current_settings())[0]
                rows = await self._fetchall_interruptible(sub, self._sql["READ_POLL"], params)
            except DatabaseError as exc:
                await retry.after(exc)
                continue
            retry.reset()
            if rows:
                return rows, limit

    # -- dead letters ------------------------------------------------------------------

    async def _dead_letter(self, rows: Sequence[Sequence[Any]]) -> None:
        """Move deliveries past max_attempts to the DLQ: lock, send, delete in one
        transaction. On failure they stay leased and are tried again when the vt ends."""
        params = {"ids": [r[0] for r in rows], "read_cts": [r[2] for r in rows], "queue": self.name}
        with anyio.CancelScope(shield=True), anyio.move_on_after(calls.CLEANUP_TIMEOUT):
            try:
                async with self._db.connection() as conn, conn.transaction():
                    cur = await conn.execute(self._sql["DEAD_LOCK"], params)
                    locked = await cur.fetchall()
                    if not locked:
                        return
                    await conn.execute(
                        self._sql["DEAD_SEND"],
                        {
                            "dlq": self.dead_letter_queue,
                            "msgs": [r[1] for r in locked],
                            "headers": [r[2] for r in locked],
                        },
                    )
                    await conn.execute(
                        self._sql["DELETE_MANY"],
                        {"queue": self.name, "ids": [r[0] for r in locked]},
                    )
            except DatabaseError as exc:
                logger.error(
                    "pgmq %s: could not move %d messages to %s: %s",
                    self.name,
                    len(rows),
                    self.dead_letter_queue,
                    exc,
                )

    async def dead_letters(self, limit: int = 100) -> builtins.list[DeadMessage]:
        """The oldest ``limit`` messages of the dead-letter queue."""
        check_positive_int("limit", limit)
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql["EXISTS"], {"table": self._dlq_table()})
            row = await cur.fetchone()
            if not (row and row[0]):
                return []
            cur = await conn.execute(self._sql["DEAD_PEEK"], {"limit": limit})
            rows = await cur.fetchall()
        out = []
        for msg_id, message, headers_text, enqueued_at in rows:
            headers = {} if headers_text is None else json.loads(headers_text)
            dead = headers.get("pgstreams_dead") or {}
            out.append(
                DeadMessage(
                    msg_id,
                    None if message is None else json.loads(message),
                    headers,
                    int(dead.get("read_ct", 0)) - 1,
                    enqueued_at,
                    _timestamp(dead.get("dead_at")) or enqueued_at,
                    dead.get("error"),
                )
            )
        return out

    async def requeue_dead(self) -> int:
        """Move every dead-lettered message back to the queue; returns how many.

        Each chunk is popped from the DLQ and sent back in one transaction, so a failure
        loses nothing. Their headers lose the dead-letter record; read counts start over.
        """
        moved = 0
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql["EXISTS"], {"table": self._dlq_table()})
            row = await cur.fetchone()
            if not (row and row[0]):
                return 0
            while True:
                async with conn.transaction():
                    cur = await conn.execute(
                        self._sql["REQUEUE_TAKE"],
                        {"dlq": self.dead_letter_queue, "qty": _REQUEUE_CHUNK},
                    )
                    rows = await cur.fetchall()
                    if not rows:
                        return moved
                    await conn.execute(
                        self._sql["REQUEUE_SEND"],
                        {
                            "queue": self.name,
                            "msgs": [r[1] for r in rows],
                            "headers": [r[4] for r in rows],
                        },
                    )
                moved += len(rows)

    def _dlq_table(self) -> str:
        return f"pgmq.q_{self.dead_letter_queue}"

    # -- administration ----------------------------------------------------------------

    async def metrics(self) -> PgmqMetrics:
        row = await self._fetchone(
            self._sql["METRICS"],
            {"queue": self.name, "dlq": self.dead_letter_queue, "dlq_table": self._dlq_table()},
        )
        length, visible, newest, oldest, total, dead = row
        return PgmqMetrics(int(length), int(visible), newest, oldest, int(total), int(dead))

    async def purge(self) -> int:
        """Delete every message, dead-lettered ones included; returns how many."""
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT pgmq.purge_queue(%s)", [self.name])
            row = await cur.fetchone()
            count = int(row[0]) if row else 0
            cur = await conn.execute(self._sql["EXISTS"], {"table": self._dlq_table()})
            exists = await cur.fetchone()
            if exists and exists[0]:
                cur = await conn.execute("SELECT pgmq.purge_queue(%s)", [self.dead_letter_queue])
                row = await cur.fetchone()
                count += int(row[0]) if row else 0
        return count

    async def drop(self) -> None:
        """Delete the queue, its archive, its dead-letter queue and its settings."""
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", [advisory_key("pgmq", self.name)]
            )
            for name in (self.name, self.dead_letter_queue):
                cur = await conn.execute(
                    "SELECT EXISTS (SELECT FROM pgmq.meta WHERE queue_name = %s)", [name]
                )
                row = await cur.fetchone()
                if row and row[0]:
                    await conn.execute("SELECT pgmq.drop_queue(%s)", [name])
            await conn.execute(self._sql["UNREGISTER"], {"queue": self.name})
        self._settings = None

    # -- plumbing ----------------------------------------------------------------------

    async def _current_settings(self) -> tuple[int | None, int | None]:
        """(max_attempts, notify throttle ms), re-read every SETTINGS_TTL seconds."""
        now = anyio.current_time()
        if self._settings is None or now - self._settings[0] > SETTINGS_TTL:
            # Shielded: cancelling a statement mid-flight would cost the connection.
            with anyio.CancelScope(shield=True):
                row = await self._fetchone(self._sql["SETTINGS"], {"queue": self.name})
            self._settings = (now, row[0], row[1])
        return self._settings[1], self._settings[2]

    async def _unpop(self, rows: Sequence[Sequence[Any]]) -> None:
        params = {
            "ids": [r[0] for r in rows],
            "msgs": [r[1] for r in rows],
            "read_cts": [r[2] for r in rows],
            "enqueued": [r[3] for r in rows],
            "headers": [r[4] for r in rows],
            "vts": [r[5] for r in rows],
            "last_reads": [r[6] for r in rows],
        }
        await self._cleanup(self._sql["UNPOP"], params, "put back unread messages")

    async def _give_back_values(self, handed: Handed, values: builtins.list[Any]) -> None:
        rows, unknown = handed.split(values, f"pgmq {self.name}", logger)
        if rows:
            await self._unpop(rows)
        if unknown:
            params = {
                "queue": self.name,
                "msgs": "[" + ",".join(unknown) + "]",
                "headers": None,
                "delay": 0.0,
            }
            await self._cleanup(self._sql["SEND_BATCH"], params, "send back given-back messages")

    async def _cleanup(self, query: bytes, params: Mapping[str, Any], what: str) -> None:
        await calls.cleanup(
            self._db, query, params, logger=logger, what=f"pgmq {self.name}: {what}"
        )

    async def _fetchone(
        self,
        query: bytes,
        params: Mapping[str, Any] | None,
        conn: AsyncConnection[Any] | None = None,
        *,
        allow_none: bool = False,
    ) -> Any:
        return await calls.fetchone(
            self._db, query, params, conn, allow_none=allow_none, owner=f"pgmq {self.name}"
        )

    async def _fetchall(
        self, query: bytes, params: Mapping[str, Any], conn: AsyncConnection[Any] | None
    ) -> builtins.list[Any]:
        return await calls.fetchall(self._db, query, params, conn)

    async def _fetchall_shielded(
        self, query: bytes, params: Mapping[str, Any]
    ) -> builtins.list[Any]:
        return await calls.fetchall_shielded(self._db, query, params)

    async def _fetchall_interruptible(
        self, sub: _Subscription, query: bytes, params: Mapping[str, Any]
    ) -> builtins.list[Any]:
        """Run a statement that waits inside the server (``read_with_poll``).

        The statement runs in a shielded child task; cancelling the caller asks the server
        to cancel it (again every second until it ends -- a cancel that arrives before the
        statement does is ignored by the server), and whatever it had read by then is handed
        back, so cancellation is prompt and takes nothing. A connection that was sent a
        cancel is closed rather than reused, so a late cancel cannot hit another statement.
        """
        rows: builtins.list[Any] = []
        failure: builtins.list[BaseException] = []
        finished = anyio.Event()
        holder: builtins.list[AsyncConnection[Any]] = []
        interrupted = False

        async def run() -> None:
            with anyio.CancelScope(shield=True):
                try:
                    async with self._db.connection() as conn:
                        holder.append(conn)
                        try:
                            cur = await conn.execute(query, params)
                            rows.extend(await cur.fetchall())
                        finally:
                            if interrupted and not conn.closed:
                                await conn.close()
                except (DatabaseError, psycopg.Error) as exc:
                    failure.append(exc)
                finally:
                    finished.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                try:
                    await finished.wait()
                except anyio.get_cancelled_exc_class():
                    interrupted = True
                    with anyio.CancelScope(shield=True):
                        while not finished.is_set():
                            if holder:
                                try:
                                    await holder[0].cancel_safe(timeout=calls.CLEANUP_TIMEOUT)
                                except Exception as exc:  # still wait for the statement
                                    logger.warning("pgmq %s: cancel failed: %s", self.name, exc)
                            with anyio.move_on_after(1.0):
                                await finished.wait()
                    raise
        except BaseException:
            if rows:  # read, never returned: hand them back
                with anyio.CancelScope(shield=True):
                    await sub.release([self._envelope(sub, r) for r in rows])
            raise
        if failure:
            error = failure[0]
            if isinstance(error, psycopg.Error):
                raise database_error(error) from error
            raise error
        return rows

    def __repr__(self) -> str:
        return f"PgmqQueue({self.name!r})"


async def _require_pg_partman(db: Database) -> None:
    """Refuse a partitioned queue, before anything is written, where pg_partman is missing.

    pgmq's ``create_partitioned`` makes and rotates the partitions with pg_partman; pgmq
    itself would fail only after pgstreams had installed pgmq and its own schema.
    """
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_partman'),"
            " EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_partman')"
        )
        row = await cur.fetchone()
    installed, available = bool(row and row[0]), bool(row and row[1])
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
        f"partitioned=True needs the pg_partman extension (pgmq partitions queues with it); {where}"
    )


def _json_array(values: builtins.list[Any]) -> str:
    """One JSON array of every message (PayloadError names the first bad one)."""
    try:
        return to_json("messages", values)
    except PayloadError:
        for i, value in enumerate(values):
            to_json(f"message {i}", value)
        raise


def _msg_id(row: Sequence[Any]) -> int:
    return int(row[0])


def _none() -> Any:
    return None  # a NULL message (sent by another client)


def _timestamp(text: object) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else None


class _Idle:
    """When an idle subscriber should look again.

    pgmq suppresses insert notifications for ``throttle`` ms after each one, so after a
    wake-up the subscriber looks once more when that window has closed.
    """

    __slots__ = ("_recheck_at",)

    def __init__(self) -> None:
        self._recheck_at: float | None = None

    def woken(self, throttle_ms: int | None) -> None:
        if throttle_ms:
            self._recheck_at = anyio.current_time() + throttle_ms / 1000

    def timeout(self, wait: float) -> float:
        """``wait`` (the poll, or less), shortened to the pending re-check if any."""
        if self._recheck_at is not None:
            left = self._recheck_at - anyio.current_time()
            if left > 0:
                wait = min(wait, max(calls.MIN_IDLE_WAIT, left))
            else:
                self._recheck_at = None
        return wait
