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

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection, sql

from .setup import SetupError, WalTable, WalTarget
from .values import Types

__all__ = [
    "WATERMARK_PREFIX",
    "Chunk",
    "Progress",
    "begin",
    "check_keys",
    "emit",
    "estimate",
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
    """The primary key's values as text (as the WAL carries them) -> row, in key order."""
    last: list[str] | None
    """The key of the chunk's last row as text (where the next chunk starts)."""
    full: bool
    """The select returned as many rows as it asked for: the table may have more."""
    unseen: frozenset[int] = frozenset()
    """Transactions (32-bit xids) the select's snapshot saw running: their changes are newer
    than the chunk wherever they are in the WAL, even before the low watermark (a commit can
    reach the WAL before its transaction stops showing as running)."""
    positions: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Per relation OID, where the key's columns are in its tuples."""
    window: bool = False
    """The stream is between the chunk's watermarks."""
    delivered: bool = False
    """The chunk's rows were handed out (at its high watermark)."""
    read: int = 0
    """Rows the select returned (what snapshot progress counts)."""


def check_keys(target: WalTarget) -> None:
    """A snapshot matches rows to changes by primary key: each table needs one, and a
    replica identity that logs it for deletes (the default, or FULL)."""
    for table in target.tables:
        if not table.pk:
            raise SetupError(
                f"a snapshot reads {table.key} in primary-key order, and it has no primary"
                " key: add one, or subscribe without snapshot=True"
            )
        if table.identity not in ("d", "f"):
            raise SetupError(
                f"a snapshot matches deleted rows of {table.key} by primary key, and its"
                " replica identity does not log it: use REPLICA IDENTITY DEFAULT or FULL,"
                " or subscribe without snapshot=True"
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
    conn: AsyncConnection[Any],
    table: WalTable,
    after: list[str] | None,
    size: int,
    token: str,
    settings: dict[str, str],
    types: Types,
) -> Chunk:
    """Up to ``size`` rows of ``table`` after the key ``after``, in key order.

    The rows are read as text under the replication session's ``settings`` (time zone,
    date style, ...) and converted as live changes are: a snapshot row has the shape and
    values a live insert of it would have, and its key text is what the WAL carries. The
    select runs in a repeatable-read transaction that also records which transactions
    its snapshot saw still running (``Chunk.unseen``)."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        for name, value in settings.items():
            await conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", [name, value])
        cur = await conn.execute(
            "SELECT attname::text, atttypid::int8 FROM pg_catalog.pg_attribute"
            " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped AND attgenerated = ''"
            " ORDER BY attnum",
            [table.oid],
        )
        columns = [(str(name), int(oid)) for name, oid in await cur.fetchall()]
        if not types.knows(oid for _, oid in columns):
            await types.learn(conn, [oid for _, oid in columns])
        cur = await conn.execute(
            "SELECT mod(x::text::numeric, 4294967296)::int8"
            " FROM pg_catalog.pg_snapshot_xip(pg_catalog.pg_current_snapshot()) AS x"
        )
        unseen = frozenset(int(r[0]) for r in await cur.fetchall())
        # Qualified: an output column named like a key column would otherwise be what
        # ORDER BY sorts.
        keys = [sql.Identifier("pgs_row", c) for c in table.pk]
        where: sql.Composable = sql.SQL("")
        params: list[Any] = []
        if after is not None:
            # format_type() gives each type's name quoted as SQL needs it.
            bound = sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(t)) for t in table.pk_types)
            where = sql.SQL("WHERE ({}) > ({})").format(sql.SQL(", ").join(keys), bound)
            params.extend(after)
        query = sql.SQL(
            "SELECT {values}, {texts} FROM {table} AS pgs_row {where} ORDER BY {keys} LIMIT {n}"
        ).format(
            values=sql.SQL(", ").join(
                sql.SQL("{}::text").format(sql.Identifier("pgs_row", name)) for name, _ in columns
            ),
            texts=sql.SQL(", ").join(sql.SQL("{}::text").format(k) for k in keys),
            table=sql.Identifier(table.schema, table.name),
            where=where,
            keys=sql.SQL(", ").join(keys),
            n=sql.Literal(size),
        )
        cur = await conn.execute(query, params)
        fetched = await cur.fetchall()
    names = [name for name, _ in columns]
    converters = [types.converter(oid) for _, oid in columns]
    width = len(columns)
    rows: dict[tuple[Any, ...], Any] = {}
    for row in fetched:
        values = {
            name: None if value is None else convert(value)
            for name, convert, value in zip(names, converters, row[:width], strict=True)
        }
        rows[tuple(row[width:])] = values
    last = None if not fetched else [str(v) for v in fetched[-1][width:]]
    return Chunk(
        table, token, rows, last, full=len(fetched) >= size, unseen=unseen, read=len(fetched)
    )


async def estimate(conn: AsyncConnection[Any], tables: Sequence[WalTable]) -> int | None:
    """The tables' rows as the planner's statistics count them (``pg_class.reltuples``);
    None if one of them was never vacuumed or analysed."""
    cur = await conn.execute(
        "SELECT reltuples::int8 FROM pg_catalog.pg_class WHERE oid = ANY(%s::oid[])",
        [[t.oid for t in tables]],
    )
    found = [int(r[0]) for r in await cur.fetchall()]
    if len(found) != len(tables) or any(n < 0 for n in found):
        return None
    return sum(found)
