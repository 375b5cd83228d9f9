"""WAL capture under failure: a killed walsender, a server restart, a killed consumer
process, a lost slot, idle slots under other tables' traffic, a huge transaction, a
snapshot racing writers, and servers set up wrong (dedicated embedded clusters where a
setting must differ)."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgstreams as ps
from pgstreams._pg.embedded import EmbeddedPostgres
from pgstreams.testing import embedded, fresh_database

from .._killed_consumer import kill_when_ready
from ..integration.test_changes import execute, make_table
from ..integration.test_wal_changes import fetch, new, old, slot_names
from ..pgserver import terminate_backends

pytestmark = pytest.mark.anyio

CHANGE_CONSUMER = Path(__file__).parents[1] / "_change_consumer.py"


def insert_sql(table: str) -> sql.Composed:
    return sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(table))


async def drain_ids(stream: ps.Stream[ps.Change[Any]], until: int, into: list[int]) -> None:
    """Append each change's id column to ``into`` until ``until`` has been seen."""
    async with stream:
        async for change in stream:
            assert change.new is not None
            into.append(new(change)["id"])
            if new(change)["id"] == until:
                return


async def wait_active(db: ps.Database, slot_prefix: str = "") -> str:
    with anyio.fail_after(20):
        while True:
            rows = await fetch(
                db,
                "SELECT slot_name FROM pg_replication_slots WHERE active"
                " AND database = current_database() AND slot_name LIKE %s",
                slot_prefix + "%",
            )
            if rows:
                return str(rows[0][0])
            await anyio.sleep(0.02)


# -- reconnects ----------------------------------------------------------------------------


async def test_walsender_killed_mid_stream_loses_nothing(wal_db: ps.Database, wal_dsn: str) -> None:
    db = wal_db
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    seen: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain_ids, cs.subscribe(consumer="survivor"), 199, seen)
        slot = await wait_active(db)
        for i in range(200):
            await execute(db, insert_sql(t), i)
            if i in (50, 120):
                with anyio.fail_after(10):
                    while len(seen) < i // 2:  # noqa: ASYNC110 - another task appends
                        await anyio.sleep(0.01)
                killed = terminate_backends(wal_dsn, application_name=f"pgstreams wal {slot}")
                assert killed == 1
    assert set(seen) == set(range(200))
    assert seen == sorted(seen) or len(seen) > 200  # in order, or redelivered after a gap
    firsts = {i: seen.index(i) for i in range(200)}
    assert [i for i in range(200)] == sorted(range(200), key=firsts.__getitem__)
    await cs.drop_consumer("survivor")


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[EmbeddedPostgres]:
    """A cluster of the module's own: few slots, tiny max_slot_wal_keep_size, restartable."""
    with embedded(
        settings={
            "max_replication_slots": "3",
            "max_slot_wal_keep_size": "1MB",
            "wal_keep_size": "0",
            "min_wal_size": "32MB",
            "max_wal_size": "64MB",
        }
    ) as pg:
        yield pg


@pytest.fixture
async def small_db(small_cluster: EmbeddedPostgres) -> AsyncIterator[tuple[ps.Database, str]]:
    with fresh_database(small_cluster.dsn, "small") as dsn:
        async with ps.connect(dsn) as db:
            yield db, dsn


async def test_server_restart_mid_stream_loses_nothing(
    small_cluster: EmbeddedPostgres, small_db: tuple[ps.Database, str]
) -> None:
    db, _ = small_db
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    seen: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain_ids, cs.subscribe(consumer="restarts"), 99, seen)
        await wait_active(db)
        for i in range(100):
            if i == 40:
                await anyio.to_thread.run_sync(small_cluster.restart)
            while True:
                try:
                    await execute(db, insert_sql(t), i)
                    break
                except ps.DatabaseError:
                    await anyio.sleep(0.05)  # the pool is reconnecting
    assert set(seen) == set(range(100))
    await cs.drop_consumer("restarts")


async def test_consumer_process_killed_mid_transaction(wal_db: ps.Database, wal_dsn: str) -> None:
    db = wal_db
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    await cs.add_consumer("killed")
    ident = sql.Identifier(t)
    for start in range(0, 30, 3):  # ten transactions of three rows
        await execute(
            db,
            sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(%s::int, %s::int) g").format(
                ident
            ),
            start,
            start + 2,
        )
    handed = await kill_when_ready(CHANGE_CONSUMER, wal_dsn, t, "killed", "8", "wal")
    assert handed == list(range(8))  # it holds id 7, the second row of the third transaction
    rest = await cs.subscribe(consumer="killed").take(24).collect()
    again = [new(c)["id"] for c in rest if c.new]
    assert again == list(range(6, 30))  # that whole transaction again, nothing finished before
    await cs.drop_consumer("killed")


# -- lost slots ----------------------------------------------------------------------------


async def lose_slot(db: ps.Database, slot: str, table: str) -> None:
    """Write WAL past max_slot_wal_keep_size until the checkpointer invalidates ``slot``."""
    with anyio.fail_after(30):
        while True:
            await execute(
                db,
                sql.SQL(
                    "INSERT INTO {} (id, body) SELECT g, repeat('x', 1000)"
                    " FROM generate_series(100000 + %s::int, 100000 + %s::int + 2000) g"
                    " ON CONFLICT DO NOTHING"
                ).format(sql.Identifier(table)),
                random.randrange(10**6),
                0,
            )
            await execute(db, "SELECT pg_switch_wal()")
            await execute(db, "CHECKPOINT")
            rows = await fetch(
                db, "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", slot
            )
            if rows and rows[0][0] == "lost":
                return


async def test_lost_slot_raises_or_resnapshots(small_db: tuple[ps.Database, str]) -> None:
    db, _ = small_db
    t = await make_table(db)
    other = await make_table(db)
    await execute(
        db, sql.SQL("INSERT INTO {} (id, v) VALUES (1, 1), (2, 2)").format(sql.Identifier(t))
    )
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    await cs.add_consumer("fragile")
    (info,) = await cs.consumers()
    assert info.slot is not None
    await execute(db, sql.SQL("UPDATE {} SET v = 20 WHERE id = 2").format(sql.Identifier(t)))
    await lose_slot(db, info.slot, other)
    (info,) = await cs.consumers()
    assert info.wal_status == "lost"

    with pytest.raises(ps.SlotLostError, match="resnapshot") as err:
        await cs.subscribe(consumer="fragile").first()
    assert err.value.slot == info.slot

    # Recreated, the current rows come again marked as a snapshot, then live changes.
    stream = cs.subscribe(consumer="fragile", on_slot_lost="resnapshot")
    got: list[ps.Change[Any]] = []
    async with stream:
        async for change in stream:
            got.append(change)
            if len(got) == 2:
                await execute(
                    db, sql.SQL("INSERT INTO {} (id) VALUES (3)").format(sql.Identifier(t))
                )
            if len(got) == 3:
                break
    assert [(c.op, c.new) for c in got] == [
        ("snapshot", {"id": 1, "v": 1, "body": None}),
        ("snapshot", {"id": 2, "v": 20, "body": None}),
        ("insert", {"id": 3, "v": 0, "body": None}),
    ]
    (info,) = await cs.consumers()
    assert info.wal_status != "lost"
    await cs.drop_consumer("fragile")


async def test_exhausted_slots_are_refused_before_anything_is_created(
    small_db: tuple[ps.Database, str],
) -> None:
    db, _ = small_db
    t = await make_table(db)
    made = []
    rows = await fetch(db, "SELECT count(*) FROM pg_replication_slots")
    for i in range(3 - rows[0][0]):
        made.append(f"filler_{i}")
        await execute(db, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", made[-1])
    try:
        cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
        with pytest.raises(ps.InvalidArgumentError, match="max_replication_slots") as err:
            await cs.subscribe(consumer="one_too_many").first()
        assert "drop" in str(err.value).lower()
        assert await fetch(db, "SELECT pubname FROM pg_publication") == []
    finally:
        for name in made:
            await execute(db, "SELECT pg_drop_replication_slot(%s)", name)


async def test_wal_level_replica_is_refused_with_the_fix() -> None:
    async with embedded(settings={"wal_level": "replica"}) as pg, ps.connect(pg.dsn) as db:
        await execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
        cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, "t", capture="wal")
        with pytest.raises(ps.InvalidArgumentError, match="wal_level = logical") as err:
            await cs.subscribe().first()
        assert "restart" in str(err.value)
        assert await fetch(db, "SELECT count(*) FROM pg_publication") == [(0,)]
        assert await fetch(db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgstreams'") == [
            (0,)
        ]


# -- idle slots, big transactions ------------------------------------------------------------


async def retained(db: ps.Database, slot: str) -> int:
    rows = await fetch(
        db,
        "SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots"
        " WHERE slot_name = %s",
        slot,
    )
    return int(rows[0][0])


@pytest.mark.timeout(90)
async def test_idle_slot_does_not_retain_other_tables_wal(wal_db: ps.Database) -> None:
    db = wal_db
    quiet, busy = await make_table(db), await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, quiet, capture="wal")
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain_ids, cs.subscribe(consumer="idle"), -1, [])
        slot = await wait_active(db)
        start = await fetch(db, "SELECT pg_current_wal_lsn()::text")
        written, i = 0, 0
        while written < 64 * 1024 * 1024:  # 64 MB of WAL on another table
            await execute(
                db,
                sql.SQL(
                    "INSERT INTO {} (id, body) SELECT g, repeat(md5(g::text), 30)"
                    " FROM generate_series(%s::int * 1000, %s::int * 1000 + 999) g"
                ).format(sql.Identifier(busy)),
                i,
                i,
            )
            i += 1
            rows = await fetch(db, "SELECT (pg_current_wal_lsn() - %s::pg_lsn)::int8", start[0][0])
            written = int(rows[0][0])
        with anyio.fail_after(30):
            while await retained(db, slot) >= 16 * 1024 * 1024:  # noqa: ASYNC110 - server state
                await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    await cs.drop_consumer("idle")


@pytest.mark.timeout(120)
async def test_huge_transaction_streams_row_by_row(wal_db: ps.Database) -> None:
    db = wal_db
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    rows = 100_000
    count = 0
    async with cs.subscribe() as stream:

        async def write() -> None:
            await wait_active(db)
            await execute(
                db,
                sql.SQL(
                    "INSERT INTO {} (id, body) SELECT g, md5(g::text)"
                    " FROM generate_series(1, %s::int) g"
                ).format(sql.Identifier(t)),
                rows,
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            tracemalloc.start()
            try:
                async for _change in stream:
                    count += 1
                    if count == 1:
                        tracemalloc.reset_peak()
                        base = tracemalloc.get_traced_memory()[0]
                    if count == rows:
                        break
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
    assert count == rows
    # Holding the transaction would take ~100 MB of Change objects; streaming takes ~none.
    assert peak < 8 * 1024 * 1024, f"peak traced memory grew {peak} bytes"


# -- snapshots -----------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_snapshot_racing_writers_converges_to_the_table(wal_db: ps.Database) -> None:
    db = wal_db
    t = await make_table(db)
    ident = sql.Identifier(t)
    n = 100_000
    await execute(
        db,
        sql.SQL("INSERT INTO {} (id, v) SELECT g, 0 FROM generate_series(1, %s::int) g").format(
            ident
        ),
        n,
    )
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    state: dict[int, Any] = {}
    ops: dict[str, int] = {}
    rng = random.Random(7)

    async def writers() -> None:
        await wait_active(db)
        async with db.connection() as conn:
            for step in range(1500):
                k = rng.randrange(1, n + 3000)
                choice = rng.random()
                if choice < 0.4:
                    await conn.execute(
                        sql.SQL("UPDATE {} SET v = v + 1 WHERE id = %s").format(ident), [k]
                    )
                elif choice < 0.7:
                    await conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(ident), [k])
                else:
                    await conn.execute(
                        sql.SQL(
                            "INSERT INTO {} (id, v) VALUES (%s, %s) ON CONFLICT (id)"
                            " DO UPDATE SET v = excluded.v"
                        ).format(ident),
                        [k, step],
                    )
                await anyio.sleep(0.001)  # spread the writes over the snapshot
        # The end: once the snapshot has finished (its progress row is gone).
        with anyio.fail_after(120):
            while await fetch(db, "SELECT count(*) FROM pgstreams.wal_snapshots") != [(0,)]:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await cs.notify({"writers": "done"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(writers)
        stream = cs.subscribe(consumer="mirror", snapshot=True, chunk_size=2000)
        async with stream:
            async for change in stream:
                ops[change.op] = ops.get(change.op, 0) + 1
                if change.op == "notify":
                    break
                if change.op == "delete":
                    state.pop(old(change)["id"], None)
                else:
                    state[new(change)["id"]] = change.new
    rows = await fetch(db, sql.SQL("SELECT id, v, body FROM {}").format(ident))
    assert state == {r[0]: {"id": r[0], "v": r[1], "body": r[2]} for r in rows}
    assert ops["snapshot"] > n / 2 and ops["update"] > 0 and ops["delete"] > 0
    await cs.drop_consumer("mirror")


async def test_interrupted_snapshot_resumes_where_it_was(wal_db: ps.Database) -> None:
    db = wal_db
    t = await make_table(db)
    await execute(
        db,
        sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(1, 50) g").format(
            sql.Identifier(t)
        ),
    )
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")

    async def fail_at_25(change: ps.Change[Any]) -> None:
        if new(change)["id"] == 25:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        await cs.subscribe(consumer="resume", snapshot=True, chunk_size=10).for_each(fail_at_25)
    rest = await cs.subscribe(consumer="resume", snapshot=True, chunk_size=10).take(30).collect()
    # Chunks 1-2 were finished; the third is read again from its start.
    assert [new(c)["id"] for c in rest] == list(range(21, 51))
    assert {c.op for c in rest} == {"snapshot"}
    await cs.drop_consumer("resume")
    assert await slot_names(db) == []


# -- keepalives and status -----------------------------------------------------------------


async def test_keepalive_requests_are_answered_while_idle(
    wal_db: ps.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 3 s wal_sender_timeout the server asks for a reply after 1.5 s of silence and
    cuts the session off after 3 s without one: an idle subscription must keep answering.
    (2 s flaked once with both cores loaded by other work; the reader's own status goes
    out every 10 s, so this still fails if requests go unanswered.)"""
    from pgstreams._sources.changes.wal import replication

    shorter = replication.OPTIONS.replace("wal_sender_timeout=5min", "wal_sender_timeout=3s")
    assert shorter != replication.OPTIONS
    monkeypatch.setattr(replication, "OPTIONS", shorter)
    db = wal_db
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal", heartbeat=3600)
    async with cs.subscribe() as stream:

        async def write_later() -> None:
            slot = await wait_active(db)
            (pid,) = (
                await fetch(
                    db, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", slot
                )
            )[0]
            await anyio.sleep(7)  # idle, well past the timeout
            now = await fetch(
                db, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", slot
            )
            assert now == [(pid,)], "the session was cut off and reconnected"
            await execute(db, insert_sql(t), 1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(write_later)
            assert new(await anext(stream))["id"] == 1


async def test_status_goes_out_while_idle(
    wal_db: ps.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgstreams._sources.changes.wal import reader

    monkeypatch.setattr(reader, "_STATUS_AT_LEAST", 0.5)
    db = wal_db
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal", heartbeat=3600)
    async with cs.subscribe() as stream, anyio.create_task_group() as tg:

        async def watch() -> None:
            await wait_active(db)
            query = (
                "SELECT reply_time FROM pg_stat_replication"
                " WHERE application_name LIKE 'pgstreams wal%%'"
            )
            first = (await fetch(db, query))[0][0]
            await anyio.sleep(2.5)
            later = (await fetch(db, query))[0][0]
            assert later is not None and (first is None or later > first)
            await execute(db, insert_sql(t), 1)

        tg.start_soon(watch)
        assert new(await anext(stream))["id"] == 1


async def test_a_slot_past_the_warning_threshold_is_logged(
    wal_db: ps.Database, caplog: pytest.LogCaptureFixture
) -> None:
    db = wal_db
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal", retained_warning=1)
    quiet: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    with caplog.at_level("WARNING", logger="pgstreams.changes.wal"):
        for stream in (quiet, cs):
            async with stream.subscribe(consumer="watched") as s:

                async def write() -> None:
                    await wait_active(db)
                    await execute(db, insert_sql(t), len(caplog.records))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    await anext(s)
            if stream is quiet:
                assert not [r for r in caplog.records if "retains" in r.getMessage()]
    assert [
        r
        for r in caplog.records
        if "retains" in r.getMessage() and "max_slot_wal_keep_size" in r.getMessage()
    ]
    await cs.drop_consumer("watched")


# -- found in review -------------------------------------------------------------------------


async def test_walsender_killed_with_transactions_buffered(
    wal_db: ps.Database, wal_dsn: str
) -> None:
    """The status a durable consumer sends at a Commit may be the first thing to find the
    session gone: it reconnects rather than failing."""
    db = wal_db
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    await cs.add_consumer("buffered")
    for i in range(3000):
        await execute(db, insert_sql(t), i)
    seen: list[int] = []
    async with cs.subscribe(consumer="buffered") as stream:
        async for change in stream:
            seen.append(new(change)["id"])
            if len(seen) == 50:
                slot = await wait_active(db)
                terminate_backends(wal_dsn, application_name=f"pgstreams wal {slot}")
                await anyio.sleep(0.3)
            if seen[-1] == 2999:
                break
    assert set(seen) == set(range(3000))
    await cs.drop_consumer("buffered")


async def test_snapshot_interrupted_as_its_slot_was_made_is_not_lost(
    wal_db: ps.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash right after the slot was created: the retry finds the slot, and must still
    find the snapshot to do."""
    from pgstreams._sources.changes.wal import slots

    db = wal_db
    t = await make_table(db)
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (1), (2)").format(sql.Identifier(t)))
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    real_create = slots.create

    async def create_then_crash(conn: Any, slot: str) -> int:
        await real_create(conn, slot)
        raise RuntimeError("crashed once the slot was made")

    monkeypatch.setattr(slots, "create", create_then_crash)
    with pytest.raises(RuntimeError, match="crashed"):
        await cs.subscribe(consumer="gap", snapshot=True).first()
    monkeypatch.setattr(slots, "create", real_create)
    got = await cs.subscribe(consumer="gap", snapshot=True).take(2).collect()
    assert [(c.op, new(c)["id"]) for c in got] == [("snapshot", 1), ("snapshot", 2)]
    await cs.drop_consumer("gap")


async def test_snapshot_rows_have_the_shape_of_live_rows(wal_db: ps.Database) -> None:
    db = wal_db
    t = f"g_{random.randrange(10**8)}"
    await execute(db, sql.SQL("CREATE TYPE {} AS (x int, y int)").format(sql.Identifier(t + "_pt")))
    await execute(
        db,
        sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY, p {}, at timestamptz,"
            " g int GENERATED ALWAYS AS (id * 10) STORED)"
        ).format(sql.Identifier(t), sql.Identifier(t + "_pt")),
    )
    await execute(
        db,
        sql.SQL("INSERT INTO {} (id, p, at) VALUES (1, '(1,2)', '2024-01-01 12:00+02')").format(
            sql.Identifier(t)
        ),
    )
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    async with cs.subscribe(consumer="shape", snapshot=True) as stream:
        first = await anext(stream)
        await execute(
            db,
            sql.SQL("INSERT INTO {} (id, p, at) VALUES (2, '(3,4)', '2024-01-01 12:00+02')").format(
                sql.Identifier(t)
            ),
        )
        second = await anext(stream)
    assert (first.op, second.op) == ("snapshot", "insert")
    assert set(new(first)) == set(new(second)) == {"id", "p", "at"}  # no generated column
    assert new(first)["p"] == "(1,2)" and new(second)["p"] == "(3,4)"
    assert new(first)["at"] == new(second)["at"]
    await cs.drop_consumer("shape")


async def test_snapshot_refuses_an_identity_that_does_not_log_the_key(
    wal_db: ps.Database,
) -> None:
    db = wal_db
    t = await make_table(db)
    ident = sql.Identifier(t)
    await execute(
        db, sql.SQL("CREATE UNIQUE INDEX {} ON {} (v)").format(sql.Identifier(t + "_v"), ident)
    )
    await execute(db, sql.SQL("ALTER TABLE {} ALTER v SET NOT NULL").format(ident))
    await execute(
        db,
        sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(
            ident, sql.Identifier(t + "_v")
        ),
    )
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    with pytest.raises(ps.InvalidArgumentError, match="REPLICA IDENTITY DEFAULT or FULL"):
        await cs.subscribe(consumer="ri", snapshot=True).first()
    assert await cs.consumers() == []


async def test_a_latin1_database_streams_utf8_text(wal_server: str) -> None:
    name = f"pgs_latin1_{random.randrange(10**8)}"
    with psycopg.connect(wal_server, autocommit=True) as admin:
        admin.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
                " TEMPLATE template0"
            ).format(sql.Identifier(name))
        )
    params = conninfo_to_dict(wal_server)
    params["dbname"] = name
    try:
        async with ps.connect(make_conninfo("", **params)) as db:
            await execute(db, "CREATE TABLE t (id int PRIMARY KEY, s text)")
            cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, "t", capture="wal")
            async with cs.subscribe() as stream:

                async def write() -> None:
                    await wait_active(db)
                    await execute(db, "INSERT INTO t VALUES (1, 'café')")
                    await cs.notify({"word": "naïve"})

                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    assert new(await anext(stream)) == {"id": 1, "s": "café"}
                    assert new(await anext(stream)) == {"word": "naïve"}
    finally:
        with psycopg.connect(wal_server, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def test_busy_wal_senders_and_foreign_tables_are_refused_before_anything(
    wal_db: ps.Database, wal_dsn: str
) -> None:
    # Not the owner: refused before the publication (or a slot) exists.
    role = f"r_{random.randrange(10**8)}"
    db = wal_db
    t = await make_table(db)
    await execute(db, sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(role)))
    try:
        params = conninfo_to_dict(wal_dsn)
        params["user"] = role
        async with ps.connect(make_conninfo("", **params)) as other:
            cs: ps.PgChangeStream[Any] = ps.PgChangeStream(other, t, capture="wal")
            with pytest.raises(ps.InvalidArgumentError, match="owner"):
                await cs.subscribe().first()
        pubs = await fetch(db, "SELECT count(*) FROM pg_publication_tables WHERE tablename = %s", t)
        assert pubs == [(0,)] and await slot_names(db) == []
    finally:
        await execute(db, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        await execute(db, sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    # No WAL sender free.
    async with embedded(settings={"max_wal_senders": "0"}) as pg, ps.connect(pg.dsn) as db0:
        await execute(db0, "CREATE TABLE t (id int PRIMARY KEY)")
        busy: ps.PgChangeStream[Any] = ps.PgChangeStream(db0, "t", capture="wal")
        with pytest.raises(ps.InvalidArgumentError, match="max_wal_senders"):
            await busy.subscribe().first()
        assert await fetch(db0, "SELECT count(*) FROM pg_publication") == [(0,)]
        assert await fetch(db0, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
