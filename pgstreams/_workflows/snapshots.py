"""SnapshotStore: JSON snapshots by id in one PostgreSQL table.

The table is a versioned per-instance migration set (``sql/migrations/snapshots/``): the
default table is part of ``Database.migrate()``, any other is installed or upgraded on the
store's first use, under the schema's migration lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio

from .._core.errors import InvalidArgumentError
from .._core.validate import check_name, check_positive_int, to_json
from .._pg import queries
from .._pg.calls import fetchall, fetchone
from .._pg.database import Database, connect
from .._pg.migrate import DEFAULT_SNAPSHOT_TABLE, SNAPSHOTS, migrate_instance

__all__ = ["Snapshot", "SnapshotStore"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: str
    """As given to ``save`` (the store's ``prefix`` is kept apart)."""
    snapshot: dict[str, Any]
    updated_at: datetime


class SnapshotStore:
    """``save(id, snapshot)``, ``load(id)``, ``delete(id)``, ``list(prefix=, limit=)``
    (newest first). ``prefix`` namespaces every id of this store within the table. Given a
    DSN, the store opens (and ``close()`` closes) its own connections; given a Database,
    it leaves it open."""

    def __init__(
        self, db: Database | str, *, table: str = DEFAULT_SNAPSHOT_TABLE, prefix: str = ""
    ) -> None:
        if isinstance(db, str):
            self._dsn: str | None = db
            self._db: Database | None = None
        elif isinstance(db, Database):
            self._dsn, self._db = None, db
        else:
            raise InvalidArgumentError(f"expected a Database or a DSN, got {db!r}")
        self.table = check_name("snapshot table", table)
        if not isinstance(prefix, str) or "\x00" in prefix:
            raise InvalidArgumentError(f"prefix must be a str without NUL, got {prefix!r}")
        self.prefix = prefix
        self._sql: dict[str, bytes] = {}
        self._ready = False
        self._opening = anyio.Lock()

    async def _database(self) -> Database:
        async with self._opening:  # concurrent first calls open one Database, not several
            return await self._open()

    async def _open(self) -> Database:
        if self._db is None:
            assert self._dsn is not None
            self._db = await connect(self._dsn)
        if not self._ready:
            async with self._db.connection() as conn:
                await migrate_instance(conn, SNAPSHOTS, self._db.schema, self.table)
            names = SNAPSHOTS.names(self._db.schema, self.table)
            self._sql = queries.render(queries.load(__package__, "snapshots.sql"), names)
            self._ready = True
        return self._db

    def _key(self, id: object) -> dict[str, str]:
        if not isinstance(id, str) or not id or "\x00" in id:
            raise InvalidArgumentError(f"snapshot id must be a non-empty str, got {id!r}")
        return {"prefix": self.prefix, "id": id}

    async def save(self, id: str, snapshot: Mapping[str, Any]) -> None:
        """Store ``snapshot`` (a JSON object) under ``id``, replacing what was there."""
        key = self._key(id)
        if not isinstance(snapshot, Mapping):
            raise InvalidArgumentError(
                f"a snapshot must be a mapping, got {type(snapshot).__name__}"
            )
        text = to_json("snapshot", dict(snapshot))
        db = await self._database()
        await fetchall(db, self._sql["save"], {**key, "snapshot": text})

    async def load(self, id: str) -> dict[str, Any] | None:
        key = self._key(id)
        db = await self._database()
        row = await fetchone(db, self._sql["load"], key, allow_none=True, owner="snapshots")
        return None if row is None else row[0]

    async def delete(self, id: str) -> bool:
        """Delete the snapshot; False if there was none."""
        key = self._key(id)
        db = await self._database()
        rows = await fetchall(db, self._sql["delete"], key)
        return bool(rows)

    async def list(self, *, prefix: str = "", limit: int = 100) -> list[Snapshot]:
        """Snapshots whose id starts with ``prefix``, newest first, at most ``limit``."""
        if not isinstance(prefix, str):
            raise InvalidArgumentError(f"prefix must be a str, got {prefix!r}")
        check_positive_int("limit", limit)
        db = await self._database()
        params = {"prefix": self.prefix, "start": prefix, "limit": limit}
        rows = await fetchall(db, self._sql["list"], params)
        return [Snapshot(r[0], r[1], r[2]) for r in rows]

    async def close(self) -> None:
        """Close the connections this store opened itself (none if given a Database)."""
        if self._dsn is not None and self._db is not None:
            await self._db.close()
            self._db, self._ready = None, False

    async def __aenter__(self) -> SnapshotStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"SnapshotStore(table={self.table!r}, prefix={self.prefix!r})"
