"""Versioned migrations: the main set once per schema, per-instance sets once per instance.

* The main set, ``sql/migrations/NNNN_name.sql``, holds the objects one schema needs once
  (queue registry, change log, schedules, ...). Applied versions are rows of
  ``<schema>.schema_version``.
* A per-instance set, ``sql/migrations/<set>/NNNN_name.sql``, holds the objects the library
  creates once per instance of something: per queue (``queue``: the queue's table), per
  workflow table prefix (``workflows``: runs, steps, attempts) and per snapshot table
  (``snapshots``). Its files use placeholders besides ``{schema}`` (``{table}``, ``{runs}``,
  ...), filled in per instance with ``psycopg.sql`` identifiers. Applied versions are rows
  of ``<schema>.instance_version`` keyed by (set, instance, version).

Guarantees:

* Every migration of a schema runs in a transaction holding the advisory lock
  ``pgstreams:migrate:<schema>`` (see ``locks``), so any number of processes may migrate at
  once: one applies each version, the others wait and then find nothing to do. Each
  migration and its version row commit together.
* ``migrate()`` -- what ``Database.migrate()`` runs -- applies the main set, then upgrades
  every registered queue (each in its own transaction, also holding the queue's lock, so a
  queue being dropped is not brought back), the default workflow tables and the default
  snapshot table. Other instances are migrated by their owner on first use
  (``PgQueue.create``, ``PgWorkflowStorage``, ``SnapshotStore``) with the same runner.
* Tables that existed before they were versioned are adopted: every set's first migration
  is the DDL that used to create them, written ``IF NOT EXISTS``.
* An instance whose first table is gone (dropped) is treated as never installed: its
  records go and it is installed again when next migrated.
* A schema holding a version this library does not know -- written by a newer pgstreams --
  is refused with ``DatabaseError`` before anything is written.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

from psycopg import AsyncConnection, sql

from .._core.errors import DatabaseError
from .._core.progress import ProgressCallback, Reporter
from . import queries
from .locks import advisory_key

__all__ = [
    "MIGRATIONS",
    "QUEUES",
    "SETS",
    "SNAPSHOTS",
    "WORKFLOWS",
    "Applied",
    "Migration",
    "MigrationSet",
    "migrate",
    "migrate_instance",
    "migrate_main",
    "migrate_queue",
    "pending",
]

logger = logging.getLogger("pgstreams.migrate")

MAIN = "main"
DEFAULT_WORKFLOW_PREFIX = "wf_"
"""``PgWorkflowStorage``'s default table prefix: its tables are part of ``migrate()``."""
DEFAULT_SNAPSHOT_TABLE = "snapshots"
"""``SnapshotStore``'s default table: part of ``migrate()``."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str


@dataclass(frozen=True, slots=True)
class MigrationSet:
    """Numbered migrations applied once per instance (a queue, a table prefix, ...)."""

    name: str
    migrations: tuple[Migration, ...]
    names: Callable[[str, str], dict[str, sql.Composable]]
    """(schema, instance) -> the placeholders of the set's files, besides ``{schema}``."""
    table: Callable[[str], str]
    """instance -> its first table, whose absence means the instance is not installed."""


class Applied(NamedTuple):
    """One migration applied by a call: the main set's (instance ``""``) or an instance's."""

    migration_set: str
    instance: str
    version: int


def _load(folder: str | None = None) -> tuple[Migration, ...]:
    base = resources.files("pgstreams").joinpath("sql", "migrations")
    if folder is not None:
        base = base.joinpath(folder)
    found = []
    for entry in base.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return tuple(sorted(found, key=lambda m: m.version))


def _queue_names(schema: str, name: str) -> dict[str, sql.Composable]:
    return {
        "table": sql.Identifier(schema, f"q_{name}"),
        "ready_idx": sql.Identifier(f"q_{name}_ready"),
        "dead_idx": sql.Identifier(f"q_{name}_dead"),
    }


def _workflow_names(schema: str, prefix: str) -> dict[str, sql.Composable]:
    return {
        "runs": sql.Identifier(schema, f"{prefix}runs"),
        "runs_open": sql.Identifier(f"{prefix}runs_open"),
        "runs_ended": sql.Identifier(f"{prefix}runs_ended"),
        "steps": sql.Identifier(schema, f"{prefix}steps"),
        "attempts": sql.Identifier(schema, f"{prefix}attempts"),
    }


def _snapshot_names(schema: str, table: str) -> dict[str, sql.Composable]:
    return {
        "table": sql.Identifier(schema, table),
        "index": sql.Identifier(f"{table}_updated_at"),
    }


MIGRATIONS = _load()
"""The main set, in version order."""
QUEUES = MigrationSet("queue", _load("queue"), _queue_names, lambda name: f"q_{name}")
WORKFLOWS = MigrationSet(
    "workflows", _load("workflows"), _workflow_names, lambda prefix: f"{prefix}runs"
)
SNAPSHOTS = MigrationSet("snapshots", _load("snapshots"), _snapshot_names, lambda table: table)
SETS: Mapping[str, MigrationSet] = {s.name: s for s in (QUEUES, WORKFLOWS, SNAPSHOTS)}
_DEFAULT_INSTANCES = ((WORKFLOWS, DEFAULT_WORKFLOW_PREFIX), (SNAPSHOTS, DEFAULT_SNAPSHOT_TABLE))
"""The instances ``migrate()`` installs besides the registered queues."""

_KNOWN: Mapping[str, frozenset[int]] = {
    MAIN: frozenset(m.version for m in MIGRATIONS),
    **{s.name: frozenset(m.version for m in s.migrations) for s in SETS.values()},
}


@functools.lru_cache(maxsize=64)
def _sql(schema: str) -> dict[str, bytes]:
    return queries.render(
        queries.load(__package__, "migrate.sql"), {"schema": sql.Identifier(schema)}
    )


async def migrate(
    conn: AsyncConnection[Any],
    schema: str,
    *,
    upto: Mapping[str, int] | None = None,
    progress: ProgressCallback | None = None,
) -> list[Applied]:
    """Install or upgrade everything ``Database.migrate()`` covers (see module docstring);
    returns what this call applied. ``upto`` (set name or ``"main"`` -> last version to
    apply) stops sets short, as an older release would. ``progress`` is called once
    before the first migration and after each one is applied (``Progress.total``: what
    was pending when the call began); each set's migrations commit after their reports."""
    limit = dict(upto or {})
    report = Reporter("migrate", progress, logger, f"migrate {schema}", "migrations")
    await report.start(await pending(conn, schema, upto=limit))
    applied = await migrate_main(conn, schema, upto=limit.get(MAIN), report=report)
    q = _sql(schema)
    queues = sql.Identifier(schema, "queues").as_string(conn)
    cur = await conn.execute(q["has_queues"], {"table": queues})
    row = await cur.fetchone()
    if row is not None and row[0]:
        cur = await conn.execute(q["queues"])
        for (name,) in await cur.fetchall():
            applied += await migrate_queue(
                conn, schema, name, upto=limit.get(QUEUES.name), report=report
            )
    for mset, instance in _DEFAULT_INSTANCES:
        applied += await migrate_instance(
            conn, mset, schema, instance, upto=limit.get(mset.name), report=report
        )
    await report.finish()
    return applied


async def pending(
    conn: AsyncConnection[Any], schema: str, *, upto: Mapping[str, int] | None = None
) -> int:
    """How many migrations ``migrate()`` would apply now (it only reads; another process
    may apply some of them first)."""
    limit = dict(upto or {})
    q = _sql(schema)

    async def exist(tables: list[str]) -> list[bool]:
        names = [sql.Identifier(schema, t).as_string(conn) for t in tables]
        cur = await conn.execute(q["tables_exist"], {"tables": names})
        return [bool(r[0]) for r in await cur.fetchall()]

    def wanted(set_name: str, migrations: tuple[Migration, ...]) -> set[int]:
        last = limit.get(set_name)
        return {m.version for m in migrations if last is None or m.version <= last}

    has_main, has_instances, has_queues = await exist(
        ["schema_version", "instance_version", "queues"]
    )
    main_done: set[int] = set()
    if has_main:
        cur = await conn.execute(q["main_versions"])
        main_done = {int(r[0]) for r in await cur.fetchall()}
    count = len(wanted(MAIN, MIGRATIONS) - main_done)
    instances: list[tuple[MigrationSet, str]] = []
    if has_queues:
        cur = await conn.execute(q["queues"])
        instances += [(QUEUES, str(r[0])) for r in await cur.fetchall()]
    instances += _DEFAULT_INSTANCES
    done: dict[tuple[str, str], set[int]] = {}
    if has_instances:
        cur = await conn.execute(q["instance_versions"])
        for set_name, instance, version in await cur.fetchall():
            done.setdefault((set_name, instance), set()).add(int(version))
    present = await exist([mset.table(instance) for mset, instance in instances])
    for (mset, instance), table_exists in zip(instances, present, strict=True):
        recorded = done.get((mset.name, instance), set())
        # Unrecorded (adopted or new) or its table dropped: every migration runs.
        skip = recorded if recorded and table_exists else set()
        count += len(wanted(mset.name, mset.migrations) - skip)
    return count


async def migrate_main(
    conn: AsyncConnection[Any],
    schema: str,
    migrations: tuple[Migration, ...] = MIGRATIONS,
    *,
    upto: int | None = None,
    report: Reporter | None = None,
) -> list[Applied]:
    """Apply the missing main-set ``migrations`` (up to version ``upto``), in one
    transaction; refuses first if the schema holds any version this library does not know
    (in any set)."""
    q = _sql(schema)
    applied = []
    async with conn.transaction():
        await _prepare(conn, schema, main=True)
        cur = await conn.execute(q["recorded"])
        recorded = await cur.fetchall()
        _refuse_unknown(schema, recorded)
        done = {version for set_name, _, version, _ in recorded if set_name == MAIN}
        for m in migrations:
            if m.version in done or (upto is not None and m.version > upto):
                continue
            await conn.execute(sql.SQL(m.text).format(schema=sql.Identifier(schema)))  # type: ignore[arg-type,unused-ignore]
            await conn.execute(q["record_main"], {"version": m.version, "name": m.name})
            applied.append(Applied(MAIN, "", m.version))
            if report is not None:
                await report.advance(1, f"{m.version:04d}_{m.name}")
    return applied


async def migrate_queue(
    conn: AsyncConnection[Any],
    schema: str,
    name: str,
    *,
    upto: int | None = None,
    report: Reporter | None = None,
) -> list[Applied]:
    """Upgrade the table of registered queue ``name`` under the queue's lock, in its own
    transaction (a queue dropped meanwhile is left alone)."""
    q = _sql(schema)
    async with conn.transaction():
        await conn.execute(q["lock"], {"key": advisory_key("queue", schema, name)})
        cur = await conn.execute(q["queue_registered"], {"name": name})
        row = await cur.fetchone()
        if row is None or not row[0]:
            return []
        return await migrate_instance(conn, QUEUES, schema, name, upto=upto, report=report)


async def migrate_instance(
    conn: AsyncConnection[Any],
    mset: MigrationSet,
    schema: str,
    instance: str,
    *,
    upto: int | None = None,
    report: Reporter | None = None,
) -> list[Applied]:
    """Install or upgrade one instance of ``mset`` in ``schema`` (up to version ``upto``),
    in one transaction (a savepoint inside the caller's); the caller validated
    ``instance``."""
    q = _sql(schema)
    key = {"set": mset.name, "instance": instance}
    applied = []
    async with conn.transaction():
        await _prepare(conn, schema, main=False)
        table = sql.Identifier(schema, mset.table(instance)).as_string(conn)
        cur = await conn.execute(q["instance"], {**key, "table": table})
        rows = await cur.fetchall()
        _refuse_unknown(schema, [(mset.name, instance, r[0], r[1]) for r in rows])
        done = {r[0] for r in rows}
        if rows and not rows[0][2]:  # its table was dropped: install it again
            await conn.execute(q["forget"], key)
            done = set()
        names = {"schema": sql.Identifier(schema), **mset.names(schema, instance)}
        for m in mset.migrations:
            if m.version in done or (upto is not None and m.version > upto):
                continue
            await conn.execute(sql.SQL(m.text).format(**names))  # type: ignore[arg-type,unused-ignore]
            await conn.execute(q["record_instance"], {**key, "version": m.version, "name": m.name})
            applied.append(Applied(mset.name, instance, m.version))
            if report is not None:
                await report.advance(1, f"{mset.name} {instance}: {m.version:04d}_{m.name}")
    return applied


async def _prepare(conn: AsyncConnection[Any], schema: str, *, main: bool) -> None:
    """Take the schema's migration lock, then make sure its version tables exist (only
    ``instance_version`` unless ``main``)."""
    q = _sql(schema)
    await conn.execute(q["lock"], {"key": advisory_key("migrate", schema)})
    await conn.execute(q["bootstrap_main" if main else "bootstrap_instance"])


def _refuse_unknown(schema: str, recorded: list[Any]) -> None:
    """Raise if a recorded (set, instance, version, name) is not one this library knows."""
    unknown = [r for r in recorded if r[2] not in _KNOWN.get(r[0], ())]
    if not unknown:
        return
    found = ", ".join(
        f"{s} {v:04d}_{n}" if s == MAIN else f"{s} {i!r} {v:04d}_{n}" for s, i, v, n in unknown
    )
    from .. import __version__

    raise DatabaseError(
        f"schema {schema!r} holds migrations this pgstreams ({__version__}) does not know:"
        f" {found}. A newer pgstreams migrated it; upgrade pgstreams to use this database."
        " Nothing was changed."
    )
