"""The migrations runner: idempotent, safe when several processes migrate at once, refuses
a schema a newer pgstreams migrated, and follows queues as they come and go."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

import pgstreams as ps
from pgstreams._pg.locks import advisory_key
from pgstreams._pg.migrate import MIGRATIONS, QUEUES, SETS, Applied, migrate

from .support import LEGACY_MAIN, Conn, at_once, legacy_install, lock_waiters, schema_dump


async def versions(conn: Conn, schema: str, *, main: bool = True) -> list[tuple[Any, ...]]:
    """The versions recorded in ``schema`` (a schema without the main set: ``main=False``)."""
    query = "SELECT migration_set, instance, version FROM {0}.instance_version"
    if main:
        query = "SELECT 'main', '', version FROM {0}.schema_version UNION ALL " + query
    cur = await conn.execute(
        sql.SQL(query + " ORDER BY 1, 2, 3").format(sql.Identifier(schema))  # type: ignore[arg-type,unused-ignore]
    )
    return await cur.fetchall()


async def test_migrate_is_idempotent(db: ps.Database, conn: Conn) -> None:
    before = await versions(conn, "pgstreams")
    await db.migrate()
    assert await migrate(conn, "pgstreams") == []
    assert await versions(conn, "pgstreams") == before
    main = [m.version for m in MIGRATIONS]
    assert [v for s, _, v in before if s == "main"] == main
    assert [r for r in before if r[0] in ("snapshots", "workflows")] == [
        (mset.name, instance, m.version)
        for mset, instance in [(SETS["snapshots"], "snapshots"), (SETS["workflows"], "wf_")]
        for m in mset.migrations
    ]


async def test_concurrent_migrators_apply_each_migration_once(conn: Conn, dsn: str) -> None:
    schema = f"mig_{uuid.uuid4().hex[:8]}"
    # Queues made before their tables were versioned: the migrators upgrade them too.
    await legacy_install(conn, schema, queues=["a", "b"])
    applied = await at_once(dsn, 4, advisory_key("migrate", schema), lambda c: migrate(c, schema))
    everything: list[Applied] = sorted(a for one in applied for a in one)
    instances = [("queue", q, m.version) for q in "ab" for m in QUEUES.migrations]
    instances += [("snapshots", "snapshots", m.version) for m in SETS["snapshots"].migrations]
    instances += [("workflows", "wf_", m.version) for m in SETS["workflows"].migrations]
    main = [("main", "", m.version) for m in MIGRATIONS]
    assert everything == sorted([v for v in main if v[2] > LEGACY_MAIN] + instances)
    assert await versions(conn, schema) == sorted(main + instances)


async def test_concurrent_first_uses_of_a_prefix_and_a_queue_are_safe(
    db: ps.Database, dsn: str, conn: Conn
) -> None:
    async def storage(c: Conn) -> None:
        async with ps.connect(c) as other:
            await ps.PgWorkflowStorage(other, schema="wf_race", table_prefix="x_").migrate()
            await ps.PgQueue.create(other, "raced")

    await at_once(dsn, 4, advisory_key("migrate", "wf_race"), storage)
    assert await versions(conn, "wf_race", main=False) == [
        ("workflows", "x_", m.version) for m in SETS["workflows"].migrations
    ]
    rows = [r for r in await versions(conn, "pgstreams") if r[:2] == ("queue", "raced")]
    assert rows == [("queue", "raced", m.version) for m in QUEUES.migrations]


async def test_a_dropped_queue_is_not_brought_back_by_a_concurrent_migrate(
    db: ps.Database, dsn: str, conn: Conn
) -> None:
    await ps.PgQueue.create(db, "going")
    async with await psycopg.AsyncConnection.connect(dsn) as dropper:
        # Mid-drop: the queue's lock is held, its table and registration gone (uncommitted).
        await dropper.execute(
            "SELECT pg_advisory_xact_lock(%s)", [advisory_key("queue", "pgstreams", "going")]
        )
        await dropper.execute("DROP TABLE pgstreams.q_going")
        await dropper.execute("DELETE FROM pgstreams.queues WHERE name = 'going'")
        async with anyio.create_task_group() as tg:
            tg.start_soon(migrate, conn, "pgstreams")
            key = advisory_key("queue", "pgstreams", "going")
            await lock_waiters(dsn, key)  # the migration waits for the queue's lock
            await dropper.commit()
    cur = await conn.execute("SELECT to_regclass('pgstreams.q_going')")
    assert await cur.fetchone() == (None,)
    assert [r for r in await versions(conn, "pgstreams") if r[1] == "going"] == [
        ("queue", "going", m.version) for m in QUEUES.migrations
    ]  # recorded, but its table gone: PgQueue.create would install it again


async def test_a_queue_created_again_after_a_drop_gets_its_table(db: ps.Database) -> None:
    queue = await ps.PgQueue.create(db, "again")
    await queue.drop()
    queue = await ps.PgQueue.create(db, "again")
    await queue.publish("x")
    assert await queue.subscribe(poll_interval=0.05).first() == "x"
    async with db.connection() as c:
        cur = await c.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'q_again' ORDER BY 1"
        )
        assert [r[0] for r in await cur.fetchall()] == [
            "q_again_dead",
            "q_again_pkey",
            "q_again_ready",
        ]


# -- a schema a newer pgstreams migrated --------------------------------------------------


async def test_a_newer_main_version_is_refused_before_anything_is_written(new_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(new_dsn, autocommit=True) as c:
        await legacy_install(c, queues=["jobs"])  # leaves plenty for migrate() to do
        await c.execute(
            "INSERT INTO pgstreams.schema_version (version, name) VALUES (9001, 'from_2030')"
        )
    before = await schema_dump(new_dsn)
    async with ps.connect(new_dsn) as db:
        with pytest.raises(ps.DatabaseError, match=r"main 9001_from_2030.*newer pgstreams"):
            await db.migrate()
        with pytest.raises(ps.DatabaseError, match="9001_from_2030"):
            await ps.PgQueue.create(db, "other")
    assert await schema_dump(new_dsn) == before


@pytest.mark.parametrize(
    ("migration_set", "instance"),
    [("queue", "jobs"), ("snapshots", "snapshots"), ("a_set_from_2030", "x")],
)
async def test_a_newer_instance_version_is_refused_before_anything_is_written(
    new_dsn: str, migration_set: str, instance: str
) -> None:
    async with await psycopg.AsyncConnection.connect(new_dsn, autocommit=True) as c:
        await legacy_install(c, queues=["jobs"])
        # Makes instance_version, and leaves work for migrate() in every set.
        await migrate(
            c, "pgstreams", upto={"main": LEGACY_MAIN, "queue": 1, "workflows": 0, "snapshots": 0}
        )
        await c.execute(
            "INSERT INTO pgstreams.instance_version (migration_set, instance, version, name)"
            " VALUES (%s, %s, 77, 'later')",
            [migration_set, instance],
        )
    before = await schema_dump(new_dsn)
    async with ps.connect(new_dsn) as db:
        with pytest.raises(ps.DatabaseError, match=f"{migration_set} '{instance}' 0077_later"):
            await db.migrate()
    assert await schema_dump(new_dsn) == before


async def test_a_storage_in_a_schema_a_newer_pgstreams_migrated_is_refused(
    db: ps.Database, conn: Conn
) -> None:
    storage = ps.PgWorkflowStorage(db, schema="wf_newer", table_prefix="n_")
    await storage.migrate()
    await conn.execute(
        "INSERT INTO wf_newer.instance_version (migration_set, instance, version, name)"
        " VALUES ('workflows', 'n_', 2000, 'later')"
    )
    with pytest.raises(ps.DatabaseError, match="workflows 'n_' 2000_later"):
        await ps.PgWorkflowStorage(db, schema="wf_newer", table_prefix="n_").migrate()
    await storage.close()
