"""``pgstreams migrate`` and ``pgstreams status`` (which only reads)."""

from __future__ import annotations

import argparse
import functools
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection, sql

from .._core.errors import DatabaseError
from .._pg import queries
from .._pg.database import Database
from .._pg.migrate import DEFAULT_WORKFLOW_PREFIX, MIGRATIONS, WORKFLOWS
from .._sources.changes import consumers as trigger_consumers
from .._sources.changes.log import Log
from .._sources.pgmq.queue import PgmqQueue
from .._sources.queue.queue import PgQueue
from .output import UsageError, age, emit, table
from .progress import progress_line

__all__ = [
    "consumer_rows",
    "installed",
    "migrate",
    "pgqueue_names",
    "require_current",
    "require_workflow_tables",
    "statements",
    "status",
]


def statements(db: Database) -> dict[str, bytes]:
    return _statements(db.schema)


@functools.lru_cache(maxsize=8)
def _statements(schema: str) -> dict[str, bytes]:
    """queries.sql rendered for ``schema`` (once per schema)."""
    return queries.render(
        queries.load(__package__),
        {
            "schema": sql.Identifier(schema),
            "runs": sql.Identifier(schema, f"{DEFAULT_WORKFLOW_PREFIX}runs"),
        },
    )


async def _exists(conn: AsyncConnection[Any], db: Database, table: str) -> bool:
    cur = await conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", [sql.Identifier(db.schema, table).as_string(conn)]
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _first_column(db: Database, table: str, statement: str) -> list[Any]:
    """The first column of ``statement``'s rows; none if the library's ``table`` is
    missing (nothing installed yet)."""
    async with db.connection() as conn:
        if not await _exists(conn, db, table):
            return []
        cur = await conn.execute(statements(db)[statement])
        return [r[0] for r in await cur.fetchall()]


async def installed(db: Database) -> list[int]:
    """The main set's applied versions (empty: the library is not installed)."""
    return [int(v) for v in await _first_column(db, "schema_version", "applied_versions")]


async def require_current(db: Database) -> None:
    """Refuse a command that would otherwise install or upgrade the library's tables."""
    applied = set(await installed(db))
    pending = [m for m in MIGRATIONS if m.version not in applied]
    if not applied:
        raise DatabaseError(
            f"pgstreams is not installed in schema {db.schema!r}: run `pgstreams migrate`"
        )
    if pending:
        raise DatabaseError(
            f"schema {db.schema!r} has {len(pending)} migration(s) pending: run `pgstreams migrate`"
        )


async def require_workflow_tables(db: Database, prefix: str) -> None:
    """Refuse unless the workflow tables with ``prefix`` exist and are current (so that a
    command never installs or upgrades them)."""
    await require_current(db)
    async with db.connection() as conn:
        if not await _exists(conn, db, f"{prefix}runs"):
            raise UsageError(f"no workflow tables {db.schema}.{prefix}* (see --prefix)")
        cur = await conn.execute(
            statements(db)["instance_versions"], {"set": WORKFLOWS.name, "instance": prefix}
        )
        applied = {int(r[0]) for r in await cur.fetchall()}
    if any(m.version not in applied for m in WORKFLOWS.migrations):
        how = (
            "run `pgstreams migrate`"
            if prefix == DEFAULT_WORKFLOW_PREFIX
            else "start your application's engine once, or call PgWorkflowStorage.migrate()"
        )
        raise DatabaseError(f"the workflow tables {db.schema}.{prefix}* are out of date: {how}")


async def migrate(db: Database, args: argparse.Namespace) -> int:
    before = set(await installed(db))
    with progress_line(args) as line:
        await db.migrate(progress=line)
    after = await installed(db)
    applied = [v for v in after if v not in before]
    names = {m.version: m.name for m in MIGRATIONS}
    emit(
        args,
        {"schema": db.schema, "version": max(after, default=0), "applied": applied},
        f"schema {db.schema}: version {max(after, default=0)}"
        + (
            "; applied " + ", ".join(f"{v:04d}_{names.get(v, '?')}" for v in applied)
            if applied
            else "; nothing to apply"
        ),
    )
    return 0


async def status(db: Database, args: argparse.Namespace) -> int:
    applied = await installed(db)
    pending = [m for m in MIGRATIONS if m.version not in set(applied)]
    data: dict[str, Any] = {
        "schema": db.schema,
        "version": max(applied, default=0),
        "pending_migrations": [f"{m.version:04d}_{m.name}" for m in pending],
    }
    lines = [f"schema {db.schema}: " + _version_line(applied, pending)]
    if applied:
        sections = (
            ("queues", _queues),
            ("change consumers", consumer_rows),
            ("schedules", _schedules),
            ("workflows", _workflows),
        )
        for title, read in sections:
            headers, rows = await read(db)
            data[title.replace(" ", "_")] = [dict(zip(headers, r, strict=True)) for r in rows]
            lines += ["", f"{title}:", table(headers, rows) if rows else "  (none)"]
    emit(args, data, "\n".join(lines))
    return 0


def _version_line(applied: list[int], pending: list[Any]) -> str:
    if not applied:
        return "not installed (run `pgstreams migrate`)"
    line = f"version {max(applied)}"
    if pending:
        line += f", {len(pending)} migration(s) pending (run `pgstreams migrate`)"
    return line


Rows = tuple[list[str], list[list[Any]]]


async def pgqueue_names(db: Database) -> list[str]:
    """The PgQueue queues (none if the library is not installed)."""
    return [str(v) for v in await _first_column(db, "queues", "queues")]


async def _queues(db: Database) -> Rows:
    now = datetime.now(UTC)
    rows: list[list[Any]] = []
    names = await pgqueue_names(db)
    async with db.connection() as conn:
        oldest = {}
        for name in names:
            cur = await conn.execute(
                sql.SQL("SELECT min(enqueued_at) FROM {} WHERE dead_at IS NULL").format(
                    sql.Identifier(db.schema, f"q_{name}")
                )
            )
            row = await cur.fetchone()
            oldest[name] = row[0] if row else None
    for name in names:
        m = await PgQueue(db, name).metrics()
        rows.append(["pgqueue", name, m.pending, m.processing, m.dead, age(oldest[name], now)])
    for name in await PgmqQueue.list(db):
        pm = await PgmqQueue(db, name).metrics()
        in_flight = pm.queue_length - pm.visible
        oldest_age = None if pm.oldest_age is None else f"{pm.oldest_age}s"
        rows.append(["pgmq", name, pm.visible, in_flight, pm.dead, oldest_age])
    return ["kind", "name", "pending", "in_flight", "dead", "oldest"], rows


async def consumer_rows(db: Database) -> Rows:
    """Every durable change consumer: trigger capture's (with their lag in changes and
    seconds) and WAL capture's slots (lag in bytes, retained WAL, ``wal_status``)."""
    headers = ["capture", "stream", "consumer", "lag", "retained_bytes", "wal_status", "active"]
    rows: list[list[Any]] = []
    log = Log.of(db)
    trigger: list[tuple[str, str]] = []
    async with db.connection() as conn:
        if await _exists(conn, db, "change_consumers"):
            cur = await conn.execute(statements(db)["trigger_consumers"])
            trigger = [(str(r[0]), str(r[1])) for r in await cur.fetchall()]
        cur = await conn.execute(statements(db)["wal_slots"])
        slots = await cur.fetchall()
    for stream, name in trigger:
        lag = await trigger_consumers.lag(log, stream, name)
        rows.append(
            [
                "trigger",
                stream,
                name,
                f"{lag.changes} changes, {lag.seconds:.0f}s",
                None,
                None,
                None,
            ]
        )
    for slot, _db, active, wal_status, retained, lag_bytes, _confirmed in slots:
        rows.append(["wal", None, slot, f"{lag_bytes} bytes", retained, wal_status, active])
    return headers, rows


async def _schedules(db: Database) -> Rows:
    async with db.connection() as conn:
        cur = await conn.execute(statements(db)["schedules"])
        found = await cur.fetchall()
        cur = await conn.execute(
            sql.SQL("SELECT alive_at FROM {}").format(sql.Identifier(db.schema, "scheduler_state"))
        )
        alive = await cur.fetchone()
    leader = None if alive is None or alive[0] is None else f"leader seen {alive[0]:%H:%M:%S}"
    rows = [[r[0], r[1], "paused" if r[2] else "active", r[3], leader] for r in found]
    return ["id", "every", "state", "next_fire", "leader"], rows


async def _workflows(db: Database) -> Rows:
    async with db.connection() as conn:
        if not await _exists(conn, db, f"{DEFAULT_WORKFLOW_PREFIX}runs"):
            return ["status", "runs", "oldest_running"], []
        cur = await conn.execute(statements(db)["workflow_counts"])
        found = await cur.fetchall()
    now = datetime.now(UTC)
    return ["status", "runs", "oldest_running"], [[r[0], r[1], age(r[2], now)] for r in found]
