"""connect() and Database ownership (LISTEN: test_listen.py; migrations: tests/migrations)."""

from __future__ import annotations

import uuid

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

import pgstreams as ps

from ..pgserver import terminate_backends


async def test_async_with_and_await_forms(dsn: str) -> None:
    async with ps.connect(dsn) as db, db.connection() as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
    assert db.pool is not None and db.pool.closed
    db2 = await ps.connect(dsn)
    try:
        async with db2.connection() as conn:
            await conn.execute("SELECT 1")
    finally:
        await db2.close()
    assert db2.pool is not None and db2.pool.closed


async def test_connect_reads_environment(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSTREAMS_DSN", dsn)
    async with ps.connect() as db, db.connection() as conn:
        cur = await conn.execute("SELECT current_database()")
        row = await cur.fetchone()
    assert row is not None and row[0] in dsn


async def test_passed_pool_is_never_closed(dsn: str) -> None:
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False) as pool:
        async with ps.connect(pool) as db:
            q = await ps.PgQueue.create(db, "owned_pool")
            await q.publish(1)
            assert await q.subscribe().first() == 1
        assert not pool.closed
        async with pool.connection() as conn:
            # Connections we borrowed went back as we found them (not in autocommit).
            assert conn.autocommit is False
            await conn.execute("SELECT 1")


async def test_passed_connection_is_never_closed(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with ps.connect(conn) as db:
            q = await ps.PgQueue.create(db, "owned_conn")
            await q.publish_batch([1, 2])
            assert await q.subscribe(poll_interval=0.1).take(2).collect() == [1, 2]
        assert not conn.closed
        assert conn.autocommit is False
        await conn.execute("SELECT 1")


async def test_bad_dsn_is_a_database_error() -> None:
    with pytest.raises(ps.DatabaseError):
        async with ps.connect("postgresql://nobody@127.0.0.1:1/none", timeout=1.0):
            pass


async def test_schema_is_configurable(dsn: str) -> None:
    async with ps.connect(dsn, schema="other_ns") as db:
        q = await ps.PgQueue.create(db, "jobs")
        await q.publish("x")
        async with db.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM other_ns.q_jobs")
            assert await cur.fetchone() == (1,)


async def test_concurrent_loans_never_share_a_connection(dsn: str) -> None:
    async with ps.connect(dsn) as db:
        async with db.connection():
            pass  # now the Database keeps that connection as its spare
        held: list[object] = []
        both = anyio.Event()

        async def hold() -> None:
            async with db.connection() as conn:
                held.append(conn)
                if len(held) == 2:
                    both.set()
                await both.wait()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                tg.start_soon(hold)
        assert held[0] is not held[1]
        assert db.connections_in_use == 0


async def test_spare_connection_is_dropped_after_a_failure(dsn: str) -> None:
    app = f"spare-{uuid.uuid4().hex[:6]}"
    async with ps.connect(make_conninfo(dsn, application_name=app)) as db:
        async with db.connection() as conn:
            first_pid = conn.info.backend_pid
        terminate_backends(dsn, application_name=app)
        with pytest.raises(ps.DatabaseError):
            async with db.connection() as conn:
                await conn.execute("SELECT 1")
        async with db.connection() as conn:
            await conn.execute("SELECT 1")
            assert conn.info.backend_pid != first_pid
