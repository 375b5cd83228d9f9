"""Versioned migrations under one schema, applied under an advisory lock.

Each file ``sql/NNNN_name.sql`` is one migration. ``migrate()`` applies the missing ones in
order inside a single transaction that first takes a transaction-level advisory lock keyed
on the schema, so any number of processes may call it at once: one applies, the others wait
and then find nothing to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from psycopg import AsyncConnection, sql

__all__ = ["MIGRATIONS", "Migration", "advisory_key", "migrate"]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str


def _load() -> tuple[Migration, ...]:
    found = []
    for entry in resources.files("pgstreams").joinpath("sql", "migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return tuple(sorted(found, key=lambda m: m.version))


MIGRATIONS = _load()


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``parts`` (same in every process)."""
    digest = hashlib.blake2b(":".join(("pgstreams", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def migrate(
    conn: AsyncConnection[Any], schema: str, migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[int]:
    """Apply the missing ``migrations``; returns the versions applied by this call."""
    ident = sql.Identifier(schema)
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [advisory_key("migrate", schema)])
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_version ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
        cur = await conn.execute(sql.SQL("SELECT version FROM {}.schema_version").format(ident))
        done = {row[0] for row in await cur.fetchall()}
        for m in migrations:
            if m.version in done:
                continue
            await conn.execute(sql.SQL(m.text).format(schema=ident))  # type: ignore[arg-type,unused-ignore]
            await conn.execute(
                sql.SQL("INSERT INTO {}.schema_version (version, name) VALUES (%s, %s)").format(
                    ident
                ),
                [m.version, m.name],
            )
            applied_now.append(m.version)
    return applied_now
