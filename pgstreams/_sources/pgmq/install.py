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
from ..._pg.migrate import advisory_key

__all__ = ["ensure_pgmq", "pgmq_installed"]

_STATE = """
SELECT to_regclass('pgmq.meta') IS NOT NULL,
       EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pgmq')
"""

# What pgstreams relies on: message headers (pgmq 1.5), last_read_at (1.10) and throttled
# insert notifications (pgmq.notify_insert_throttle, later still). The pgmq package's
# bundled SQL (1.13) has them all.
_FEATURES = """
SELECT count(*) = 2 AND to_regclass('pgmq.notify_insert_throttle') IS NOT NULL
FROM pg_attribute a JOIN pg_type t ON a.attrelid = t.typrelid
WHERE t.oid = 'pgmq.message_record'::regtype AND a.attname IN ('headers', 'last_read_at')
"""


# A scan of the catalog tables under the statement's own snapshot. to_regclass() would go
# through the backend's catalog caches, which may still remember "absent" from before an
# advisory-lock wait during which another process installed pgmq.
_INSTALLED = """
SELECT EXISTS (
    SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'pgmq' AND c.relname = 'meta'
)
"""


async def pgmq_installed(conn: AsyncConnection[Any]) -> bool:
    cur = await conn.execute(_INSTALLED)
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
        cur = await conn.execute(_STATE)
        row = await cur.fetchone()
        assert row is not None
        installed, available = bool(row[0]), bool(row[1])
        if not installed:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(%s)", [advisory_key("pgmq-install")]
                )
                if not await pgmq_installed(conn):  # another process may have won the race
                    if available:
                        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
                    else:
                        await conn.execute(bundled_sql().encode())
        cur = await conn.execute(_FEATURES)
        row = await cur.fetchone()
        if not (row and row[0]):
            raise DatabaseError(
                "the installed pgmq lacks message headers, last_read_at or throttled insert"
                " notifications; upgrade it (ALTER EXTENSION pgmq UPDATE) to use it with"
                " pgstreams"
            )
    db._pgmq_checked = True
