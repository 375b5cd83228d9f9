"""SnapshotStore: save/load/delete/list against a real table, installed as a versioned set."""

from __future__ import annotations

import anyio
import pytest

import pgstreams as ps
from pgstreams._pg.migrate import SNAPSHOTS


async def test_save_load_delete_and_list_newest_first(db: ps.Database) -> None:
    store = ps.SnapshotStore(db, table="snaps", prefix="app1:")
    assert await store.load("missing") is None
    await store.save("order-1", {"step": 1})
    await store.save("order-2", {"step": 1})
    await store.save("user-1", {"name": "ada"})
    await store.save("order-1", {"step": 2})  # replaces, and is now the newest
    assert await store.load("order-1") == {"step": 2}
    listed = await store.list()
    assert [s.id for s in listed] == ["order-1", "user-1", "order-2"]
    assert [s.id for s in await store.list(prefix="order-")] == ["order-1", "order-2"]
    assert [s.id for s in await store.list(limit=1)] == ["order-1"]
    assert listed[0].snapshot == {"step": 2}
    assert await store.delete("order-2") is True
    assert await store.delete("order-2") is False
    other = ps.SnapshotStore(db, table="snaps", prefix="app2:")  # same table, own ids
    assert await other.list() == [] and await other.load("order-1") is None
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT indexdef FROM pg_indexes"
            " WHERE tablename = 'snaps' AND indexdef LIKE '%updated_at%'"
        )
        assert await cur.fetchall(), "an index on updated_at"


async def test_a_store_given_a_dsn_owns_its_connections(db: ps.Database, dsn: str) -> None:
    async with ps.SnapshotStore(dsn, table="snaps_dsn") as store:
        await store.save("a", {"x": [1, 2]})
        assert await store.load("a") == {"x": [1, 2]}
    await store.close()  # idempotent
    reader = ps.SnapshotStore(db, table="snaps_dsn")
    assert await reader.load("a") == {"x": [1, 2]}


async def test_bad_input_is_refused_before_anything_is_written(db: ps.Database) -> None:
    store = ps.SnapshotStore(db, table="snaps_bad")
    with pytest.raises(ps.PayloadError):
        await store.save("a", {"when": anyio})
    with pytest.raises(ps.InvalidArgumentError):
        await store.save("a", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ps.InvalidArgumentError):
        await store.save("", {})
    with pytest.raises(ps.InvalidArgumentError):
        ps.SnapshotStore(db, table="Bad Name")
    with pytest.raises(ps.InvalidArgumentError):
        await store.list(limit=0)
    assert await store.list() == []


async def test_prefixes_keep_stores_apart(db: ps.Database) -> None:
    one = ps.SnapshotStore(db, table="snaps_prefix", prefix="a:")
    two = ps.SnapshotStore(db, table="snaps_prefix", prefix="a")
    await one.save("b", {"who": "one"})
    await two.save(":b", {"who": "two"})
    assert await one.load("b") == {"who": "one"}
    assert [s.id for s in await two.list()] == [":b"]


async def test_concurrent_first_calls_open_one_database(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pgstreams._workflows.snapshots as snapshots

    opened: list[ps.Database] = []
    real_connect = ps.connect

    async def counting(dsn: str) -> ps.Database:
        db = await real_connect(dsn)
        opened.append(db)
        return db

    monkeypatch.setattr(snapshots, "connect", counting)
    store = ps.SnapshotStore(dsn, table="snaps_concurrent")
    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(store.save, f"s{i}", {"i": i})
    await store.close()
    assert len(opened) == 1
    for db in opened:  # what a leak would have left open
        await db.close()


async def test_the_default_table_comes_with_migrate_and_others_are_versioned(
    db: ps.Database,
) -> None:
    await ps.SnapshotStore(db, table="snaps_versioned").list()
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT instance, version FROM pgstreams.instance_version"
            " WHERE migration_set = 'snapshots' ORDER BY 1, 2"
        )
        recorded = await cur.fetchall()
    for table in ("snapshots", "snaps_versioned"):  # the default one: db.migrate() made it
        assert [v for t, v in recorded if t == table] == [m.version for m in SNAPSHOTS.migrations]
