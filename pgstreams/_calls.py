"""Running one statement for a queue: on a lent connection or the caller's, shielded when
it takes messages, bounded and logged when it cleans up after a closing stream."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio
from psycopg import AsyncConnection

from ._db import Database, translate_errors
from ._errors import DatabaseError

__all__ = ["cleanup", "fetchall", "fetchall_shielded", "fetchone"]

CLEANUP_TIMEOUT = 10.0


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
    if conn is not None:
        with translate_errors():
            cur = await conn.execute(query, params)
            row = await cur.fetchone()
    else:
        async with db.connection() as own:
            cur = await own.execute(query, params)
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
    if conn is not None:
        with translate_errors():
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
    else:
        async with db.connection() as own:
            cur = await own.execute(query, params)
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
