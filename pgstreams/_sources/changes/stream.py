"""``PgChangeStream[T]``: the inserts, updates, deletes and truncates of a table as a stream.

Capture (``capture``): triggers copy each statement's rows into the change log, tagged
with the writing transaction's id, and send one tiny NOTIFY (no row data) per statement; a
TRUNCATE is one change without row images. Delivery (``subscription``) goes in snapshot
rounds and never loses a change, whatever order transactions commit in; subscribers wake on
the NOTIFY and also poll. A durable consumer (``consumers``) stores its position in
PostgreSQL after each item the downstream has finished with and resumes from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from psycopg import AsyncConnection

from ..._core.errors import InvalidArgumentError
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

__all__ = ["Change", "ChangeLag", "PgChangeStream"]

T = TypeVar("T")

DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_PAGE = 500


class PgChangeStream(Generic[T]):
    """Changes of one table (see module docstring).

    ``table`` is a name as SQL would write it -- ``"users"``, ``"app.users"``,
    ``'"Mixed"."Case"'`` (unquoted parts are folded to lower case) -- or an exact
    ``(schema, name)`` pair. ``operations`` picks what is captured, by default all of
    ``("insert", "update", "delete", "truncate")``. Constructing it touches nothing;
    ``install_trigger()`` starts capturing.
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
        self._table_arg = check_table(table)
        self.operations = check_operations(operations)
        self.columns = check_columns(columns)
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
        self._log = Log.of(db)
        self._key: str | None = None

    # -- capture -----------------------------------------------------------------------

    async def install_trigger(self) -> None:
        """Start capturing (idempotent: re-installing applies the current settings).

        Raises InvalidArgumentError, before anything is installed, for a table that does
        not exist or is not a table, or for ``columns`` it does not have.
        """
        self._key = await capture.install(
            self._log,
            self._table_arg,
            operations=self.operations,
            columns=self.columns,
            notify=self.notify_mode,
            capture=self.capture_mode,
            retention=self.retention,
        )

    async def remove_trigger(self) -> None:
        """Stop capturing; the log stays readable (and prunable)."""
        await capture.remove(self._log, self._table_arg)

    async def notify(self, payload: T, *, conn: AsyncConnection[Any] | None = None) -> int:
        """Append a producer event (``op="notify"``, ``new=payload``) to this stream.

        With ``conn`` it joins that connection's transaction. Returns the change id.
        """
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
            return Stream(
                lambda: subscription.run(
                    self._log, self.key, None, None, poll, page_size, durable.Progress()
                )
            )
        durable.check_consumer(consumer)
        progress = durable.Progress()

        async def rewind(items: list[Any]) -> None:
            await durable.rewind(self._log, await self.key(), consumer, progress, items)

        return Stream(
            lambda: subscription.run(
                self._log, self.key, consumer, None, poll, page_size, progress
            ),
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
        return Stream(
            lambda: subscription.run(
                self._log, self.key, None, since, poll, page_size, durable.Progress()
            )
        )

    # -- operations --------------------------------------------------------------------

    async def lag(self, consumer: str) -> ChangeLag:
        """How far behind a durable consumer is: the committed changes it has not finished
        with, and the age of the oldest."""
        durable.check_consumer(consumer)
        return await durable.lag(self._log, await self.key(), consumer)

    async def add_consumer(self, consumer: str) -> None:
        """Register a durable consumer positioned "now" (idempotent: an existing one keeps
        its position). ``subscribe(consumer=...)`` does this on its first read; doing it
        ahead makes sure nothing from this moment on is missed."""
        durable.check_consumer(consumer)
        await self._db.ensure_migrated()
        await durable.open_position(self._log, await self.key(), consumer)

    async def consumers(self) -> list[str]:
        """Names of this stream's durable consumers."""
        return await durable.names(self._log, await self.key())

    async def remove_consumer(self, consumer: str) -> None:
        """Forget a durable consumer (it no longer holds back ``prune``)."""
        durable.check_consumer(consumer)
        await durable.remove(self._log, await self.key(), consumer)

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
        """The stream's key: the table's schema-qualified, quoted name."""
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

    def __repr__(self) -> str:
        return f"PgChangeStream({self._table_arg!r})"
