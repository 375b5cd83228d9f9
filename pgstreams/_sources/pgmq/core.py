"""What every part of a ``PgmqQueue`` shares: its names, its SQL, its stored settings, the
way it runs one statement, and the wait of an idle subscriber."""

from __future__ import annotations

import builtins
import logging
from typing import Any

import anyio
import anyio.lowlevel
from psycopg import sql

from ..._core.errors import DatabaseError, InvalidArgumentError
from ..._core.source import Waiting
from ..._core.validate import check_name
from ..._pg import calls, queries
from ..._pg.database import Database

__all__ = ["PGMQ_NAME_MAX", "Idle", "QueueCore", "int_at_least", "logger", "plain_statements"]

logger = logging.getLogger("pgstreams.pgmq")

PGMQ_NAME_MAX = 43
"""pgmq allows 47 characters; 4 are kept for the ``_dlq`` suffix."""
SETTINGS_TTL = 5.0
"""Seconds a handle trusts its cached max_attempts and notification throttle."""


def plain_statements(*names: str) -> dict[str, bytes]:
    """The blocks ``names`` of ``queries.sql``, which use no identifiers, rendered: for
    statements that run before any queue handle exists."""
    texts = queries.load(__package__)
    return queries.render({name: texts[name] for name in names}, {})


def int_at_least(what: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


class QueueCore(calls.SourceCalls):
    """A handle on one pgmq queue: names and statements, no I/O until a method is awaited.

    Statements are rendered once per handle; ``max_attempts`` and the notification throttle
    are read from the database and trusted for ``SETTINGS_TTL`` seconds.
    """

    _kind = "pgmq"
    _logger = logger

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
        self._sql = queries.render(queries.load(__package__), names)
        self._settings: tuple[float, int | None, int | None] | None = None
        """(read at, max_attempts, notify throttle ms or None when notify is off)."""

    def _dlq_table(self) -> str:
        return f"pgmq.q_{self.dead_letter_queue}"

    async def _current_settings(self) -> tuple[int | None, int | None]:
        """(max_attempts, notify throttle ms), re-read every SETTINGS_TTL seconds."""
        now = anyio.current_time()
        if self._settings is None or now - self._settings[0] > SETTINGS_TTL:
            # Shielded: cancelling a statement mid-flight would cost the connection.
            with anyio.CancelScope(shield=True):
                row = await self._fetchone(self._sql["settings"], {"queue": self.name})
            self._settings = (now, row[0], row[1])
        return self._settings[1], self._settings[2]

    async def _read_standard(
        self, query: bytes, params: dict[str, Any], waiting: Waiting, idle: Idle
    ) -> tuple[builtins.list[Any], int | None]:
        """The next rows of a standard read or pop and the queue's max_attempts, sleeping
        while there are none."""
        wakeup, retry = waiting.wakeup, waiting.retry
        while True:
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                limit, throttle = await self._current_settings()
                if wakeup.arm():  # notified while busy: a throttle window is open now
                    idle.woken(throttle)
                rows = await calls.fetchall_shielded(self._db, query, params)
                if rows:
                    retry.reset()
                    return rows, limit
                timeout = idle.timeout(
                    await calls.idle_wait(self._db, self._sql["next_visible"], waiting.poll)
                )
                if await wakeup.wait(timeout):
                    idle.woken(throttle)
            except DatabaseError as exc:
                await retry.after(exc)

    def __repr__(self) -> str:
        return f"PgmqQueue({self.name!r})"


class Idle:
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
