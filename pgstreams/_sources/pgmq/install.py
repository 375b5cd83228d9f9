"""Making sure the ``pgmq`` schema exists: the extension when the server has it, otherwise
the SQL-only install bundled with the ``pgmq`` package.

Safe when processes race (a transaction-level advisory lock, then a second look), and never
runs the install SQL over an existing ``pgmq`` schema.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from ..._core.errors import DatabaseError
from ..._pg.database import Database
from ..._pg.locks import advisory_key
from .core import plain_statements

__all__ = ["ensure_pgmq", "pgmq_installed"]

_SQL = plain_statements(
    "install_state", "install_found", "install_features", "install_extension", "lock"
)


async def pgmq_installed(conn: AsyncConnection[Any]) -> bool:
    cur = await conn.execute(_SQL["install_found"])
    row = await cur.fetchone()
    return bool(row and row[0])


def bundled_sql() -> str:
    """The install script shipped inside the ``pgmq`` package."""
    from pgmq.install import get_embedded_install_sql

    return get_embedded_install_sql()


async def ensure_pgmq(db: Database) -> None:
    """Install pgmq if it is missing (once per Database; concurrency-safe)."""
    if db._pgmq_checked:
        return
    async with db.connection() as conn:
        cur = await conn.execute(_SQL["install_state"])
        row = await cur.fetchone()
        assert row is not None
        installed, available = bool(row[0]), bool(row[1])
        if not installed:
            async with conn.transaction():
                await conn.execute(_SQL["lock"], {"key": advisory_key("pgmq-install")})
                if not await pgmq_installed(conn):  # another process may have won the race
                    if available:
                        await conn.execute(_SQL["install_extension"])
                    else:
                        await conn.execute(bundled_sql().encode())
        cur = await conn.execute(_SQL["install_features"])
        row = await cur.fetchone()
        if not (row and row[0]):
            raise DatabaseError(
                "the installed pgmq lacks message headers, last_read_at or throttled insert"
                " notifications; upgrade it (ALTER EXTENSION pgmq UPDATE) to use it with"
                " pgstreams"
            )
    db._pgmq_checked = True
