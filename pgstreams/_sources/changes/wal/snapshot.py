"""Reading a table's existing rows into a WAL stream without stopping it (DBLog).

The rows are read in primary-key chunks. For each chunk the reader commits a low
watermark (a transactional logical message), selects the chunk, and commits a high
watermark. The stream goes on meanwhile; when it reaches the low watermark the chunk's
window opens, and every change in the window to a row of the chunk removes that row from
the chunk (the change is at least as new as what the select saw, and it is delivered in
its place). At the high watermark what is left of the chunk is handed out as
``op="snapshot"`` changes. A row thus never ends older than its last change, and the slot
keeps advancing through a snapshot of any size, since no chunk waits for more than its
own window.

Progress (the next table, and the key to read after) is saved in ``wal_snapshots`` once
all of a chunk's rows have been handled, so a snapshot interrupted by a crash resumes at
the chunk it was in (re-sending that chunk's rows).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, sql

from .setup import SetupError, WalTable, WalTarget

__all__ = [
    "WATERMARK_PREFIX",
    "Chunk",
    "Progress",
    "begin",
    "check_keys",
    "emit",
    "finish",
    "load",
    "new_token",
    "read_chunk",
    "save",
]

WATERMARK_PREFIX = "pgstreams.wm:"


@dataclass(slots=True)
class Progress:
    tables: list[str]
    index: int
    after: list[str] | None


@dataclass(slots=True)
class Chunk:
    table: WalTable
    token: str
    """Names this chunk's watermarks (older ones, replayed after a restart, are ignored)."""
    rows: dict[tuple[Any, ...], Any]
    """Primary key values -> row, in key order."""
    last: list[str] | None
    """The key of the chunk's last row as text (where the next chunk starts)."""
    full: bool
    """The select returned as many rows as it asked for: the table may have more."""
    window: bool = False
    """The stream is between the chunk's watermarks."""
    delivered: bool = False
    """The chunk's rows were handed out (at its high watermark)."""


def check_keys(target: WalTarget) -> None:
    for table in target.tables:
        if not table.pk:
            raise SetupError(
                f"a snapshot reads {table.key} in primary-key order, and it has no primary"
                " key: add one, or subscribe without snapshot=True"
            )


async def load(conn: AsyncConnection[Any], schema: str, slot: str) -> Progress | None:
    cur = await conn.execute(
        sql.SQL("SELECT tables, table_index, after FROM {} WHERE slot = %s").format(
            sql.Identifier(schema, "wal_snapshots")
        ),
        [slot],
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return Progress(list(row[0]), int(row[1]), None if row[2] is None else list(row[2]))


async def begin(conn: AsyncConnection[Any], schema: str, slot: str, target: WalTarget) -> Progress:
    tables = [t.key for t in target.tables]
    await conn.execute(
        sql.SQL(
            "INSERT INTO {} (slot, tables) VALUES (%s, %s)"
            " ON CONFLICT (slot) DO UPDATE SET tables = excluded.tables, table_index = 0,"
            " after = NULL, started_at = now()"
        ).format(sql.Identifier(schema, "wal_snapshots")),
        [slot, tables],
    )
    return Progress(tables, 0, None)


async def save(conn: AsyncConnection[Any], schema: str, slot: str, progress: Progress) -> None:
    await conn.execute(
        sql.SQL("UPDATE {} SET table_index = %s, after = %s WHERE slot = %s").format(
            sql.Identifier(schema, "wal_snapshots")
        ),
        [progress.index, progress.after, slot],
    )


async def finish(conn: AsyncConnection[Any], schema: str, slot: str) -> None:
    await conn.execute(
        sql.SQL("DELETE FROM {} WHERE slot = %s").format(sql.Identifier(schema, "wal_snapshots")),
        [slot],
    )


async def emit(conn: AsyncConnection[Any], slot: str, content: str) -> None:
    """Commit a watermark into the WAL (its own transaction)."""
    await conn.execute(
        "SELECT pg_catalog.pg_logical_emit_message(true, %s, %s)",
        [WATERMARK_PREFIX + slot, content],
    )


def new_token() -> str:
    return secrets.token_hex(8)


async def read_chunk(
    conn: AsyncConnection[Any], table: WalTable, after: list[str] | None, size: int, token: str
) -> Chunk:
    """Up to ``size`` rows of ``table`` after the key ``after``, in key order."""
    # Qualified: an output column named like a key column would otherwise be what ORDER
    # BY sorts (as text), and a column named like the alias would be what to_jsonb reads.
    keys = [sql.Identifier("pgs_row", c) for c in table.pk]
    where: sql.Composable = sql.SQL("")
    params: list[Any] = []
    if after is not None:
        bound = sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(t)) for t in table.pk_types)
        where = sql.SQL("WHERE ({}) > ({})").format(sql.SQL(", ").join(keys), bound)
        params.extend(after)
    query = sql.SQL(
        "SELECT to_jsonb(pgs_row.*)::text, {texts} FROM {table} AS pgs_row {where}"
        " ORDER BY {keys} LIMIT {n}"
    ).format(
        texts=sql.SQL(", ").join(
            sql.SQL("{}::text AS {}").format(k, sql.Identifier(f"pgs_key_{i}"))
            for i, k in enumerate(keys)
        ),
        table=sql.Identifier(table.schema, table.name),
        where=where,
        keys=sql.SQL(", ").join(keys),
        n=sql.Literal(size),
    )
    cur = await conn.execute(query, params)
    rows: dict[tuple[Any, ...], Any] = {}
    last: list[str] | None = None
    for row in await cur.fetchall():
        value = json.loads(row[0])
        rows[tuple(value.get(c) for c in table.pk)] = value
        last = [str(v) for v in row[1:]]
    return Chunk(table, token, rows, last, full=len(rows) >= size)
