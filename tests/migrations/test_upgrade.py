"""A fresh install equals an upgraded one, and upgrading loses no data.

Every comparison is of ``pg_dump --schema-only`` output (see support.schema_dump).
"""

from __future__ import annotations

import uuid

import psycopg

import pgstreams as ps
from pgstreams._pg.migrate import (
    MIGRATIONS,
    QUEUES,
    SETS,
    SNAPSHOTS,
    WORKFLOWS,
    migrate,
    migrate_instance,
    migrate_main,
)

from .support import Conn, all_rows, kept, legacy_install, schema_dump

QUEUE_NAMES = ("jobs", "mail")
CUSTOM_WORKFLOWS = ("wfs", "acme_")  # a storage in its own schema with its own prefix


async def fresh_install(dsn: str) -> None:
    """This library's install, with two queues, a custom workflow storage and a custom
    snapshot table."""
    async with ps.connect(dsn) as db:
        await db.migrate()
        for name in QUEUE_NAMES:
            await ps.PgQueue.create(db, name)
        await ps.PgWorkflowStorage(
            db, schema=CUSTOM_WORKFLOWS[0], table_prefix=CUSTOM_WORKFLOWS[1]
        ).migrate()
        await ps.SnapshotStore(db, table="snaps").list()


async def legacy_app(conn: Conn, *, data: bool = False) -> None:
    """What fresh_install() makes, as the library before versioned instances made it."""
    await legacy_install(
        conn,
        queues=QUEUE_NAMES,
        workflows=[("pgstreams", "wf_"), CUSTOM_WORKFLOWS],
        snapshots=["snapshots", "snaps"],
        data=data,
    )


async def first_uses(db: ps.Database) -> None:
    """What an upgraded application does: migrate, then use its custom storages."""
    await db.migrate()
    await ps.PgWorkflowStorage(
        db, schema=CUSTOM_WORKFLOWS[0], table_prefix=CUSTOM_WORKFLOWS[1]
    ).migrate()
    await ps.SnapshotStore(db, table="snaps").list()


async def test_an_install_upgraded_one_migration_at_a_time_equals_a_fresh_one(
    fresh_dsn: str, new_dsn: str
) -> None:
    await fresh_install(fresh_dsn)
    async with await psycopg.AsyncConnection.connect(new_dsn, autocommit=True) as conn:
        for m in MIGRATIONS:
            assert await migrate_main(conn, "pgstreams", upto=m.version) == [
                ("main", "", m.version)
            ]
        instances = [(QUEUES, "pgstreams", name) for name in QUEUE_NAMES]
        instances += [
            (WORKFLOWS, "pgstreams", "wf_"),
            (WORKFLOWS, *CUSTOM_WORKFLOWS),
            (SNAPSHOTS, "pgstreams", "snapshots"),
            (SNAPSHOTS, "pgstreams", "snaps"),
        ]
        for mset, schema, instance in instances:
            for m in mset.migrations:
                applied = await migrate_instance(conn, mset, schema, instance, upto=m.version)
                assert applied == [(mset.name, instance, m.version)]
    async with ps.connect(new_dsn) as db:
        for name in QUEUE_NAMES:
            await ps.PgQueue.create(db, name)  # registers it; its table is up to date
        await first_uses(db)
    assert await schema_dump(new_dsn) == await schema_dump(fresh_dsn)


async def test_every_older_release_upgrades_to_the_fresh_install(conn: Conn) -> None:
    """For each set and each version k of it: a schema where that set stopped at k (as in
    an older release), then migrated by this library, equals one this library made."""
    fresh = f"fresh_{uuid.uuid4().hex[:8]}"
    await migrate(conn, fresh)
    await migrate_instance(conn, QUEUES, fresh, "jobs")
    expected = await schema_dump(conn.info.dsn, fresh)
    assert "q_jobs" in expected and "wf_runs" in expected
    cases = [("main", v) for v in [0, *(m.version for m in MIGRATIONS[:-1])]]
    for mset in SETS.values():
        cases += [(mset.name, v) for v in [0, *(m.version for m in mset.migrations[:-1])]]
    for set_name, version in cases:
        upgraded = f"upg_{uuid.uuid4().hex[:8]}"
        await migrate(conn, upgraded, upto={set_name: version})  # an older release
        queue_upto = version if set_name == QUEUES.name else None
        await migrate_instance(conn, QUEUES, upgraded, "jobs", upto=queue_upto)
        await migrate(conn, upgraded)  # then this one
        await migrate_instance(conn, QUEUES, upgraded, "jobs")
        assert await schema_dump(conn.info.dsn, upgraded) == expected, (set_name, version)


async def test_tables_made_before_they_were_versioned_are_adopted(
    fresh_dsn: str, new_dsn: str
) -> None:
    await fresh_install(fresh_dsn)
    async with await psycopg.AsyncConnection.connect(new_dsn, autocommit=True) as conn:
        await legacy_app(conn)
    async with ps.connect(new_dsn) as db:
        await first_uses(db)
        async with db.connection() as c:
            cur = await c.execute(
                "SELECT migration_set, instance, version FROM pgstreams.instance_version"
                " ORDER BY 1, 2, 3"
            )
            recorded = await cur.fetchall()
    instances = [(QUEUES, name) for name in QUEUE_NAMES]
    instances += [(SNAPSHOTS, "snaps"), (SNAPSHOTS, "snapshots"), (WORKFLOWS, "wf_")]
    assert recorded == [(s.name, i, m.version) for s, i in instances for m in s.migrations]
    assert await schema_dump(new_dsn) == await schema_dump(fresh_dsn)


async def test_upgrading_a_database_that_holds_data_loses_none_of_it(new_dsn: str) -> None:
    schemas = ["pgstreams", CUSTOM_WORKFLOWS[0]]
    async with await psycopg.AsyncConnection.connect(new_dsn, autocommit=True) as conn:
        await legacy_app(conn, data=True)
        before = await all_rows(conn, schemas)
    assert all(before.values()), "every table holds data"
    async with ps.connect(new_dsn) as db:
        await first_uses(db)
        async with db.connection() as conn:
            after = await all_rows(conn, schemas)
        for table, rows in before.items():
            assert kept(rows, after[table]) == rows, table
        # ... and the library reads it back.
        jobs: ps.PgQueue[dict[str, int]] = ps.PgQueue(db, "jobs")
        metrics = await jobs.metrics()
        assert (metrics.pending, metrics.processing, metrics.dead, metrics.completed) == (
            1,
            1,
            1,
            7,
        )
        assert [(d.value, d.last_error) for d in await jobs.dead_letters()] == [({"n": 3}, "boom")]
        assert await jobs.subscribe(poll_interval=0.05).first() == {"n": 1}
        for storage in (
            ps.PgWorkflowStorage(db),
            ps.PgWorkflowStorage(db, schema=CUSTOM_WORKFLOWS[0], table_prefix=CUSTOM_WORKFLOWS[1]),
        ):
            run = await storage.get_run("r1")
            assert run is not None and run.output == {"ok": True}
            history = await storage.run_history("r1")
            assert [(a.attempt, a.status) for a in history] == [(1, "failed"), (2, "succeeded")]
            await storage.close()
        for table in ("snapshots", "snaps"):
            assert await ps.SnapshotStore(db, table=table).load("order-1") == {"step": 2}
            store = ps.SnapshotStore(db, table=table, prefix="app:")
            assert await store.load("user-1") == {"name": "ada"}
        tasks = ps.PgStepQueue(db, worker_id="w", namespace="default")
        assert (await tasks.metrics())["fast"]["pending"] == 1
