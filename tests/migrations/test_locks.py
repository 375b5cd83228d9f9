"""One advisory-lock key scheme: the same key in Python and SQL, and the locks the library
takes show in pg_locks under the keys the documentation gives."""

from __future__ import annotations

import anyio
import psycopg
import pytest
from psycopg import sql

import pgstreams as ps
from pgstreams._pg.locks import KEY_SQL, advisory_key, lock_text
from pgstreams._pg.migrate import migrate

from .support import held_keys, lock_waiters


@pytest.mark.parametrize(
    "parts",
    [
        ("migrate", "pgstreams"),
        ("queue", "pgstreams", "jobs"),
        ("run", "wfs", "", "order:42/é€😀"),
        ("capture", 'public."Weird Table"'),
    ],
)
async def test_a_key_is_the_same_in_python_and_on_the_server(
    dsn: str, parts: tuple[str, ...]
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT " + KEY_SQL).format(sql.Literal(lock_text(*parts)))  # type: ignore[arg-type,unused-ignore]
        )
        assert await cur.fetchone() == (advisory_key(*parts),)


def test_the_key_is_pinned() -> None:
    """Processes of different versions must agree on every key: it never changes."""
    assert lock_text("migrate", "pgstreams") == "pgstreams:migrate:pgstreams"
    assert advisory_key("scheduler", "pgstreams") == -5229739707648200740


async def test_migrations_wait_for_the_schema_lock(dsn: str) -> None:
    key = advisory_key("migrate", "locked_schema")
    async with await psycopg.AsyncConnection.connect(dsn) as holder:
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", [key])  # opens a transaction
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(migrate, conn, "locked_schema")
            await lock_waiters(dsn, key)
            await holder.commit()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM locked_schema.schema_version")
        row = await cur.fetchone()
        assert row is not None and row[0] > 0


async def test_a_run_lock_is_held_under_its_documented_key(db: ps.Database, dsn: str) -> None:
    storage = ps.PgWorkflowStorage(db, schema="lock_wf", table_prefix="p_")
    try:
        # Taken by the claim statement (on the server) ...
        await storage.create_run("order:1", "wf", None)
        run = await storage.claim_run(["wf"], "me", 30)
        assert run is not None and run.workflow_id == "order:1"
        assert await storage.lock_run("order:1", "me", 30)
        assert advisory_key("run", "lock_wf", "p_", "order:1") in await held_keys(dsn)
        await storage.unlock_run("order:1", "me")
        assert advisory_key("run", "lock_wf", "p_", "order:1") not in await held_keys(dsn)
        # ... or by lock_run itself.
        await storage.create_run("order:2", "other", None)
        assert await storage.lock_run("order:2", "me", 30)
        assert advisory_key("run", "lock_wf", "p_", "order:2") in await held_keys(dsn)
        await storage.unlock_run("order:2", "me")
    finally:
        await storage.close()
