"""PgWorkflowStorage's wake-ups and retention.

Wake-ups are the NOTIFYs the runs table's triggers send (migration ``workflows/0011``),
received through the Database's shared listener: one channel per runs table for idle
workers (a run was started or handed back), one per run for ``result()`` waiters (it
ended). The names are hashed so that any workflow id fits NOTIFY's 63 bytes, with SHA-256
because the triggers compute them on the server (``channel_for``'s BLAKE2b has no SQL
counterpart).

Retention deletes runs that ended before a cutoff, with their steps and attempts, in
batches of ``PRUNE_BATCH`` runs, oldest first, each batch its own transaction. Queued and
running runs are never selected. An ``exclusive`` pass holds the session advisory lock
``pgstreams:prune:<schema>:<prefix>`` from its first batch to its last, and gives way when
another process holds it: automatic retention runs in one process at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import anyio
from psycopg import AsyncConnection, sql

from .._core.errors import DatabaseError
from .._core.validate import check_seconds
from .._pg import queries
from .._pg.database import Database, translate_errors
from .._pg.locks import advisory_key

__all__ = ["PRUNE_BATCH", "end_channel", "prune", "work_channel"]

PRUNE_BATCH = 1000
"""Runs deleted per statement (a bounded transaction, however many are due)."""


def _channel(topic: str) -> str:
    return "pgstreams." + hashlib.sha256(topic.encode()).hexdigest()[:32]


def _topic(schema: str, prefix: str) -> str:
    return f"pgstreams:workflows:{schema}:{prefix}runs"


def work_channel(schema: str, prefix: str) -> str:
    """The channel a start or a hand-back in this runs table is announced on."""
    return _channel(_topic(schema, prefix))


def end_channel(schema: str, prefix: str, workflow_id: str) -> str:
    """The channel the end of the run ``workflow_id`` is announced on."""
    return _channel(f"{_topic(schema, prefix)}:ended:{workflow_id}")


async def prune(
    db: Database,
    names: Mapping[str, sql.Composable],
    schema: str,
    prefix: str,
    older_than: float,
    *,
    exclusive: bool,
) -> int:
    """Delete the runs of these tables that ended more than ``older_than`` seconds ago
    (by the server's clock); how many (see module docstring)."""
    seconds = check_seconds("older_than", older_than)
    blocks = queries.load(__package__)
    q = queries.render({k: blocks[k] for k in ("prune", "prune_lock", "unlock")}, names)
    key = advisory_key("prune", schema, prefix)
    total = 0
    async with db.connection() as conn:
        if exclusive:
            cur = await conn.execute(q["prune_lock"], {"key": key})
            row = await cur.fetchone()
            if row is None or not row[0]:
                return 0  # another process is pruning these tables
        try:
            while True:
                cur = await conn.execute(q["prune"], {"older_than": seconds, "n": PRUNE_BATCH})
                row = await cur.fetchone()
                pruned = int(row[0]) if row is not None else 0
                total += pruned
                if pruned < PRUNE_BATCH:
                    return total
        finally:
            if exclusive:
                await _unlock(conn, q["unlock"], key)


async def _unlock(conn: AsyncConnection[Any], statement: bytes, key: int) -> None:
    """Let the prune lock go before the connection goes back to its pool -- or close the
    connection, and the lock with it, if even that fails."""
    with anyio.CancelScope(shield=True):
        try:
            with translate_errors():
                await conn.execute(statement, {"key": key})
        except DatabaseError:
            await conn.close()
