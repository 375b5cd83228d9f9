"""Reading a WAL change stream: pgoutput messages in, ``Change`` objects out.

Order and acknowledgement: pgoutput sends each transaction whole, at its commit, in commit
order. A change is handed out as soon as its message is decoded -- nothing is held per
transaction, so memory does not grow with transaction size. When the downstream asks for
the next item it has finished with the last one; so when the reader gets to a
transaction's Commit, every change of it has been handled, and the transaction's end LSN
is confirmed to the server -- at once for a durable consumer, so a crash redelivers only
the transaction it was in; at least once a second for a live subscription. Statuses also go
out when the server asks, and every 10 s in any case. After a reconnect the server
resends from the last confirmed position: at-least-once, never a gap.

Idle slots: when no transaction is in flight, the position of the server's keepalive (all
it has sent) is confirmed too, so traffic on other tables does not pile up behind the slot;
after ``heartbeat`` seconds without any message, if the server's WAL has moved more than
64 kB past the confirmed position, a tiny non-transactional logical message is written to
make the server move on (a quiet server is left quiet).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg

from ...._core import telemetry
from ...._core.errors import DatabaseError, InvalidArgumentError
from ...._core.lag import LagWatch
from ...._core.progress import ProgressCallback, Reporter
from ...._core.source import Retry
from ...._core.stream import closing_cleanly
from ...._pg.database import Database, database_error
from ..change import Change, committed_id, new_change
from . import pgoutput, replication, slots, snapshot
from .pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    Keepalive,
    LogicalMessage,
    ProtocolError,
    Relation,
    Truncate,
    Update,
    XLogData,
)
from .replication import Session
from .setup import WalTable, WalTarget
from .values import Convert, Types

__all__ = ["NOTIFY_PREFIX", "Deferred", "Reader", "Settings", "Shared"]

logger = logging.getLogger("pgstreams.changes.wal")

NOTIFY_PREFIX = "pgstreams.notify:"
HEARTBEAT_PREFIX = "pgstreams.heartbeat"
_STATUS_EVERY = 1.0
_STATUS_AT_LEAST = 10.0
_READ_SLICE = 1.0
_SLOT_CHECK_EVERY = 60.0
_RELEASE_WAIT = 10.0
_BEHIND = 64 * 1024  # WAL bytes past the confirmed position that call for a heartbeat


@dataclass(frozen=True, slots=True)
class Settings:
    consumer: str | None
    snapshot: bool
    on_slot_lost: str
    heartbeat: float
    warn_retained_bytes: int | None
    chunk_size: int
    progress: ProgressCallback | None = None


class Shared:
    """What a subscription shares with its give-back hook and its checkpoint: whether a
    rewind was asked for, and -- once commits are deferred -- each change handed out and
    not committed yet, with the position that was safe to confirm before its transaction."""

    __slots__ = ("deferred", "handed", "rewound")

    def __init__(self) -> None:
        self.rewound = False
        self.deferred = False
        self.handed: deque[tuple[int, int]] = deque()

    def commit(self, change_id: int) -> None:
        """Every change handed out up to ``change_id`` is finished."""
        handed = self.handed
        while handed and handed[0][0] <= change_id:
            handed.popleft()


class Deferred:
    """The ``Checkpoint`` of a durable WAL consumer's stream (see ``_core.checkpoint``):
    its slot is confirmed up to the last transaction whose changes were all committed."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared

    def defer(self) -> None:
        self._shared.deferred = True

    async def commit(self, item: Any) -> None:
        self._shared.commit(committed_id(item))


@dataclass(frozen=True, slots=True)
class _Rel:
    key: str
    names: tuple[str, ...]
    convert: tuple[Convert, ...]
    keys: tuple[int, ...]
    """Indexes of the replica identity's columns."""
    pk: tuple[int, ...]
    """Indexes of the primary key's columns (the identity's if it has none)."""


_OID = struct.Struct("!I")


def _insert_row(payload: bytes, rel: _Rel) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The new tuple of an Insert message as a row (and its unchanged TOASTed columns)."""
    names, convert = rel.names, rel.convert
    count = (payload[6] << 8) | payload[7]
    if count > len(names):
        raise ProtocolError("an insert with more columns than its relation")
    pos = 8
    row: dict[str, Any] = {}
    unchanged: list[str] = []
    length_at = _OID.unpack_from
    try:
        for i in range(count):
            kind = payload[pos]
            if kind == 116:  # 't'
                (length,) = length_at(payload, pos + 1)
                pos += 5
                row[names[i]] = convert[i](payload[pos : pos + length].decode())
                pos += length
            elif kind == 110:  # 'n'
                row[names[i]] = None
                pos += 1
            elif kind == 117:  # 'u'
                unchanged.append(names[i])
                pos += 1
            else:
                raise ProtocolError(f"unexpected tuple value kind {chr(kind)!r}")
    except (IndexError, struct.error) as exc:
        raise ProtocolError(f"message ends early: {exc}") from None
    if pos > len(payload):
        raise ProtocolError("message ends early")
    return row, tuple(unchanged) if unchanged else ()


def _row(rel: _Rel, values: tuple[Any, ...], unchanged: list[str]) -> dict[str, Any]:
    """A tuple as a dict; unchanged TOASTed values are left out and named in ``unchanged``."""
    if UNCHANGED not in values:
        return {
            name: None if value is None else convert(value)
            for name, convert, value in zip(rel.names, rel.convert, values, strict=False)
        }
    row: dict[str, Any] = {}
    for name, convert, value in zip(rel.names, rel.convert, values, strict=False):
        if value is UNCHANGED:
            unchanged.append(name)
        else:
            row[name] = None if value is None else convert(value)
    return row


def _discard(chunk: snapshot.Chunk, msg: Insert | Update | Delete, rel: _Rel) -> None:
    """Drop the chunk's copy of the row a change is about (by the key's text, as the WAL
    carries it; an update that changed the key drops both)."""
    positions = chunk.positions.get(msg.relation)
    if positions is None:
        try:
            positions = tuple(rel.names.index(c) for c in chunk.table.pk)
        except ValueError:  # a key column is gone: nothing of the chunk can match
            positions = ()
        chunk.positions[msg.relation] = positions
    if not positions:
        return
    if isinstance(msg, Delete):
        tuples: tuple[Any, ...] = (msg.old,)
    elif isinstance(msg, Update):
        tuples = (msg.new, msg.old)
    else:
        tuples = (msg.new,)
    for values in tuples:
        if values is not None:
            chunk.rows.pop(tuple(values[i] for i in positions), None)


class Reader:
    """One subscription's replication session and decoding state (module docstring)."""

    def __init__(
        self,
        db: Database,
        prepare: Callable[[], Awaitable[WalTarget]],
        settings: Settings,
        shared: Shared,
    ) -> None:
        self.db = db
        self.prepare = prepare
        self.target = WalTarget((), (), "", "")
        self.stream_key = ""
        self.settings = settings
        self.shared = shared
        self.live = settings.consumer is None
        self.slot = ""
        self.session: Session | None = None
        self.types = Types()
        self.relations: dict[int, _Rel] = {}
        self.names: dict[tuple[str, str], str] = {}
        self.tx: Begin | None = None
        self.seq = 0
        self.read_at = 0.0
        """When the transaction in hand began to arrive (wall clock), with telemetry on."""
        self.id_base = 0
        """The transaction's commit LSN shifted left 32 bits: a change's id adds its place."""
        self.lsn_text = ""
        self.confirmable = 0
        self.reported = 0
        self.last_status = 0.0
        self.last_message = time.monotonic()
        self.last_slot_check = 0.0
        self.retry = Retry(logger, "WAL changes")
        self.lag = LagWatch(logger, "WAL changes")
        self.tx_safe = 0
        """Deferred commits: the confirmable position when the open transaction began."""
        self.progress: snapshot.Progress | None = None
        self.chunk: snapshot.Chunk | None = None
        self.report: Reporter | None = None
        """The running snapshot's progress reports."""
        self.notify_prefix = ""
        self.wm_prefix = ""
        self.by_oid: dict[int, WalTable] = {}
        self.output: dict[str, str] | None = None
        """The replication session's output settings, which snapshot reads copy."""

    # -- the stream --------------------------------------------------------------------

    async def changes(self) -> AsyncGenerator[Change[Any], None]:
        deferred, handed = self.shared.deferred, self.shared.handed
        try:
            await self._start(await self.prepare())
            while True:
                xlog = await self._next()
                payload = xlog.payload
                kind = payload[0]
                if kind == 73 and self.chunk is None:  # 'I', the hot path
                    change = self._insert(payload)
                    if change is not None:
                        if deferred:
                            handed.append((change.id, self.tx_safe))
                        yield change
                    continue
                if kind == 67:  # 'C': every change of the transaction was handled
                    if self.seq and (tel := telemetry.otel) is not None:
                        self._count(tel)
                    self.tx = None
                    self.confirmable = max(self.confirmable, pgoutput.commit_end(payload))
                    if not self.live or time.monotonic() - self.last_status >= _STATUS_EVERY:
                        await self._status()
                    continue
                msg = pgoutput.decode(payload)
                if isinstance(msg, Insert | Update | Delete):
                    change = self._change(msg)
                    if change is not None:
                        if deferred:
                            handed.append((change.id, self.tx_safe))
                        yield change
                elif isinstance(msg, Begin):
                    self.lag.check(msg.commit_time)
                    self.tx_safe = self.confirmable  # where a restart would resend it from
                    if (tel := telemetry.otel) is not None:
                        if self.seq:  # changes of a transaction a lost session cut short
                            self._count(tel)
                        self.read_at = tel.now()
                    self.tx, self.seq = msg, 0
                    self.id_base = msg.final_lsn << 32
                    self.lsn_text = pgoutput.format_lsn(msg.final_lsn)
                elif isinstance(msg, Relation):
                    await self._relation(msg)
                elif isinstance(msg, Truncate):
                    for change in self._truncates(msg):
                        if deferred:
                            handed.append((change.id, self.tx_safe))
                        yield change
                elif isinstance(msg, LogicalMessage):
                    for change in self._message(xlog, msg):
                        if deferred:
                            safe = self.tx_safe if self.tx is not None else self.confirmable
                            handed.append((change.id, safe))
                        yield change
                    if self.chunk is not None and self.chunk.delivered:
                        await self._chunk_done(self.chunk)  # its rows were all handled
        finally:
            if self.seq and (tel := telemetry.otel) is not None:
                self._count(tel)
            await self._close(closing_cleanly())

    def _count(self, tel: telemetry.Telemetry) -> None:
        """Telemetry for the changes handed out since the last count (``seq`` of them, all
        of one transaction): counted at its Commit, or when the stream closes or a new
        transaction begins before that."""
        committed = None if self.tx is None else self.tx.commit_time
        tel.transaction("wal", self.stream_key, self.seq, committed, self.read_at)
        self.seq = 0

    def _insert(self, payload: bytes) -> Change[Any] | None:
        """An insert decoded straight into its row (no intermediate tuple)."""
        rel = self.relations.get(_OID.unpack_from(payload, 1)[0])
        tx = self.tx
        if rel is None or tx is None:
            return None
        if payload[5] != 78:  # 'N'
            raise ProtocolError("insert without a new tuple")
        row, unchanged = _insert_row(payload, rel)
        self.seq += 1
        names = rel.names
        return new_change(
            self.id_base | self.seq,
            "insert",
            rel.key,
            row,
            None,
            tx.commit_time,
            tx.xid,
            {names[i]: row.get(names[i]) for i in rel.pk} if rel.pk else None,
            self.lsn_text,
            unchanged,
        )

    def _change(self, msg: Insert | Update | Delete) -> Change[Any] | None:
        rel = self.relations.get(msg.relation)
        tx = self.tx
        if rel is None or tx is None:
            return None
        self.seq += 1
        unchanged: list[str] = []
        old: dict[str, Any] | None
        if isinstance(msg, Insert):
            op, new, old = "insert", _row(rel, msg.new, unchanged), None
            pk_from: dict[str, Any] = new
        elif isinstance(msg, Update):
            op, new = "update", _row(rel, msg.new, unchanged)
            if msg.old_kind == "O":
                old = _row(rel, msg.old or (), [])
            elif msg.old_kind == "K":
                old = self._key(rel, msg.old or ())
            else:
                old = {rel.names[i]: new[rel.names[i]] for i in rel.keys if rel.names[i] in new}
                old = old or None
            pk_from = new
        else:
            op, new = "delete", None
            old = _row(rel, msg.old, []) if msg.old_kind == "O" else self._key(rel, msg.old)
            pk_from = old
        names = rel.names
        pk = {names[i]: pk_from.get(names[i]) for i in rel.pk} if rel.pk else None
        chunk = self.chunk
        # A change in the chunk's window, or by a transaction its select saw running, is
        # newer than the chunk's copy of the row.
        if (
            chunk is not None
            and chunk.table.key == rel.key
            and (chunk.window or tx.xid in chunk.unseen)
        ):
            _discard(chunk, msg, rel)
        return new_change(
            self.id_base | self.seq,
            op,
            rel.key,
            new,
            old,
            tx.commit_time,
            tx.xid,
            pk,
            self.lsn_text,
            tuple(unchanged) if unchanged else (),
        )

    @staticmethod
    def _key(rel: _Rel, values: tuple[Any, ...]) -> dict[str, Any]:
        return {
            rel.names[i]: (None if values[i] is None else rel.convert[i](values[i]))
            for i in rel.keys
            if i < len(values) and values[i] is not UNCHANGED
        }

    def _truncates(self, msg: Truncate) -> list[Change[Any]]:
        tx = self.tx
        out: list[Change[Any]] = []
        if tx is None:
            return out
        for oid in msg.relations:
            rel = self.relations.get(oid)
            if rel is None:
                continue
            self.seq += 1
            chunk = self.chunk
            if (
                chunk is not None
                and chunk.table.key == rel.key
                and (chunk.window or tx.xid in chunk.unseen)
            ):
                chunk.rows.clear()
            out.append(
                Change(
                    id=self.id_base | self.seq,
                    op="truncate",
                    table=rel.key,
                    new=None,
                    old=None,
                    at=tx.commit_time,
                    txid=tx.xid,
                    lsn=self.lsn_text,
                )
            )
        return out

    def _message(self, xlog: XLogData, msg: LogicalMessage) -> list[Change[Any]]:
        """A notify, or the rows of a snapshot chunk at its high watermark."""
        tx = self.tx
        if not msg.transactional or tx is None:
            if tx is None:  # a heartbeat or anyone's message between transactions
                self.confirmable = max(self.confirmable, xlog.start)
            return []
        if msg.prefix == self.notify_prefix:
            self.seq += 1
            notify: Change[Any] = Change(
                id=self.id_base | self.seq,
                op="notify",
                table=self.stream_key,
                new=json.loads(msg.content),
                old=None,
                at=tx.commit_time,
                txid=tx.xid,
                lsn=self.lsn_text,
            )
            return [notify]
        chunk = self.chunk
        if msg.prefix == self.wm_prefix and chunk is not None:
            kind, _, token = msg.content.decode().partition(":")
            if token == chunk.token and kind == "low":
                chunk.window = True
            elif token == chunk.token and kind == "high" and chunk.window:
                chunk.delivered = True
                return self._snapshot_rows(tx, chunk)
        return []

    def _snapshot_rows(self, tx: Begin, chunk: snapshot.Chunk) -> list[Change[Any]]:
        out = []
        for row in chunk.rows.values():
            self.seq += 1
            out.append(
                Change(
                    id=self.id_base | self.seq,
                    op="snapshot",
                    table=chunk.table.key,
                    new=row,
                    old=None,
                    at=tx.commit_time,
                    txid=tx.xid,
                    pk={c: row.get(c) for c in chunk.table.pk},
                    lsn=self.lsn_text,
                )
            )
        return out

    # -- snapshot chunks ---------------------------------------------------------------

    async def _next_chunk(self) -> None:
        """Read the next chunk between two watermarks, or finish the snapshot."""
        progress, output = self.progress, self.output
        assert progress is not None and output is not None
        by_key = {t.key: t for t in self.target.tables}
        async with self.db.connection() as conn:
            while progress.index < len(progress.tables):
                table = by_key.get(progress.tables[progress.index])
                if table is not None:
                    token = snapshot.new_token()
                    await snapshot.emit(conn, self.slot, f"low:{token}")
                    chunk = await snapshot.read_chunk(
                        conn,
                        table,
                        progress.after,
                        self.settings.chunk_size,
                        token,
                        output,
                        self.types,
                    )
                    await snapshot.emit(conn, self.slot, f"high:{token}")
                    if chunk.rows:
                        self.chunk = chunk
                        return
                progress.index, progress.after = progress.index + 1, None
                await snapshot.save(conn, self.db.schema, self.slot, progress)
            await snapshot.finish(conn, self.db.schema, self.slot)
        self.progress = None

    async def _chunk_done(self, chunk: snapshot.Chunk) -> None:
        """Every row of ``chunk`` was handled: save where the next chunk starts."""
        progress = self.progress
        assert progress is not None
        if chunk.full:
            progress.after = chunk.last
        else:
            progress.index, progress.after = progress.index + 1, None
        await self._retrying(lambda: self._save(progress))
        self.chunk = None
        if self.report is not None:
            await self.report.advance(chunk.read, chunk.table.key)

    async def _start_report(self, progress: snapshot.Progress) -> None:
        """Begin reporting a snapshot (or its remainder, when it resumes): the tables
        still to read, and their estimated rows."""
        self.report = Reporter(
            "snapshot", self.settings.progress, logger, f"snapshot {self.slot}", "rows"
        )
        by_key = {t.key: t for t in self.target.tables}
        tables = [by_key[k] for k in progress.tables[progress.index :] if k in by_key]
        try:
            async with self.db.connection() as conn:
                total = await snapshot.estimate(conn, tables)
        except DatabaseError as exc:  # only an estimate: the snapshot goes on without it
            logger.debug("estimating the snapshot of %s: %s", self.slot, exc)
            total = None
        await self.report.start(total, tables[0].key if tables else "")

    async def _save(self, progress: snapshot.Progress) -> None:
        async with self.db.connection() as conn:
            await snapshot.save(conn, self.db.schema, self.slot, progress)

    async def _retrying(self, work: Callable[[], Awaitable[None]]) -> None:
        """``work()`` until it gets through, backing off from connection failures."""
        while True:
            try:
                await work()
            except DatabaseError as exc:
                await self.retry.after(exc)
            else:
                self.retry.reset()
                return

    # -- relations ---------------------------------------------------------------------

    async def _relation(self, rel: Relation) -> None:
        oids = [c.type_oid for c in rel.columns]
        if self.names.get((rel.schema, rel.name)) is None or not self.types.knows(oids):
            await self._retrying(lambda: self._learn(rel, oids))
        names = tuple(c.name for c in rel.columns)
        identity = tuple(i for i, c in enumerate(rel.columns) if c.key)
        table = self.by_oid.get(rel.oid)
        pk = identity
        if table is not None and table.pk and all(c in names for c in table.pk):
            pk = tuple(names.index(c) for c in table.pk)
        self.relations[rel.oid] = _Rel(
            self.names[(rel.schema, rel.name)],
            names,
            tuple(self.types.converter(o) for o in oids),
            identity,
            pk,
        )
        if self.chunk is not None:
            self.chunk.positions.pop(rel.oid, None)  # the table's shape may have changed

    async def _learn(self, rel: Relation, oids: list[int]) -> None:
        """Look up the relation's types and its quoted name."""
        async with self.db.connection() as conn:
            await self.types.learn(conn, oids)
            if (rel.schema, rel.name) not in self.names:
                cur = await conn.execute(
                    "SELECT format('%%I.%%I', %s::text, %s::text)", [rel.schema, rel.name]
                )
                row = await cur.fetchone()
                key = str(row[0]) if row else f"{rel.schema}.{rel.name}"
                self.names[(rel.schema, rel.name)] = key

    # -- the session -------------------------------------------------------------------

    async def _start(self, target: WalTarget) -> None:
        self.target = target
        self.stream_key = ", ".join(t.key for t in target.tables)
        self.names = {(t.schema, t.name): t.key for t in target.tables}
        self.by_oid = {t.oid: t for t in target.tables}
        self.retry = Retry(logger, f"WAL changes of {self.stream_key}")
        self.lag = LagWatch(logger, f"WAL changes of {self.stream_key}")
        self.notify_prefix = NOTIFY_PREFIX + target.publication
        await self._open()

    async def _open(self) -> None:
        """Find or create the slot (and start a snapshot if one is due)."""
        consumer = self.settings.consumer
        async with self.db.connection() as conn:
            if consumer is None:
                await slots.drop_stale_live(conn, self.target)
                self.slot = slots.live_name(self.target)
                self.confirmable = await slots.create(conn, self.slot)
            else:
                self.slot = self.target.slot(consumer)
                found = await slots.state(conn, self.slot)
                if found is None:
                    # Progress first: a crash between the two leaves a snapshot to do
                    # (or, without one, no stale progress behind).
                    if self.settings.snapshot:
                        self.progress = await snapshot.begin(
                            conn, self.db.schema, self.slot, self.target
                        )
                    else:
                        await snapshot.finish(conn, self.db.schema, self.slot)
                    self.confirmable = await slots.create(conn, self.slot)
                else:
                    self.progress = await snapshot.load(conn, self.db.schema, self.slot)
        if self.progress is not None and self.shared.deferred:
            # Snapshot progress is saved as rows are handed out: read-ahead would lose rows.
            raise InvalidArgumentError(
                f"consumer {consumer!r} has an unfinished snapshot, which an operator that"
                " reads ahead (psn.publish) would lose on a crash: subscribe with"
                " snapshot=True to finish it (then it goes one change at a time)"
            )
        self.wm_prefix = snapshot.WATERMARK_PREFIX + self.slot
        logger.info("WAL changes of %s: reading slot %s", self.stream_key, self.slot)

    async def _next(self) -> XLogData:
        """The next pgoutput message, answering keepalives, reporting status, writing
        heartbeats and reconnecting on the way."""
        while True:
            session = self.session
            if session is None:
                await self._connect()
                continue
            if self.progress is not None and self.chunk is None:
                # A snapshot is due: start its next chunk.
                if self.report is None:
                    await self._start_report(self.progress)
                await self._retrying(self._next_chunk)
                if self.progress is None and self.report is not None:
                    await self.report.finish()
                    self.report = None
                continue
            try:
                raw = session.poll()
                if raw is None:
                    if self._reportable() > self.reported:
                        await self._status()
                    raw = await session.read(_READ_SLICE)
            except (psycopg.Error, OSError) as exc:
                await self._lost(exc)
                continue
            if raw is None:
                await self._idle()
                continue
            self.last_message = now = time.monotonic()
            await self._check_retained(now)
            if type(raw) is XLogData:
                return raw
            assert isinstance(raw, Keepalive)
            if self.tx is None:
                self.confirmable = max(self.confirmable, raw.end)
            if raw.reply:
                await self._status()

    async def _idle(self) -> None:
        now = time.monotonic()
        if self._reportable() > self.reported or now - self.last_status >= _STATUS_AT_LEAST:
            await self._status()
        if self.tx is None and now - self.last_message >= self.settings.heartbeat:
            self.last_message = now
            try:
                async with self.db.connection() as conn:
                    await conn.execute(  # only if the slot is behind: a quiet server stays so
                        "SELECT pg_catalog.pg_logical_emit_message(false, %s, '')"
                        " WHERE pg_catalog.pg_current_wal_lsn() - %s::pg_lsn > %s",
                        [HEARTBEAT_PREFIX, pgoutput.format_lsn(self.confirmable), _BEHIND],
                    )
            except DatabaseError as exc:
                logger.warning("WAL heartbeat for %s failed: %s", self.slot, exc)
        await self._check_retained(now)

    async def _check_retained(self, now: float) -> None:
        """Once a minute: warn if the slot retains more WAL than allowed."""
        limit = self.settings.warn_retained_bytes
        if limit is None or now - self.last_slot_check < _SLOT_CHECK_EVERY:
            return
        self.last_slot_check = now
        try:
            async with self.db.connection() as conn:
                cur = await conn.execute(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, wal_status"
                    " FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
                    [self.slot],
                )
                row = await cur.fetchone()
        except DatabaseError:
            return
        if row is not None and row[0] is not None and int(row[0]) > limit:
            logger.warning(
                "replication slot %s retains %d MB of WAL (wal_status %s): its consumer is"
                " behind; the server keeps WAL for it until it catches up or"
                " max_slot_wal_keep_size invalidates it",
                self.slot,
                int(row[0]) // (1024 * 1024),
                row[1],
            )

    def _reportable(self) -> int:
        """The position to confirm: ``confirmable``, held back -- with deferred commits --
        to before the transaction of the oldest change handed out and not committed."""
        handed = self.shared.handed
        if handed:
            return min(self.confirmable, handed[0][1])
        return self.confirmable

    async def _status(self) -> None:
        """Report the confirmable position; a failure to send is a lost session (the next
        read reconnects from the last position the server has)."""
        session = self.session
        if session is None:
            return
        position = self._reportable()
        try:
            await session.send_status(position, position)
        except (psycopg.Error, OSError) as exc:
            await self._lost(exc)
            return
        self.reported = position
        self.last_status = time.monotonic()

    async def _connect(self) -> None:
        try:
            async with self.db.connection() as conn:
                found = await slots.state(conn, self.slot)
            if found is None:
                await self._slot_lost("it no longer exists")
                return
            if found[0] == "lost":
                await self._slot_lost("invalidated: the WAL it needed was removed")
                return
            self.confirmable = max(self.confirmable, found[1])
            conn_ = await self.db.dedicated(
                replication="database",
                application_name=f"pgstreams wal {self.slot}"[:63],
                options=replication.OPTIONS,
            )
            session = Session(conn_)
            try:
                if self.output is None:
                    self.output = await session.output_settings()
                await session.start(self.slot, self.confirmable, self.target.publication)
            except BaseException:
                await session.close()
                raise
        except (psycopg.Error, OSError, DatabaseError) as exc:
            await self._lost(exc)
            return
        self.session, self.tx = session, None
        self.reported = self.confirmable
        self.last_status = self.last_message = time.monotonic()
        self.retry.reset()
        await self._check_retained(self.last_status)

    async def _lost(self, exc: BaseException) -> None:
        """A session failed: reconnect after a back-off if it may work next time."""
        session, self.session = self.session, None
        self.tx = None
        if session is not None:
            await session.close()
        if isinstance(exc, psycopg.Error) and _invalidated(exc):
            await self._slot_lost("invalidated: the WAL it needed was removed")
            return
        if isinstance(exc, DatabaseError):
            error = exc
        elif isinstance(exc, psycopg.Error):
            error = database_error(exc)
            if exc.sqlstate in _RETRY_STATES:
                error.transient = True
        else:
            error = DatabaseError(str(exc), transient=True)
        await self.retry.after(error)

    async def _slot_lost(self, reason: str) -> None:
        if self.live or self.settings.on_slot_lost != "resnapshot":
            raise slots.SlotLostError(self.slot, reason)
        logger.warning(
            "replication slot %s is lost (%s): recreating it and re-reading current rows",
            self.slot,
            reason,
        )
        await self._retrying(self._recreate)
        self.chunk = None
        self.report = None  # a new snapshot: reported afresh

    async def _recreate(self) -> None:
        """Drop the lost slot (once its last session let go), then make it anew with a
        snapshot to do."""
        with anyio.fail_after(_RELEASE_WAIT):
            await self._drop_slot()
        async with self.db.connection() as conn:
            self.progress = await snapshot.begin(conn, self.db.schema, self.slot, self.target)
            self.confirmable = await slots.create(conn, self.slot)

    async def _close(self, clean: bool) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_RELEASE_WAIT):
            session, self.session = self.session, None
            if session is not None:
                try:
                    if clean and not self.shared.rewound and not self.shared.deferred:
                        self._finish_buffered(session)
                    position = self._reportable()
                    if position > self.reported:
                        await session.send_status(position, position)
                except Exception as exc:  # the session is going anyway: close it regardless
                    logger.debug("closing WAL session of %s: %s", self.slot, exc)
                await session.close()
            if self.live and self.slot:
                try:
                    await self._drop_slot()
                except DatabaseError as exc:
                    logger.warning("dropping replication slot %s: %s", self.slot, exc)
            elif session is not None:
                await self._released(session.pid)

    def _finish_buffered(self, session: Session) -> None:
        """At a clean close the last change handed out was handled: if its Commit has
        arrived already, its transaction can be confirmed."""
        while True:
            raw = session.poll()
            if raw is None:
                return
            if isinstance(raw, Keepalive):
                if self.tx is None:
                    self.confirmable = max(self.confirmable, raw.end)
                continue
            msg = pgoutput.decode(raw.payload)
            if isinstance(msg, Commit):
                self.tx = None
                self.confirmable = max(self.confirmable, msg.end_lsn)
            elif not isinstance(msg, Relation):
                return

    async def _released(self, pid: int) -> None:
        """Wait until the server has let go of the slot, so that the stream's close means
        the consumer can be dropped or resumed elsewhere at once."""
        while True:
            try:
                async with self.db.connection() as conn:
                    cur = await conn.execute(
                        "SELECT 1 FROM pg_catalog.pg_replication_slots"
                        " WHERE slot_name = %s AND active_pid = %s",
                        [self.slot, pid],
                    )
                    if await cur.fetchone() is None:
                        return
            except DatabaseError:
                return
            await anyio.sleep(0.01)

    async def _drop_slot(self) -> None:
        """Drop the slot, waiting for the server to release it."""
        while True:
            async with self.db.connection() as conn:
                if await slots.drop(conn, self.slot):
                    return
            await anyio.sleep(0.05)


# object_in_use: the slot is still held by a walsender that is being terminated.
_RETRY_STATES = frozenset({"55006"})


def _invalidated(exc: psycopg.Error) -> bool:
    diag = exc.diag
    text = " ".join(filter(None, [str(exc), diag.message_detail or ""]))
    return exc.sqlstate == "55000" and "invalidated" in text
