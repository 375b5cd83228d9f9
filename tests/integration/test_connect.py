"""connect(), Database ownership, migrations and the shared LISTEN connection."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

import pgstreams as ps
from pgstreams._pg.migrate import MIGRATIONS, migrate

from ..pgserver import count_backends, terminate_backends


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


async def test_migrate_is_idempotent(db: ps.Database) -> None:
    await db.migrate()
    await db.migrate()
    async with db.connection() as conn:
        cur = await conn.execute("SELECT version FROM pgstreams.schema_version ORDER BY 1")
        assert [r[0] for r in await cur.fetchall()] == [m.version for m in MIGRATIONS]


async def test_four_concurrent_migrators_apply_each_version_once(dsn: str) -> None:
    schema = f"mig_{uuid.uuid4().hex[:8]}"
    applied: list[list[int]] = []

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            applied.append(await migrate(conn, schema))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(run)
    everything = sorted(v for versions in applied for v in versions)
    assert everything == [m.version for m in MIGRATIONS]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            psycopg.sql.SQL("SELECT count(*) FROM {}.schema_version").format(
                psycopg.sql.Identifier(schema)
            )
        )
        assert await cur.fetchone() == (len(MIGRATIONS),)


async def test_schema_is_configurable(dsn: str) -> None:
    async with ps.connect(dsn, schema="other_ns") as db:
        q = await ps.PgQueue.create(db, "jobs")
        await q.publish("x")
        async with db.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM other_ns.q_jobs")
            assert await cur.fetchone() == (1,)


async def test_one_listen_connection_fans_out_to_many_subscribers(dsn: str) -> None:
    async with ps.connect(dsn) as db:
        async with (
            db.wakeups("chan_a") as a1,
            db.wakeups("chan_a") as a2,
            db.wakeups("chan_b") as b,
        ):
            assert count_backends(dsn, application_name="pgstreams-listener") == 1
            for w in (a1, a2, b):
                w.arm()
            async with db.connection() as conn:
                await conn.execute("SELECT pg_notify('chan_a', '')")
            assert await a1.wait(5) and await a2.wait(5)
            assert not await b.wait(0.2)
        assert db.listener.subscriber_count() == 0
    assert count_backends(dsn, application_name="pgstreams-listener") == 0


async def test_listener_reconnects_and_wakes_everyone(dsn: str) -> None:
    async with ps.connect(dsn) as db, db.wakeups("chan_r") as w:
        w.arm()
        assert terminate_backends(dsn, application_name="pgstreams-listener") == 1
        # Woken by the reconnect itself: a notification may have been missed meanwhile.
        assert await w.wait(10)
        assert db.listener.reconnects == 1
        w.arm()
        async with db.connection() as conn:
            await conn.execute("SELECT pg_notify('chan_r', '')")
        assert await w.wait(10)


async def test_channel_names_are_quoted(dsn: str) -> None:
    weird = 'Mixed."Case"; DROP TABLE x'
    async with ps.connect(dsn) as db, db.wakeups(weird) as w:
        w.arm()
        async with db.connection() as conn:
            await conn.execute("SELECT pg_notify(%s, '')", [weird])
        assert await w.wait(5)


async def _catalog(conn: psycopg.AsyncConnection[Any], schema: str) -> list[tuple[Any, ...]]:
    """Tables, columns, indexes and constraints of a schema, with the schema name erased."""
    cur = await conn.execute(
        """
        SELECT 'column', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull::text, coalesce(pg_get_expr(d.adbin, d.adrelid), '')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE n.nspname = %(s)s
        UNION ALL
        SELECT 'index', tablename, indexname, replace(indexdef, %(s)s, 'S'), '', ''
        FROM pg_indexes WHERE schemaname = %(s)s
        UNION ALL
        SELECT 'constraint', conrelid::regclass::text, conname,
               replace(pg_get_constraintdef(oid), %(s)s, 'S'), '', ''
        FROM pg_constraint WHERE connamespace = %(s)s::regnamespace
        ORDER BY 1, 2, 3
        """,
        {"s": schema},
    )
    rows = await cur.fetchall()
    return [tuple(str(v).replace(schema, "S") for v in row) for row in rows]


async def test_upgraded_install_equals_fresh_install(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        fresh = f"fresh_{uuid.uuid4().hex[:8]}"
        await migrate(conn, fresh)
        expected = await _catalog(conn, fresh)
        assert expected  # the catalog query sees the objects
        for step in range(len(MIGRATIONS)):
            upgraded = f"upg_{uuid.uuid4().hex[:8]}"
            await migrate(conn, upgraded, MIGRATIONS[:step])  # an older release
            await migrate(conn, upgraded)  # then this one
            assert await _catalog(conn, upgraded) == expected


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
