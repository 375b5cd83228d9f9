"""Trigger capture: which table a stream names, and the triggers that log its changes.

Inserts, updates and deletes are logged by statement-level AFTER triggers (each statement's
rows in one ``INSERT ... SELECT`` from its transition tables) or, with ``capture="row"``,
row-level ones. TRUNCATE is logged by a statement-level AFTER TRUNCATE trigger in either
mode: one change per statement, without row images. Each statement's NOTIFY carries no
data. Installing and removing take a per-table advisory lock and run in one transaction,
so a capture is always installed whole or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import psycopg
from psycopg import AsyncConnection, sql

from ..._core.errors import InvalidArgumentError
from ..._pg.locks import advisory_key
from .log import Log

__all__ = [
    "OPERATIONS",
    "CaptureMode",
    "NotifyMode",
    "Operation",
    "Table",
    "check_columns",
    "check_operations",
    "check_table",
    "install",
    "key_from_name",
    "remove",
    "resolve",
]

Operation = Literal["insert", "update", "delete", "truncate"]
NotifyMode = Literal["statement", "off"]
CaptureMode = Literal["statement", "row", "wal"]
OPERATIONS: tuple[Operation, ...] = ("insert", "update", "delete", "truncate")

# One capture per (library schema, table): a schema name has at most 48 characters, so the
# suffixes stay within 15 to fit PostgreSQL's 63 ("truncate" is shortened for that).
_TRIGGER_SUFFIX: dict[Operation, str] = {
    "insert": "_capture_insert",
    "update": "_capture_update",
    "delete": "_capture_delete",
    "truncate": "_capture_trunc",
}


@dataclass(frozen=True, slots=True)
class Table:
    oid: int
    schema: str
    name: str
    key: str
    kind: str
    """pg_class.relkind: "r" a table, "p" a partitioned table."""
    has_children: bool
    """Partitions or inheritance children, which can be written directly."""


def _text_array(items: Sequence[str]) -> str:
    """A text[] literal (trigger arguments can only be string constants)."""
    quoted = ('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
    return "{" + ",".join(quoted) + "}"


async def install(
    log: Log,
    table_arg: str | tuple[str, str],
    *,
    operations: tuple[Operation, ...],
    columns: tuple[str, ...] | None,
    notify: NotifyMode,
    capture: CaptureMode,
    retention: timedelta | None,
) -> str:
    """Install (or re-install with these settings) the capture of a table; returns its key.

    Raises InvalidArgumentError, before anything is installed, for a table that does not
    exist, is not a table, cannot be captured whole, or lacks one of ``columns``.
    """
    db = log.db
    await db.ensure_migrated()
    async with db.connection() as conn, conn.transaction():
        table = await resolve(log, conn, table_arg, required=True)
        assert table is not None
        if table.schema == db.schema:
            raise InvalidArgumentError(
                f"{table.key} belongs to pgstreams itself and cannot be captured"
            )
        if table.kind == "p" and capture == "statement":
            # Statement triggers on a partitioned table do not fire for statements that
            # write a partition directly; row triggers are cloned to every partition.
            raise InvalidArgumentError(f'{table.key} is partitioned: use capture="row"')
        if table.kind == "r" and table.has_children:
            # Inheritance children get no triggers from their parent at all.
            raise InvalidArgumentError(
                f"{table.key} has inheritance children, whose writes its triggers would"
                " miss: capture each table of the hierarchy on its own"
            )
        cur = await conn.execute(log.sql["columns"], {"oid": table.oid})
        existing = {str(r[0]) for r in await cur.fetchall()}
        missing = [c for c in columns or () if c not in existing]
        if missing:
            raise InvalidArgumentError(f"table {table.key} has no column(s) {missing}")
        cur = await conn.execute(log.sql["primary_key"], {"oid": table.oid})
        pk = [str(r[0]) for r in await cur.fetchall()]
        await conn.execute(log.sql["lock_capture"], {"key": advisory_key("capture", table.key)})
        names: dict[str, Any] = {
            "table": sql.Identifier(table.schema, table.name),
            "schema": sql.Identifier(db.schema),
            "args": sql.SQL(", ").join(
                [
                    sql.Literal(table.key),
                    sql.Literal(log.channel(table.key) if notify == "statement" else ""),
                    sql.Literal("" if columns is None else _text_array(columns)),
                    sql.Literal(_text_array(pk)),
                    sql.Literal(pk[0] if len(pk) == 1 else ""),
                ]
            ),
        }
        for op in OPERATIONS:
            names["trigger"] = _trigger_name(log, op)
            await conn.execute(_ddl(log, "ddl_drop_trigger", names))
            if op in operations:
                kind = "ddl_truncate" if op == "truncate" else f"ddl_{capture}_{op}"
                await conn.execute(_ddl(log, kind, names))
        await conn.execute(
            log.sql["register"],
            {
                "stream": table.key,
                "operations": list(operations),
                "columns": None if columns is None else json.dumps(list(columns)),
                "notify": notify,
                "capture": capture,
                "retention": retention,
            },
        )
    return table.key


async def remove(log: Log, table_arg: str | tuple[str, str]) -> None:
    """Drop a table's capture triggers and mark its capture removed (the log stays)."""
    db = log.db
    await db.ensure_migrated()
    async with db.connection() as conn, conn.transaction():
        table = await resolve(log, conn, table_arg, required=False)
        key = table.key if table is not None else await key_from_name(log, conn, table_arg)
        await conn.execute(log.sql["lock_capture"], {"key": advisory_key("capture", key)})
        if table is not None:
            names = {"table": sql.Identifier(table.schema, table.name)}
            for op in OPERATIONS:
                trigger = {"trigger": _trigger_name(log, op)}
                await conn.execute(_ddl(log, "ddl_drop_trigger", {**names, **trigger}))
        await conn.execute(log.sql["unregister"], {"stream": key})


def _trigger_name(log: Log, op: Operation) -> sql.Identifier:
    return sql.Identifier(log.db.schema + _TRIGGER_SUFFIX[op])


def _ddl(log: Log, block: str, names: dict[str, Any]) -> sql.Composed:
    return sql.SQL(log.ddl[block]).format(**names)  # type: ignore[arg-type,unused-ignore]


async def resolve(
    log: Log, conn: AsyncConnection[Any], arg: str | tuple[str, str], *, required: bool
) -> Table | None:
    """The table ``arg`` names now (None if there is none and it is not ``required``)."""
    try:
        if isinstance(arg, tuple):
            params = {"schema": arg[0], "name": arg[1]}
            cur = await conn.execute(log.sql["resolve_parts"], params)
        else:
            cur = await conn.execute(log.sql["resolve_name"], {"table": arg})
        row = await cur.fetchone()
    except (psycopg.errors.InvalidName, psycopg.errors.SyntaxError) as exc:
        raise InvalidArgumentError(f"invalid table name {arg!r}: {exc}") from exc
    if row is None:
        if required:
            raise InvalidArgumentError(f"table {arg!r} does not exist")
        return None
    if row[3] not in ("r", "p"):
        raise InvalidArgumentError(f"{row[4]} is not a table (relkind {row[3]!r})")
    return Table(int(row[0]), str(row[1]), str(row[2]), str(row[4]), str(row[3]), bool(row[5]))


async def key_from_name(log: Log, conn: AsyncConnection[Any], arg: str | tuple[str, str]) -> str:
    """The stream key ``arg`` names, whether or not the table (still) exists."""
    try:
        if isinstance(arg, tuple):
            cur = await conn.execute(log.sql["key_from_parts"], {"schema": arg[0], "name": arg[1]})
        else:
            cur = await conn.execute(log.sql["key_from_name"], {"table": arg})
        row = await cur.fetchone()
    except (psycopg.errors.InvalidName, psycopg.errors.SyntaxError) as exc:
        raise InvalidArgumentError(f"invalid table name {arg!r}: {exc}") from exc
    if row is None or row[0] is None:
        raise InvalidArgumentError(f"invalid table name {arg!r}")
    return str(row[0])


def check_table(table: object) -> str | tuple[str, str]:
    if isinstance(table, tuple):
        if len(table) != 2 or not all(
            isinstance(p, str) and 0 < len(p.encode()) <= 63 and "\x00" not in p for p in table
        ):
            raise InvalidArgumentError(
                f"table must be a name or a (schema, name) pair of identifiers, got {table!r}"
            )
        return (table[0], table[1])
    if not isinstance(table, str) or not table.strip() or "\x00" in table or len(table) > 300:
        raise InvalidArgumentError(f"table must be a non-empty name, got {table!r}")
    return table


def check_operations(operations: object) -> tuple[Operation, ...]:
    """Distinct operations, in the canonical order of ``OPERATIONS``."""
    if isinstance(operations, str) or not isinstance(operations, Sequence | set | frozenset):
        raise InvalidArgumentError(
            f"operations must be a sequence of {OPERATIONS}, got {operations!r}"
        )
    ops = tuple(operations)
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown or not ops or len(set(ops)) != len(ops):
        raise InvalidArgumentError(
            f"operations must be distinct values of {OPERATIONS}, got {operations!r}"
        )
    return tuple(op for op in OPERATIONS if op in ops)


def check_columns(columns: object) -> tuple[str, ...] | None:
    if columns is None:
        return None
    if isinstance(columns, str) or not isinstance(columns, Sequence):
        raise InvalidArgumentError(f"columns must be a sequence of names, got {columns!r}")
    cols = tuple(columns)
    if not cols or not all(isinstance(c, str) and c and "\x00" not in c for c in cols):
        raise InvalidArgumentError(f"columns must be non-empty names, got {columns!r}")
    if len(set(cols)) != len(cols):
        raise InvalidArgumentError(f"columns must be distinct, got {columns!r}")
    return cols
