"""Helpers of the migration tests: a database as an older pgstreams left it, its schema as
``pg_dump`` prints it, and its rows."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import sql

from pgstreams._pg import queries
from pgstreams._pg.embedded import find_bindir
from pgstreams._pg.migrate import MIGRATIONS, QUEUES, SNAPSHOTS, WORKFLOWS

LEGACY_MAIN = 5
"""The main set's last version when the per-instance tables were not versioned yet."""

LEGACY = queries.parse((Path(__file__).parent / "legacy.sql").read_text(), where="legacy.sql")

Conn = psycopg.AsyncConnection[Any]

_SERVER_TAG = re.compile(r"^ALTER TABLE ONLY \S+ ALTER COLUMN \S+ SET \(pg_attver=\d+\);$")
"""A per-column option some server builds set on every column they create, different in
every database: not part of the schema the library made."""


async def schema_dump(dsn: str, schema: str | None = None) -> str:
    """``pg_dump --schema-only`` of the database (or of one schema, its name replaced by
    ``S``), without comments, blank lines or the random ``\\restrict`` key: equal text
    means equal tables, columns, defaults, constraints, indexes, functions and triggers."""
    command = [os.path.join(find_bindir(), "pg_dump"), "--schema-only", "--no-owner"]
    command += ["--no-privileges", "--dbname", dsn]
    if schema is not None:
        command += ["--schema", schema]
    done = await anyio.run_process(command)
    lines = []
    for line in done.stdout.decode().splitlines():
        if not line.strip() or line.startswith(("--", "\\restrict", "\\unrestrict")):
            continue
        if _SERVER_TAG.search(line):
            continue
        lines.append(line.replace(schema, "S") if schema is not None else line)
    return "\n".join(lines)


def _run(block: str, names: Mapping[str, sql.Composable]) -> sql.Composed:
    return sql.SQL(LEGACY[block]).format(**names)  # type: ignore[arg-type,unused-ignore]


async def legacy_install(
    conn: Conn,
    schema: str = "pgstreams",
    *,
    queues: Iterable[str] = (),
    workflows: Iterable[tuple[str, str]] = (),
    snapshots: Iterable[str] = (),
    data: bool = False,
) -> None:
    """What the library before versioned instances left: the main set up to LEGACY_MAIN,
    recorded as its runner did, and the given queues, workflow (schema, prefix) tables and
    snapshot tables made by their inline DDL, unrecorded. ``data``: rows in every table."""
    ident = sql.Identifier(schema)
    await conn.execute(_run("runner", {"schema": ident}))
    for m in MIGRATIONS:
        if m.version <= LEGACY_MAIN:
            await conn.execute(sql.SQL(m.text).format(schema=ident))  # type: ignore[arg-type,unused-ignore]
            await conn.execute(
                sql.SQL("INSERT INTO {}.schema_version (version, name) VALUES (%s, %s)").format(
                    ident
                ),
                [m.version, m.name],
            )
    if data:
        await conn.execute(_run("main_data", {"schema": ident}))
    for name in queues:
        names = {"schema": ident, "name": sql.Literal(name), **QUEUES.names(schema, name)}
        await conn.execute(_run("queue", names))
        if data:
            await conn.execute(_run("queue_data", names))
    for wf_schema, prefix in workflows:
        names = {"schema": sql.Identifier(wf_schema), **WORKFLOWS.names(wf_schema, prefix)}
        await conn.execute(_run("workflows", names))
        if data:
            await conn.execute(_run("workflow_data", names))
    for table in snapshots:
        names = {"schema": ident, **SNAPSHOTS.names(schema, table)}
        await conn.execute(_run("snapshots", names))
        if data:
            await conn.execute(_run("snapshot_data", names))


_BOOKKEEPING = ("schema_version", "instance_version")


async def all_rows(conn: Conn, schemas: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table in ``schemas`` (but the version tables), as JSON objects,
    in a stable order; keyed by ``schema.table``."""
    cur = await conn.execute(
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname = ANY(%s)"
        " AND tablename <> ALL(%s) ORDER BY 1, 2",
        [list(schemas), list(_BOOKKEEPING)],
    )
    found = {}
    for schema, table in await cur.fetchall():
        cur = await conn.execute(
            sql.SQL("SELECT to_jsonb(t) FROM {} t").format(sql.Identifier(schema, table))
        )
        rows = [r[0] for r in await cur.fetchall()]
        found[f"{schema}.{table}"] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    return found


def kept(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``after``'s rows reduced to the columns ``before``'s had (new columns aside), in
    ``before``'s order."""
    columns = set().union(*before) if before else set()
    reduced = [{k: v for k, v in row.items() if k in columns} for row in after]
    return sorted(reduced, key=lambda r: json.dumps(r, sort_keys=True))


async def held_keys(dsn: str, *, granted: bool = True) -> list[int]:
    """The 64-bit advisory locks held (or waited for) in the database, as keys."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT l.classid::bigint << 32 | l.objid::bigint FROM pg_locks l"
            " WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted = %s"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [granted],
        )
        return [int(r[0]) for r in await cur.fetchall()]


async def at_once(dsn: str, n: int, key: int, fn: Callable[[Conn], Awaitable[Any]]) -> list[Any]:
    """Run ``fn`` on ``n`` connections at once: all of them are made to wait for the
    advisory lock ``key`` first (it is held until every one waits), then it is let go."""
    results: list[Any] = []

    async def one() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            results.append(await fn(c))

    async with await psycopg.AsyncConnection.connect(dsn) as holder:
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", [key])
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
            await lock_waiters(dsn, key, n)
            await holder.commit()
    return results


async def lock_waiters(dsn: str, key: int, n: int = 1) -> None:
    """Return once ``n`` sessions wait for the advisory lock ``key``."""
    while (await held_keys(dsn, granted=False)).count(key) < n:  # noqa: ASYNC110 - pg_locks has no event
        await anyio.sleep(0.01)
