"""``PgChangeStream[T]``: the inserts, updates and deletes of a table as a stream.

Capture: statement-level AFTER triggers copy each statement's rows (from its transition
tables) into the change log in one ``INSERT ... SELECT``, tagged with the writing
transaction's id (``xid8``), and send one tiny NOTIFY (no row data) per statement.

Delivery never loses a change. A change's id is assigned before its transaction commits,
so a reader that remembers "the last id I saw" skips changes whose transaction commits
late. A reader here goes in rounds: each delivers, in id order, the changes of the
transactions that committed between the previous round's snapshot and this one's. A
transaction's changes become visible all at once, at commit, so none can appear behind a
finished round; and a later change of a row is made after the earlier one's transaction
committed, so it comes in the same round with a later id, or in a later round -- changes of
one row come out in the order they were made. A long-running transaction holds up nothing
but its own changes.

Subscribers wake on the NOTIFY and also poll, so a lost notification costs latency only.
A durable consumer (``subscribe(consumer=...)``) stores its position in PostgreSQL after
each item the downstream has finished with -- when it asks for the next one, or when the
stream closes cleanly -- and resumes from there: at-least-once across crashes, duplicates
only of items not finished.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.lowlevel
import psycopg
from psycopg import AsyncConnection, sql

from ..._core.errors import DatabaseError, InvalidArgumentError
from ..._core.source import Retry, channel_for
from ..._core.stream import Stream, closing_cleanly
from ..._core.validate import check_positive_int, check_seconds, to_json
from ..._pg import calls
from ..._pg.database import Database
from ..._pg.listen import Wakeup
from ..._pg.migrate import advisory_key
from . import sql as C

__all__ = ["Change", "ChangeLag", "PgChangeStream"]

T = TypeVar("T")
logger = logging.getLogger("pgstreams.changes")

Operation = Literal["insert", "update", "delete"]
NotifyMode = Literal["statement", "off"]
OPERATIONS: tuple[Operation, ...] = ("insert", "update", "delete")
DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_PAGE = 500
_EPOCH = datetime(1, 1, 1, tzinfo=UTC)

CaptureMode = Literal["statement", "row"]

_STATEMENT_EVENTS = {
    "insert": sql.SQL("AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows"),
    "update": sql.SQL(
        "AFTER UPDATE ON {table} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    ),
    "delete": sql.SQL("AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows"),
}


def _text_array(items: Sequence[str]) -> str:
    """A text[] literal (trigger arguments can only be string constants)."""
    quoted = ('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
    return "{" + ",".join(quoted) + "}"


@dataclass(frozen=True, slots=True)
class Change(Generic[T]):
    """One captured change (or a ``notify`` event) of a stream."""

    id: int
    op: str
    """"insert", "update", "delete" or "notify"."""
    table: str
    """The table, schema-qualified and quoted as PostgreSQL would (``public."Users"``)."""
    new: T | None
    """The row after the change (insert, update) or the payload of a notify."""
    old: T | None
    """The row before the change (update, delete)."""
    at: datetime
    """When the statement that made the change started."""
    txid: int
    """The id of the transaction that made it."""
    pk: Mapping[str, Any] | None = field(default=None, compare=False)
    """The row's primary key (None for a notify or a table without one)."""


@dataclass(frozen=True, slots=True)
class ChangeLag:
    changes: int
    """Changes committed that the consumer has not finished with."""
    seconds: float
    """Age of the oldest of them (0 when there are none)."""


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """A pg_snapshot: every transaction below xmin had ended, none from xmax on had, and
    those in ``xip`` were in progress."""

    text: str
    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> _Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(text, int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def sees(self, txid: int) -> bool:
        """Whether a transaction that committed is visible in this snapshot."""
        return txid < self.xmin or (txid < self.xmax and txid not in self.xip)


_NOTHING = _Snapshot("0:0:", 0, 0, frozenset())
"""A snapshot that sees nothing: a replay's first round takes every visible change."""


@dataclass(slots=True)
class _Cursor:
    prev: _Snapshot
    cur: _Snapshot
    """The round delivers changes visible in ``cur`` and not in ``prev``, in id order."""
    after: int
    """The last id delivered in this round."""
    top: int
    """The highest id in this round."""
    exhausted: bool
    """True once the round has been read to its end."""

    def in_round(self, txid: int) -> bool:
        return self.cur.sees(txid) and not self.prev.sees(txid)


class _Progress:
    """What a durable consumer's stream shares with its give-back hook: the position just
    before each recently delivered change, and whether a rewind was stored."""

    __slots__ = ("_before", "rewound")

    _KEEP = 4096

    def __init__(self) -> None:
        self._before: dict[int, tuple[str, str, int, int]] = {}
        self.rewound = False

    def remember(self, change_id: int, position: tuple[str, str, int, int]) -> None:
        prev, cur, _, top = position
        self._before[change_id] = (prev, cur, change_id - 1, top)
        if len(self._before) > self._KEEP:
            del self._before[next(iter(self._before))]

    def before(self, change_id: int) -> tuple[str, str, int, int] | None:
        return self._before.get(change_id)


@dataclass(frozen=True, slots=True)
class _Table:
    oid: int
    schema: str
    name: str
    key: str
    kind: str
    """pg_class.relkind: "r" a table, "p" a partitioned table."""
    has_children: bool
    """Partitions or inheritance children, which can be written directly."""


class PgChangeStream(Generic[T]):
    """Changes of one table (see module docstring).

    ``table`` is a name as SQL would write it -- ``"users"``, ``"app.users"``,
    ``'"Mixed"."Case"'`` (unquoted parts are folded to lower case) -- or an exact
    ``(schema, name)`` pair. Constructing it touches nothing; ``install_trigger()`` starts
    capturing.
    """

    def __init__(
        self,
        db: Database,
        table: str | tuple[str, str],
        *,
        operations: Sequence[Operation] = OPERATIONS,
        columns: Sequence[str] | None = None,
        notify: NotifyMode = "statement",
        capture: CaptureMode = "statement",
        retention: timedelta | None = None,
    ) -> None:
        self._db = db
        self._table_arg = _check_table(table)
        self.operations = _check_operations(operations)
        self.columns = _check_columns(columns)
        if notify not in ("statement", "off"):
            raise InvalidArgumentError(f"notify must be 'statement' or 'off', got {notify!r}")
        self.notify_mode: NotifyMode = notify
        if capture not in ("statement", "row"):
            raise InvalidArgumentError(f"capture must be 'statement' or 'row', got {capture!r}")
        self.capture_mode: CaptureMode = capture
        if retention is not None and (
            not isinstance(retention, timedelta) or retention <= timedelta(0)
        ):
            raise InvalidArgumentError(f"retention must be a positive timedelta, got {retention!r}")
        self.retention = retention
        names = {
            "changes": sql.Identifier(db.schema, "changes"),
            "captures": sql.Identifier(db.schema, "change_captures"),
            "consumers": sql.Identifier(db.schema, "change_consumers"),
        }
        self._sql = calls.render_queries(C, names)
        self._key: str | None = None

    # -- capture -----------------------------------------------------------------------

    async def install_trigger(self) -> None:
        """Start capturing (idempotent: re-installing applies the current settings).

        Raises InvalidArgumentError, before anything is installed, for a table that does
        not exist or is not a table, or for ``columns`` it does not have.
        """
        await self._db.ensure_migrated()
        async with self._db.connection() as conn, conn.transaction():
            table = await self._resolve(conn, required=True)
            assert table is not None
            if table.schema == self._db.schema:
                raise InvalidArgumentError(
                    f"{table.key} belongs to pgstreams itself and cannot be captured"
                )
            if table.kind == "p" and self.capture_mode == "statement":
                # Statement triggers on a partitioned table do not fire for statements that
                # write a partition directly; row triggers are cloned to every partition.
                raise InvalidArgumentError(f'{table.key} is partitioned: use capture="row"')
            if table.kind == "r" and table.has_children:
                # Inheritance children get no triggers from their parent at all.
                raise InvalidArgumentError(
                    f"{table.key} has inheritance children, whose writes its triggers would"
                    " miss: capture each table of the hierarchy on its own"
                )
            cur = await conn.execute(self._sql["COLUMNS"], {"oid": table.oid})
            existing = {str(r[0]) for r in await cur.fetchall()}
            missing = [c for c in self.columns or () if c not in existing]
            if missing:
                raise InvalidArgumentError(f"table {table.key} has no column(s) {missing}")
            cur = await conn.execute(self._sql["PRIMARY_KEY"], {"oid": table.oid})
            pk = [str(r[0]) for r in await cur.fetchall()]
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", [advisory_key("capture", table.key)]
            )
            ident = sql.Identifier(table.schema, table.name)
            channel = channel_for(self._db.schema, "changes", table.key)
            args = [
                sql.Literal(table.key),
                sql.Literal(channel if self.notify_mode == "statement" else ""),
                sql.Literal("" if self.columns is None else _text_array(self.columns)),
                sql.Literal(_text_array(pk)),
                sql.Literal(pk[0] if len(pk) == 1 else ""),
            ]
            per_row = self.capture_mode == "row"
            function = sql.Identifier(
                self._db.schema, "capture_row_changes" if per_row else "capture_changes"
            )
            for op in OPERATIONS:
                trigger = self._trigger_name(op)
                await conn.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trigger, ident)
                )
                if op in self.operations:
                    event = (
                        sql.SQL("AFTER {op} ON {table} FOR EACH ROW").format(
                            op=sql.SQL(op.upper()), table=ident
                        )
                        if per_row
                        else _STATEMENT_EVENTS[op].format(table=ident)
                        + sql.SQL(" FOR EACH STATEMENT")
                    )
                    await conn.execute(
                        sql.SQL(
                            "CREATE TRIGGER {trigger} {event} EXECUTE FUNCTION {function}({args})"
                        ).format(
                            trigger=trigger,
                            event=event,
                            function=function,
                            args=sql.SQL(", ").join(args),
                        )
                    )
            await conn.execute(
                self._sql["REGISTER"],
                {
                    "stream": table.key,
                    "operations": list(self.operations),
                    "columns": None if self.columns is None else json.dumps(list(self.columns)),
                    "notify": self.notify_mode,
                    "capture": self.capture_mode,
                    "retention": self.retention,
                },
            )
        self._key = table.key

    async def remove_trigger(self) -> None:
        """Stop capturing; the log stays readable (and prunable)."""
        await self._db.ensure_migrated()
        async with self._db.connection() as conn, conn.transaction():
            table = await self._resolve(conn, required=False)
            key = table.key if table is not None else await self._key_from_name(conn)
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [advisory_key("capture", key)])
            if table is not None:
                ident = sql.Identifier(table.schema, table.name)
                for op in OPERATIONS:
                    await conn.execute(
                        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                            self._trigger_name(op), ident
                        )
                    )
            await conn.execute(self._sql["UNREGISTER"], {"stream": key})

    def _trigger_name(self, op: str) -> sql.Identifier:
        # One capture per (library schema, table): 48 + 15 characters fit in 63.
        return sql.Identifier(f"{self._db.schema}_capture_{op}")

    async def notify(self, payload: T, *, conn: AsyncConnection[Any] | None = None) -> int:
        """Append a producer event (``op="notify"``, ``new=payload``) to this stream.

        With ``conn`` it joins that connection's transaction. Returns the change id.
        """
        text = to_json("payload", payload)
        key = await self.key()
        params = {
            "stream": key,
            "payload": text,
            "channel": channel_for(self._db.schema, "changes", key),
        }
        row = await calls.fetchone(
            self._db, self._sql["NOTIFY"], params, conn, owner=f"changes of {key}"
        )
        return int(row[0])

    # -- subscribing -------------------------------------------------------------------

    def subscribe(
        self,
        consumer: str | None = None,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        page_size: int = DEFAULT_PAGE,
    ) -> Stream[Change[T]]:
        """Every change from now on, in order, once each while the stream runs.

        With ``consumer``, a durable cursor: the first subscription starts now, later ones
        resume after the last item finished with (see module docstring). Run one stream per
        consumer name at a time.
        """
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        check_positive_int("page_size", page_size)
        if consumer is None:
            return Stream(lambda: self._run(None, None, poll, page_size, _Progress()))
        _check_consumer(consumer)
        progress = _Progress()

        async def rewind(items: list[Any]) -> None:
            await self._rewind(consumer, progress, items)

        return Stream(
            lambda: self._run(consumer, None, poll, page_size, progress),
            putback=rewind,
            sequential=(
                f"durable consumer {consumer!r} commits a change when the next one is asked"
                " for; use batch/buffer/concurrency on a stream without a consumer, or"
                " handle each change before asking for the next"
            ),
        )

    def subscribe_from(
        self,
        since: datetime | int,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        page_size: int = DEFAULT_PAGE,
    ) -> Stream[Change[T]]:
        """Replay the log from ``since`` -- a time (changes made at or after it) or a change
        id (that change and every later one) -- then continue live, with nothing missed or
        repeated in between (replay and live are one cursor)."""
        if isinstance(since, bool) or not isinstance(since, datetime | int):
            raise InvalidArgumentError(f"since must be a datetime or a change id, got {since!r}")
        if isinstance(since, datetime) and since.tzinfo is None:
            raise InvalidArgumentError("since must be timezone-aware")
        if isinstance(since, int) and since < 0:
            raise InvalidArgumentError(f"since must not be a negative change id, got {since}")
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        check_positive_int("page_size", page_size)
        return Stream(lambda: self._run(None, since, poll, page_size, _Progress()))

    async def _run(
        self,
        consumer: str | None,
        since: datetime | int | None,
        poll: float,
        n: int,
        progress: _Progress,
    ) -> AsyncIterator[Change[T]]:
        await self._db.ensure_migrated()
        key = await self.key()
        filters = {
            "stream": key,
            "since_at": since if isinstance(since, datetime) else _EPOCH,
            "since_id": since if isinstance(since, int) else 0,
            "n": n,
        }
        cursor = await self._open(key, consumer, since is not None, filters)
        retry = Retry(logger, f"changes of {key}")
        unsaved: tuple[str, str, int, int] | None = None  # the last item handed out
        try:
            async with self._db.wakeups(channel_for(self._db.schema, "changes", key)) as wake:
                while True:
                    rows = await self._next_rows(cursor, filters, wake, poll, retry)
                    for row in rows:
                        cursor.after = max(cursor.after, row[0])
                        unsaved = (cursor.prev.text, cursor.cur.text, row[0], cursor.top)
                        if consumer is not None:
                            progress.remember(row[0], unsaved)
                        yield _change(key, row)
                        # Asked for the next item: the downstream is done with this one.
                        if consumer is not None:
                            await self._save(key, consumer, unsaved)
                        unsaved = None
        finally:
            # A clean close finishes the last item -- unless an operator gave items back.
            if (
                consumer is not None
                and unsaved is not None
                and not progress.rewound
                and closing_cleanly()
            ):
                await self._save_on_close(key, consumer, unsaved)

    async def _open(
        self, key: str, consumer: str | None, replay: bool, filters: dict[str, Any]
    ) -> _Cursor:
        owner = f"changes of {key}"
        if consumer is not None:
            row = await calls.fetchone(
                self._db,
                self._sql["CONSUMER_OPEN"],
                {"stream": key, "name": consumer},
                owner=owner,
            )
            prev, cur = _Snapshot.parse(row[0]), _Snapshot.parse(row[1])
            _check_server(bool(row[5]), _Snapshot.parse(row[4]), cur)
            return _Cursor(prev, cur, int(row[2]), int(row[3]), exhausted=False)
        row = await calls.fetchone(
            self._db, self._sql["START"], {**filters, "replay": replay}, owner=owner
        )
        cur = _Snapshot.parse(row[0])
        _check_server(bool(row[3]), cur, cur)
        if replay:  # first round: every matching change visible now, by id
            return _Cursor(_NOTHING, cur, int(row[1]), int(row[2]), exhausted=False)
        return _Cursor(cur, cur, 0, 0, exhausted=True)  # from now on

    async def _next_rows(
        self,
        cursor: _Cursor,
        filters: dict[str, Any],
        wake: Wakeup,
        poll: float,
        retry: Retry,
    ) -> list[Any]:
        """The next rows in delivery order, waiting while there are none."""
        while True:
            await anyio.lowlevel.checkpoint_if_cancelled()
            wake.arm()
            try:
                if not cursor.exhausted and cursor.after < cursor.top:
                    params = {**filters, "after": cursor.after, "top": cursor.top}
                    rows = await calls.fetchall_shielded(self._db, self._sql["PAGE"], params)
                    retry.reset()
                    cursor.exhausted = len(rows) < filters["n"]
                    if rows:
                        cursor.after = int(rows[-1][0])
                        mine = [r for r in rows if cursor.in_round(int(r[1]))]
                        if mine:
                            return mine
                    continue
                cursor.exhausted = True
                params = {
                    **filters,
                    "prev_xmax": cursor.cur.xmax,
                    "prev_xip": [str(x) for x in sorted(cursor.cur.xip)],
                }
                result = await calls.fetchall_shielded(self._db, self._sql["ADVANCE"], params)
                retry.reset()
            except DatabaseError as exc:
                await retry.after(exc)
                continue
            cur, top = _Snapshot.parse(result[0][0]), int(result[0][1])
            _check_server(bool(result[0][2]), cur, cursor.cur)
            rows = [r[3:] for r in result if r[3] is not None]
            cursor.prev, cursor.cur, cursor.after, cursor.top = cursor.cur, cur, 0, top
            cursor.exhausted = len(rows) < filters["n"]
            if rows:
                return rows
            await wake.wait(poll)

    async def _rewind(self, consumer: str, progress: _Progress, items: list[Any]) -> None:
        """Items an operator read but never handed on: store the position just before the
        earliest of them, so that they come again."""
        # Given-back items come in delivery order: the first is the earliest.
        ids = [c.id for c in items if isinstance(c, Change)]
        position = progress.before(ids[0]) if ids else None
        if position is None:
            return
        progress.rewound = True
        await self._save_on_close(await self.key(), consumer, position)

    async def _save_on_close(
        self, key: str, consumer: str, position: tuple[str, str, int, int]
    ) -> None:
        # Shielded but bounded: a database that stays away must not hang the close. Not
        # saving costs duplicates after a restart, never a loss.
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(calls.CLEANUP_TIMEOUT) as scope:
                await self._save(key, consumer, position)
            if scope.cancelled_caught:
                logger.error("consumer %s of %s: could not save its position", consumer, key)

    async def _save(self, key: str, consumer: str, position: tuple[str, str, int, int]) -> None:
        """Store a durable consumer's position, riding out connection failures."""
        prev, cur, after, top = position
        params = {
            "stream": key,
            "name": consumer,
            "prev": prev,
            "cur": cur,
            "after": after,
            "top": top,
        }
        retry = Retry(logger, f"consumer {consumer} of {key}")
        while True:
            try:
                async with self._db.connection() as conn:
                    result = await conn.execute(self._sql["CONSUMER_SAVE"], params)
                    saved = result.rowcount == 1
                break
            except DatabaseError as exc:
                await retry.after(exc)
        if not saved:
            raise InvalidArgumentError(
                f"consumer {consumer!r} of {key} was removed while its stream ran"
            )

    # -- operations --------------------------------------------------------------------

    async def lag(self, consumer: str) -> ChangeLag:
        """How far behind a durable consumer is: the committed changes it has not finished
        with, and the age of the oldest."""
        _check_consumer(consumer)
        key = await self.key()
        row = await calls.fetchone(
            self._db,
            self._sql["LAG_CONSUMER"],
            {"stream": key, "name": consumer},
            owner=f"changes of {key}",
        )
        if not row[2]:
            raise InvalidArgumentError(f"no consumer {consumer!r} on {key}")
        return ChangeLag(int(row[0]), float(row[1]))

    async def add_consumer(self, consumer: str) -> None:
        """Register a durable consumer positioned "now" (idempotent: an existing one keeps
        its position). ``subscribe(consumer=...)`` does this on its first read; doing it
        ahead makes sure nothing from this moment on is missed."""
        _check_consumer(consumer)
        await self._db.ensure_migrated()
        key = await self.key()
        await calls.fetchone(
            self._db,
            self._sql["CONSUMER_OPEN"],
            {"stream": key, "name": consumer},
            owner=f"changes of {key}",
        )

    async def consumers(self) -> list[str]:
        """Names of this stream's durable consumers."""
        key = await self.key()
        rows = await calls.fetchall(self._db, self._sql["CONSUMERS"], {"stream": key})
        return [str(r[0]) for r in rows]

    async def remove_consumer(self, consumer: str) -> None:
        """Forget a durable consumer (it no longer holds back ``prune``)."""
        _check_consumer(consumer)
        key = await self.key()
        async with self._db.connection() as conn:
            await conn.execute(self._sql["CONSUMER_DROP"], {"stream": key, "name": consumer})

    async def prune(
        self, older_than: timedelta | datetime | None = None, *, force: bool = False
    ) -> int:
        """Delete logged changes older than ``older_than`` (default: the ``retention``
        given at install); returns how many.

        Changes a durable consumer has not reached are kept unless ``force``.
        """
        key = await self.key()
        if older_than is None:
            row = await calls.fetchone(
                self._db,
                self._sql["RETENTION"],
                {"stream": key},
                allow_none=True,
                owner=f"changes of {key}",
            )
            if row is None or row[0] is None:
                raise InvalidArgumentError(f"{key} has no retention: pass older_than")
            older_than = row[0]
        if isinstance(older_than, timedelta):
            if older_than < timedelta(0):
                raise InvalidArgumentError("older_than must not be negative")
            cutoff = datetime.now(UTC) - older_than
        elif isinstance(older_than, datetime) and older_than.tzinfo is not None:
            cutoff = older_than
        else:
            raise InvalidArgumentError(
                "older_than must be a timedelta or a timezone-aware datetime"
            )
        row = await calls.fetchone(
            self._db,
            self._sql["PRUNE"],
            {"stream": key, "cutoff": cutoff, "force": force},
            owner=f"changes of {key}",
        )
        return int(row[0])

    # -- naming ------------------------------------------------------------------------

    async def key(self) -> str:
        """The stream's key: the table's schema-qualified, quoted name."""
        if self._key is None:
            await self._db.ensure_migrated()
            async with self._db.connection() as conn:
                table = await self._resolve(conn, required=False)
                self._key = table.key if table is not None else await self._key_from_name(conn)
        return self._key

    async def _resolve(self, conn: AsyncConnection[Any], *, required: bool) -> _Table | None:
        arg = self._table_arg
        try:
            if isinstance(arg, tuple):
                params = {"schema": arg[0], "name": arg[1]}
                cur = await conn.execute(self._sql["RESOLVE_PARTS"], params)
            else:
                cur = await conn.execute(self._sql["RESOLVE_NAME"], {"table": arg})
            row = await cur.fetchone()
        except (psycopg.errors.InvalidName, psycopg.errors.SyntaxError) as exc:
            raise InvalidArgumentError(f"invalid table name {arg!r}: {exc}") from exc
        if row is None:
            if required:
                raise InvalidArgumentError(f"table {arg!r} does not exist")
            return None
        if row[3] not in ("r", "p"):
            raise InvalidArgumentError(f"{row[4]} is not a table (relkind {row[3]!r})")
        return _Table(int(row[0]), str(row[1]), str(row[2]), str(row[4]), str(row[3]), bool(row[5]))

    async def _key_from_name(self, conn: AsyncConnection[Any]) -> str:
        arg = self._table_arg
        try:
            if isinstance(arg, tuple):
                cur = await conn.execute(
                    self._sql["KEY_FROM_PARTS"], {"schema": arg[0], "name": arg[1]}
                )
            else:
                cur = await conn.execute(self._sql["KEY_FROM_NAME"], {"table": arg})
            row = await cur.fetchone()
        except (psycopg.errors.InvalidName, psycopg.errors.SyntaxError) as exc:
            raise InvalidArgumentError(f"invalid table name {arg!r}: {exc}") from exc
        if row is None or row[0] is None:
            raise InvalidArgumentError(f"invalid table name {arg!r}")
        return str(row[0])

    def __repr__(self) -> str:
        return f"PgChangeStream({self._table_arg!r})"


def _change(key: str, row: Sequence[Any]) -> Change[Any]:
    _id, txid, op, pk, new, old, at = row
    return Change(
        id=int(_id),
        op=str(op),
        table=key,
        new=None if new is None else json.loads(new),
        old=None if old is None else json.loads(old),
        at=at,
        txid=int(txid),
        pk=None if pk is None else json.loads(pk),
    )


def _check_server(in_recovery: bool, now: _Snapshot, seen: _Snapshot) -> None:
    """Refuse what would make snapshot rounds skip changes: a hot standby (its snapshots
    list running transactions where pg_current_snapshot() does not show them), and
    transaction ids that went backwards (a failover to a replica that lagged, a restore)."""
    if in_recovery:
        raise DatabaseError("change streams must read from the primary: this server is a standby")
    if now.xmax < seen.xmax:
        raise DatabaseError(
            f"the server's transaction ids went backwards ({now.xmax} < {seen.xmax}):"
            " a failover or a restore? Positions taken before it no longer apply"
        )


def _check_consumer(name: object) -> str:
    """A consumer name is a value, not an identifier: any 1-200 printable characters."""
    if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
        raise InvalidArgumentError(f"consumer must be 1-200 printable characters, got {name!r}")
    return name


def _check_table(table: object) -> str | tuple[str, str]:
    if isinstance(table, tuple):
        if len(table) != 2 or not all(
            isinstance(p, str) and 0 < len(p.encode()) <= 63 and "\x00" not in p for p in table
        ):
            raise InvalidArgumentError(
                f"table must be a name or a (schema, name) pair of identifiers, got {table!r}"
            )
        return (table[0], table[1])
    if not isinstance(table, str) or not table.strip() or "\x00" in table or len(table) > 300:
        raise InvalidArgumentError(f"table must be a non-empty name, got {table!r}")
    return table


def _check_operations(operations: object) -> tuple[Operation, ...]:
    if isinstance(operations, str) or not isinstance(operations, Sequence | set | frozenset):
        raise InvalidArgumentError(
            f"operations must be a sequence of {OPERATIONS}, got {operations!r}"
        )
    ops = tuple(operations)
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown or not ops or len(set(ops)) != len(ops):
        raise InvalidArgumentError(
            f"operations must be distinct values of {OPERATIONS}, got {operations!r}"
        )
    return tuple(op for op in OPERATIONS if op in ops)


def _check_columns(columns: object) -> tuple[str, ...] | None:
    if columns is None:
        return None
    if isinstance(columns, str) or not isinstance(columns, Sequence):
        raise InvalidArgumentError(f"columns must be a sequence of names, got {columns!r}")
    cols = tuple(columns)
    if not cols or not all(isinstance(c, str) and c and "\x00" not in c for c in cols):
        raise InvalidArgumentError(f"columns must be non-empty names, got {columns!r}")
    if len(set(cols)) != len(cols):
        raise InvalidArgumentError(f"columns must be distinct, got {columns!r}")
    return cols
