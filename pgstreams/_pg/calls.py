"""Running one statement for a queue: on a lent connection or the caller's, shielded when
it takes messages, bounded and logged when it cleans up after a closing stream."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

import anyio
import psycopg
from psycopg import AsyncConnection

from .._core.errors import DatabaseError
from .database import Database, database_error

__all__ = [
    "SourceCalls",
    "cleanup",
    "fetchall",
    "fetchall_shielded",
    "fetchone",
    "idle_wait",
    "using",
]

CLEANUP_TIMEOUT = 10.0
IDLE_QUERY_TIMEOUT = 10.0
MIN_IDLE_WAIT = 0.02


class _Joined:
    """The caller's connection, as is (its transaction is theirs), with driver errors
    translated as a lent connection's are."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def __aenter__(self) -> AsyncConnection[Any]:
        return self._conn

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if isinstance(exc, psycopg.Error):
            raise database_error(exc) from exc


def using(
    db: Database, conn: AsyncConnection[Any] | None
) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
    """``conn`` if the caller gave one (the statement joins its transaction), else a
    connection lent by ``db``."""
    return db.connection() if conn is None else _Joined(conn)


async def fetchone(
    db: Database,
    query: bytes,
    params: Mapping[str, Any] | None,
    conn: AsyncConnection[Any] | None = None,
    *,
    allow_none: bool = False,
    owner: str,
) -> Any:
    """The first row; with ``conn`` the statement joins that connection's transaction."""
    async with using(db, conn) as c:
        cur = await c.execute(query, params)
        row = await cur.fetchone()
    if row is None and not allow_none:
        raise DatabaseError(f"{owner}: the statement returned no row")
    return row


async def fetchall(
    db: Database,
    query: bytes,
    params: Mapping[str, Any] | None,
    conn: AsyncConnection[Any] | None = None,
) -> list[Any]:
    async with using(db, conn) as c:
        cur = await c.execute(query, params)
        rows = await cur.fetchall()
    return rows


async def fetchall_shielded(db: Database, query: bytes, params: Mapping[str, Any]) -> list[Any]:
    """For statements that take messages (delete or lease them): once started, they finish
    even if the caller is cancelled, so what they took reaches code that hands it out or
    gives it back. The pool's own timeout bounds the wait for a connection."""
    with anyio.CancelScope(shield=True):
        async with db.connection() as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
    return rows


async def cleanup(
    db: Database,
    query: bytes,
    params: Mapping[str, Any],
    *,
    logger: logging.Logger,
    what: str,
) -> None:
    """Run a statement while a stream closes, possibly because it was cancelled: shielded,
    bounded, and never masking the exception that is closing the stream (failures are
    logged)."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(CLEANUP_TIMEOUT) as scope:
            try:
                async with db.connection() as conn:
                    await conn.execute(query, params)
                return
            except DatabaseError as exc:
                logger.error("could not %s: %s", what, exc)
                return
        if scope.cancelled_caught:
            logger.error("timed out trying to %s", what)


async def idle_wait(
    db: Database, query: bytes, poll: float, params: Mapping[str, Any] | None = None
) -> float:
    """How long an idle subscriber may sleep: ``poll``, or less if ``query`` (seconds until
    the next delayed message or expiring lease becomes visible, NULL if none) says so."""
    # Shielded (and bounded): cancelling a query mid-flight would cost the connection.
    with anyio.CancelScope(shield=True), anyio.move_on_after(IDLE_QUERY_TIMEOUT):
        async with db.connection() as conn:
            cur = await conn.execute(query, params)
            row = await cur.fetchone()
        if row is not None and row[0] is not None:
            return min(poll, max(MIN_IDLE_WAIT, float(row[0]) + 0.001))
    return poll


class SourceCalls:
    """Statement helpers for a source object with ``_db`` and ``name``: errors and cleanup
    logs name the source (``"<_kind> <name>: ..."``) and go to its ``_logger``."""

    _kind: ClassVar[str]
    _db: Database
    name: str
    _logger: ClassVar[logging.Logger]

    async def _fetchone(
        self,
        query: bytes,
        params: Mapping[str, Any] | None,
        conn: AsyncConnection[Any] | None = None,
        *,
        allow_none: bool = False,
    ) -> Any:
        return await fetchone(
            self._db, query, params, conn, allow_none=allow_none, owner=f"{self._kind} {self.name}"
        )

    async def _cleanup(self, query: bytes, params: Mapping[str, Any], what: str) -> None:
        await cleanup(
            self._db, query, params, logger=self._logger, what=f"{self._kind} {self.name}: {what}"
        )
