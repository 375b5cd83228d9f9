"""``PgChangeStream[T]``: the inserts, updates, deletes and truncates of a table as a stream.

Capture (``capture``): triggers copy each statement's rows into the change log, tagged
with the writing transaction's id, and send one tiny NOTIFY (no row data) per statement; a
TRUNCATE is one change without row images. Delivery (``subscription``) goes in snapshot
rounds and never loses a change, whatever order transactions commit in; subscribers wake on
the NOTIFY and also poll. A durable consumer (``consumers``) stores its position in
PostgreSQL after each item the downstream has finished with and resumes from there.

``capture="wal"`` reads the changes from the write-ahead log instead, over logical
replication (``wal``): writers pay nothing, several tables share one stream, and a durable
consumer is a replication slot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from psycopg import AsyncConnection

from ..._core.errors import InvalidArgumentError
from ..._core.progress import ProgressCallback, check_progress
from ..._core.stream import Stream
from ..._core.validate import check_positive_int, check_seconds, to_json
from ..._pg import calls
from ..._pg.database import Database
from . import capture, subscription
from . import consumers as durable
from .capture import (
    OPERATIONS,
    CaptureMode,
    NotifyMode,
    Operation,
    check_columns,
    check_operations,
    check_table,
)
from .change import Change, ChangeLag
from .log import Log
from .wal.capture import DEFAULT_CHUNK, OnSlotLost, WalCapture
from .wal.slots import ConsumerInfo

__all__ = ["Change", "ChangeLag", "ConsumerInfo", "PgChangeStream"]

logger = logging.getLogger("pgstreams.changes")

T = TypeVar("T")

DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_PAGE = 500
DEFAULT_HEARTBEAT = 10.0
DEFAULT_RETAINED_WARNING = 1024 * 1024 * 1024


class PgChangeStream(Generic[T]):
    """Changes of one table -- or, with WAL capture, several (see module docstring).

    ``table`` is a name as SQL would write it -- ``"users"``, ``"app.users"``,
    ``'"Mixed"."Case"'`` (unquoted parts are folded to lower case) -- or an exact
    ``(schema, name)`` pair; with ``capture="wal"`` also a list of them. ``operations``
    picks what is captured, by default all of ``("insert", "update", "delete",
    "truncate")``. Constructing it touches nothing.

    ``capture``: ``"statement"`` (default) or ``"row"`` -- triggers, installed by
    ``install_trigger()``; or ``"wal"`` -- logical replication, which needs
    ``wal_level=logical`` and a role with REPLICATION, and no trigger. In WAL mode
    ``heartbeat`` is how long an idle subscription waits before writing a tiny WAL message
    to move its slot on, and a warning is logged when a slot retains more than
    ``retained_warning`` bytes of WAL (None: never).
    """

    def __init__(
        self,
        db: Database,
        table: str | tuple[str, str] | Sequence[str | tuple[str, str]],
        *,
        operations: Sequence[Operation] = OPERATIONS,
        columns: Sequence[str] | None = None,
        notify: NotifyMode = "statement",
        capture: CaptureMode = "statement",
        retention: timedelta | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        retained_warning: int | None = DEFAULT_RETAINED_WARNING,
    ) -> None:
        self._db = db
        if capture not in ("statement", "row", "wal"):
            raise InvalidArgumentError(
                f"capture must be 'statement', 'row' or 'wal', got {capture!r}"
            )
        self.capture_mode: CaptureMode = capture
        self._wal: WalCapture | None = None
        if isinstance(table, str | tuple):
            tables = [check_table(table)]
        elif isinstance(table, Sequence) and table:
            tables = [check_table(t) for t in table]
        else:
            raise InvalidArgumentError(f"table must be a name or a list of names, got {table!r}")
        if len(tables) > 1 and capture != "wal":
            raise InvalidArgumentError(
                "a trigger-captured stream has one table: use capture='wal' for several"
            )
        self._table_arg = tables[0]
        self.operations = check_operations(operations)
        self.columns = check_columns(columns)
        if notify not in ("statement", "off"):
            raise InvalidArgumentError(f"notify must be 'statement' or 'off', got {notify!r}")
        self.notify_mode: NotifyMode = notify
        if capture == "wal":
            if columns is not None or retention is not None or notify != "statement":
                raise InvalidArgumentError(
                    "columns, retention and notify are trigger-capture options; WAL capture"
                    " sends whole rows, keeps no log and needs no NOTIFY"
                )
            self._wal = WalCapture(
                db,
                tables,
                self.operations,
                heartbeat=heartbeat,
                retained_warning=retained_warning,
            )
        if retention is not None and (
            not isinstance(retention, timedelta) or retention <= timedelta(0)
        ):
            raise InvalidArgumentError(f"retention must be a positive timedelta, got {retention!r}")
        self.retention = retention
        self._log = Log.of(db)
        self._key: str | None = None

    # -- capture -----------------------------------------------------------------------

    async def install_trigger(self) -> None:
        """Start capturing (idempotent: re-installing applies the current settings).

        Raises InvalidArgumentError, before anything is installed, for a table that does
        not exist or is not a table, or for ``columns`` it does not have.
        """
        self._trigger_only("install_trigger()")
        self._key = await capture.install(
            self._log,
            self._table_arg,
            operations=self.operations,
            columns=self.columns,
            notify=self.notify_mode,
            capture=self.capture_mode,
            retention=self.retention,
        )
        logger.info("changes of %s: capture trigger installed", self._key)

    async def remove_trigger(self) -> None:
        """Stop capturing; the log stays readable (and prunable)."""
        self._trigger_only("remove_trigger()")
        await capture.remove(self._log, self._table_arg)
        logger.info("changes of %s: capture trigger removed", self._table_arg)

    async def notify(self, payload: T, *, conn: AsyncConnection[Any] | None = None) -> int:
        """Append a producer event (``op="notify"``, ``new=payload``) to this stream.

        With ``conn`` it joins that connection's transaction. Returns the change id; with WAL
        capture, the LSN of the logical message as an int (not the delivered ``Change.id``,
        which depends on the commit). Either way it is delivered in commit order.
        """
        if self._wal is not None:
            return await self._wal.notify(payload, conn)
        text = to_json("payload", payload)
        key = await self.key()
        params = {"stream": key, "payload": text, "channel": self._log.channel(key)}
        row = await calls.fetchone(
            self._db, self._log.sql["notify"], params, conn, owner=f"changes of {key}"
        )
        return int(row[0])

    # -- subscribing -------------------------------------------------------------------

    def subscribe(
        self,
        consumer: str | None = None,
        *,
        snapshot: bool = False,
        on_slot_lost: OnSlotLost = "raise",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        page_size: int = DEFAULT_PAGE,
        chunk_size: int = DEFAULT_CHUNK,
        progress: ProgressCallback | None = None,
    ) -> Stream[Change[T]]:
        """Every change from now on, in order, once each while the stream runs.

        With ``consumer``, a durable cursor: the first subscription starts now, later ones
        resume after the last item finished with (see module docstring). Run one stream per
        consumer name at a time.

        WAL capture only: ``snapshot=True`` first hands out the tables' existing rows as
        ``op="snapshot"`` changes, read in ``chunk_size`` primary-key chunks between
        watermarks while live changes keep flowing (when the consumer's slot is created, or
        to finish an interrupted snapshot); ``on_slot_lost="resnapshot"`` recreates a lost
        slot and re-reads current rows instead of raising ``SlotLostError``. ``progress``
        gets a ``Progress`` (rows read of the tables' estimated total) when such a snapshot
        starts and after each chunk's rows were handled; snapshot progress is also logged
        on the ``pgstreams.changes.wal`` logger.
        ``poll_interval`` and ``page_size`` apply to trigger capture only.
        """
        check_progress(progress)
        if self._wal is not None:
            return self._wal.subscribe(consumer, snapshot, on_slot_lost, chunk_size, progress)
        if snapshot or on_slot_lost != "raise":
            raise InvalidArgumentError("snapshot and on_slot_lost need capture='wal'")
        if progress is not None:
            raise InvalidArgumentError("progress reports WAL snapshots: it needs capture='wal'")
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        check_positive_int("page_size", page_size)
        if consumer is None:
            return Stream(
                lambda: subscription.run(
                    self._log, self.key, None, None, poll, page_size, durable.Progress()
                )
            )
        durable.check_consumer(consumer)
        position = durable.Progress()

        async def rewind(items: list[Any]) -> None:
            await durable.rewind(self._log, await self.key(), consumer, position, items)

        return Stream(
            lambda: subscription.run(
                self._log, self.key, consumer, None, poll, page_size, position
            ),
            putback=rewind,
            checkpoint=durable.Deferred(self._log, self.key, consumer, position),
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
        repeated in between (replay and live are one cursor). Trigger capture only."""
        if self._wal is not None:
            raise InvalidArgumentError(
                "subscribe_from() replays the trigger-capture log; WAL capture keeps no log"
                " to replay by time. Use trigger capture (capture='statement') for time"
                " replay, or subscribe(consumer=..., snapshot=True) for the current rows"
                " followed by live changes"
            )
        if isinstance(since, bool) or not isinstance(since, datetime | int):
            raise InvalidArgumentError(f"since must be a datetime or a change id, got {since!r}")
        if isinstance(since, datetime) and since.tzinfo is None:
            raise InvalidArgumentError("since must be timezone-aware")
        if isinstance(since, int) and since < 0:
            raise InvalidArgumentError(f"since must not be a negative change id, got {since}")
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        check_positive_int("page_size", page_size)
        return Stream(
            lambda: subscription.run(
                self._log, self.key, None, since, poll, page_size, durable.Progress()
            )
        )

    # -- operations --------------------------------------------------------------------

    async def lag(self, consumer: str) -> ChangeLag:
        """How far behind a durable consumer is: the committed changes it has not finished
        with, and the age of the oldest. Trigger capture (WAL: ``consumers()``)."""
        self._trigger_only("lag()")
        durable.check_consumer(consumer)
        return await durable.lag(self._log, await self.key(), consumer)

    async def add_consumer(self, consumer: str) -> None:
        """Register a durable consumer positioned "now" (idempotent: an existing one keeps
        its position). ``subscribe(consumer=...)`` does this on its first read; doing it
        ahead makes sure nothing from this moment on is missed. With WAL capture it
        creates the consumer's replication slot."""
        if self._wal is not None:
            await self._wal.add_consumer(consumer)
            return
        durable.check_consumer(consumer)
        await self._db.ensure_migrated()
        await durable.open_position(self._log, await self.key(), consumer)

    async def consumers(self) -> list[ConsumerInfo]:
        """This stream's durable consumers: WAL capture reports each one's slot, confirmed
        LSN, retained WAL, ``wal_status``, whether it streams now and its lag in bytes;
        trigger capture its name and lag in changes."""
        if self._wal is not None:
            return await self._wal.consumers()
        key = await self.key()
        infos = []
        for name in await durable.names(self._log, key):
            lag = await durable.lag(self._log, key, name)
            infos.append(ConsumerInfo(name, None, None, None, None, False, lag.changes))
        return infos

    async def drop_consumer(self, consumer: str) -> None:
        """Forget a durable consumer: WAL capture drops its replication slot (refused while
        it streams); trigger capture forgets its position (it no longer holds back
        ``prune``)."""
        if self._wal is not None:
            await self._wal.drop_consumer(consumer)
            return
        durable.check_consumer(consumer)
        await durable.remove(self._log, await self.key(), consumer)

    async def remove_consumer(self, consumer: str) -> None:
        """The same as ``drop_consumer``."""
        await self.drop_consumer(consumer)

    async def prune(
        self, older_than: timedelta | datetime | None = None, *, force: bool = False
    ) -> int:
        """Delete logged changes older than ``older_than`` (default: the ``retention``
        given at install); returns how many.

        Changes a durable consumer has not reached are kept unless ``force``.
        """
        self._trigger_only("prune()")
        key = await self.key()
        if older_than is None:
            row = await calls.fetchone(
                self._db,
                self._log.sql["retention"],
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
            self._log.sql["prune"],
            {"stream": key, "cutoff": cutoff, "force": force},
            owner=f"changes of {key}",
        )
        return int(row[0])

    # -- naming ------------------------------------------------------------------------

    async def key(self) -> str:
        """The stream's key: the table's schema-qualified, quoted name (WAL capture: the
        tables', joined by ", ")."""
        if self._wal is not None:
            return await self._wal.key()
        if self._key is None:
            await self._db.ensure_migrated()
            async with self._db.connection() as conn:
                table = await capture.resolve(self._log, conn, self._table_arg, required=False)
                self._key = (
                    table.key
                    if table is not None
                    else await capture.key_from_name(self._log, conn, self._table_arg)
                )
        return self._key

    def _trigger_only(self, what: str) -> None:
        if self._wal is not None:
            raise InvalidArgumentError(f"{what} is for trigger capture; this stream uses WAL")

    def __repr__(self) -> str:
        return f"PgChangeStream({self._table_arg!r}, capture={self.capture_mode!r})"
