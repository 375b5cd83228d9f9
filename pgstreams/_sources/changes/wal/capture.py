"""``PgChangeStream(..., capture="wal")``: what the stream does in WAL mode.

Every subscription checks the setup first -- ``wal_level``, the REPLICATION attribute, the
tables and their replica identity, a free slot -- and only then creates anything (the
library's schema, the publication, the slot).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal

from psycopg import AsyncConnection, sql

from ...._core.errors import InvalidArgumentError
from ...._core.progress import ProgressCallback
from ...._core.stream import Stream
from ...._core.validate import check_positive_int, check_seconds, to_json
from ...._pg.database import Database
from ..capture import Operation
from ..change import Change
from . import setup, slots, snapshot
from .reader import NOTIFY_PREFIX, Deferred, Reader, Settings, Shared
from .setup import WalTarget

__all__ = ["OnSlotLost", "WalCapture"]

OnSlotLost = Literal["raise", "resnapshot"]
DEFAULT_CHUNK = 1000


class WalCapture:
    def __init__(
        self,
        db: Database,
        tables: Sequence[str | tuple[str, str]],
        operations: tuple[Operation, ...],
        *,
        heartbeat: float,
        retained_warning: int | None,
    ) -> None:
        self._db = db
        self._tables = tuple(tables)
        self._operations = operations
        self._heartbeat = check_seconds("heartbeat", heartbeat, allow_zero=False)
        if retained_warning is not None:
            check_positive_int("retained_warning", retained_warning)
        self._retained_warning = retained_warning
        self._target: WalTarget | None = None

    async def target(self, conn: AsyncConnection[Any] | None = None) -> WalTarget:
        """The tables, resolved once (checking the server first)."""
        if self._target is None:
            if conn is None:
                async with self._db.connection() as own:
                    return await self.target(own)
            await setup.check_server(conn)
            self._target = await setup.resolve_tables(
                self._db, conn, self._tables, self._operations
            )
        return self._target

    async def key(self) -> str:
        return ", ".join(t.key for t in (await self.target()).tables)

    def subscribe(
        self,
        consumer: str | None,
        snapshot_rows: bool,
        on_slot_lost: OnSlotLost,
        chunk_size: int,
        progress: ProgressCallback | None = None,
    ) -> Stream[Change[Any]]:
        if consumer is not None:
            setup.check_consumer_name(consumer)
        if on_slot_lost not in ("raise", "resnapshot"):
            raise InvalidArgumentError(
                f"on_slot_lost must be 'raise' or 'resnapshot', got {on_slot_lost!r}"
            )
        if on_slot_lost == "resnapshot" and consumer is None:
            raise InvalidArgumentError("on_slot_lost='resnapshot' needs a durable consumer")
        if snapshot_rows and consumer is None:
            raise InvalidArgumentError(
                "snapshot=True needs a durable consumer: its progress is kept with the slot"
            )
        if progress is not None and consumer is None:
            raise InvalidArgumentError(
                "progress reports snapshots, which need a durable consumer (snapshot=True,"
                " on_slot_lost='resnapshot', or an interrupted snapshot resuming)"
            )
        check_positive_int("chunk_size", chunk_size)
        settings = Settings(
            consumer,
            snapshot_rows,
            on_slot_lost,
            self._heartbeat,
            self._retained_warning,
            chunk_size,
            progress,
        )
        shared = Shared()
        if consumer is None:
            return Stream(lambda: self._run(settings, shared))

        async def rewind(items: list[Any]) -> None:
            shared.rewound = True  # nothing handed out after them is confirmed

        # Deferred commits, unless a snapshot may run (its progress goes by handled rows).
        resnapshot = snapshot_rows or on_slot_lost == "resnapshot"
        return Stream(
            lambda: self._run(settings, shared),
            putback=rewind,
            checkpoint=None if resnapshot else Deferred(shared),
            sequential=(
                f"WAL consumer {consumer!r} confirms a transaction when the change after it"
                " is asked for; use batch/buffer/concurrency on a stream without a consumer,"
                " or handle each change before asking for the next"
            ),
        )

    def _run(self, settings: Settings, shared: Shared) -> AsyncGenerator[Change[Any], None]:
        return Reader(self._db, lambda: self._prepare(settings), settings, shared).changes()

    async def _prepare(self, settings: Settings) -> WalTarget:
        """Check everything, then create the schema and the publication."""
        async with self._db.connection() as conn:
            target = await self.target(conn)
            if settings.snapshot or settings.on_slot_lost == "resnapshot":
                snapshot.check_keys(target)
            slot = None if settings.consumer is None else target.slot(settings.consumer)
            if slot is None or await slots.state(conn, slot) is None:
                await setup.check_slot_room(conn)
            await setup.check_sender_room(conn)
            await setup.check_may_publish(conn, self._db, target)
        await self._db.ensure_migrated()
        async with self._db.connection() as conn:
            await setup.ensure_publication(conn, target)
        return target

    async def notify(self, payload: Any, conn: AsyncConnection[Any] | None) -> int:
        text = to_json("payload", payload)
        target = await self.target()
        query = (
            "SELECT (pg_catalog.pg_logical_emit_message(true, %s, convert_to(%s, 'UTF8'))"
            " - '0/0'::pg_lsn)::int8"
        )
        params = [NOTIFY_PREFIX + target.publication, text]
        if conn is not None:
            cur = await conn.execute(query, params)
            row = await cur.fetchone()
        else:
            async with self._db.connection() as own:
                cur = await own.execute(query, params)
                row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def add_consumer(self, consumer: str) -> None:
        """Create the consumer's slot now, unless it exists: its first subscription then
        starts from this moment rather than its own."""
        setup.check_consumer_name(consumer)
        settings = Settings(
            consumer, False, "raise", self._heartbeat, self._retained_warning, DEFAULT_CHUNK
        )
        target = await self._prepare(settings)
        slot = target.slot(consumer)
        async with self._db.connection() as conn:
            if await slots.state(conn, slot) is None:
                await snapshot.finish(conn, self._db.schema, slot)
                await slots.create(conn, slot)

    async def consumers(self) -> list[slots.ConsumerInfo]:
        target = await self.target()
        async with self._db.connection() as conn:
            return await slots.consumer_infos(conn, target)

    async def drop_consumer(self, consumer: str) -> None:
        setup.check_consumer_name(consumer)
        target = await self.target()
        slot = target.slot(consumer)
        async with self._db.connection() as conn:
            if not await slots.drop(conn, slot):
                raise InvalidArgumentError(
                    f"consumer {consumer!r} is streaming now (slot {slot} is active): stop it first"
                )
            cur = await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL",
                [sql.Identifier(self._db.schema, "wal_snapshots").as_string(conn)],
            )
            row = await cur.fetchone()
            if row is not None and row[0]:
                await snapshot.finish(conn, self._db.schema, slot)
