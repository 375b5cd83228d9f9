"""PgChangeStream(capture="wal") on a server with wal_level=logical: what each operation
delivers, values equal to trigger capture's, TOAST, several tables, notify order, durable
consumers confirming only handled transactions, schema changes mid-stream, slots, and the
bad setups refused before anything is created (faults: tests/faults/test_wal_faults.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

import pgstreams as ps

from .test_changes import execute, make_table

pytestmark = pytest.mark.anyio


def new(change: ps.Change[Any]) -> Any:
    assert change.new is not None
    return change.new


def old(change: ps.Change[Any]) -> Any:
    assert change.old is not None
    return change.old


def tname() -> str:
    return f"w_{uuid.uuid4().hex[:10]}"


async def fetch(db: ps.Database, query: str | sql.Composed, *params: Any) -> list[Any]:
    async with db.connection() as conn:
        cur = await conn.execute(query, params or None)
        return await cur.fetchall()


async def slot_names(db: ps.Database) -> list[str]:
    rows = await fetch(
        db,
        "SELECT slot_name FROM pg_replication_slots WHERE database = current_database() ORDER BY 1",
    )
    return [r[0] for r in rows]


async def collect_while(
    stream: ps.Stream[ps.Change[Any]], n: int, write: Any
) -> list[ps.Change[Any]]:
    """Open ``stream``, run ``write()`` once its slot exists, and take ``n`` changes."""
    got: list[ps.Change[Any]] = []
    async with stream.take(n) as changes:
        started = False
        async for change in _first_then(changes, write):
            got.append(change)
            started = True
    assert started or n == 0
    return got


async def _first_then(changes: AsyncIterator[Any], write: Any) -> AsyncIterator[Any]:
    """Start ``changes`` (creating its slot), then write, then yield what comes."""
    async with anyio.create_task_group() as tg:

        async def later() -> None:
            await wait_for_slot_activity()
            await write()

        tg.start_soon(later)
        async for change in changes:
            yield change


_ACTIVE: list[ps.Database] = []


async def wait_for_slot_activity() -> None:
    # A live slot is created when the stream is first read; wait until some walsender runs.
    db = _ACTIVE[-1]
    with anyio.fail_after(20):
        while True:
            rows = await fetch(
                db,
                "SELECT count(*) FROM pg_replication_slots"
                " WHERE database = current_database() AND active",
            )
            if rows[0][0] > 0:
                return
            await anyio.sleep(0.02)


@pytest.fixture
def db(wal_db: ps.Database) -> ps.Database:
    _ACTIVE.append(wal_db)
    return wal_db


async def live(cs: ps.PgChangeStream[Any], n: int, write: Any, **kw: Any) -> list[ps.Change[Any]]:
    return await collect_while(cs.subscribe(**kw), n, write)


# -- what each operation delivers ----------------------------------------------------------


async def test_insert_update_delete_truncate_and_notify_in_commit_order(db: ps.Database) -> None:
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")

    async def write() -> None:
        async with db.connection() as conn:
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("INSERT INTO {} VALUES (1, 10, 'a'), (2, 20, 'b')").format(
                        sql.Identifier(t)
                    )
                )
                await cs.notify({"after": "inserts"}, conn=conn)
            await conn.execute(
                sql.SQL("UPDATE {} SET v = 11 WHERE id = 1").format(sql.Identifier(t))
            )
            await conn.execute(sql.SQL("DELETE FROM {} WHERE id = 2").format(sql.Identifier(t)))
            await conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(t)))

    got = await live(cs, 6, write)
    assert [c.op for c in got] == ["insert", "insert", "notify", "update", "delete", "truncate"]
    key = f"public.{t}"
    assert all(c.table == key for c in got if c.op != "notify")
    assert got[0].new == {"id": 1, "v": 10, "body": "a"} and got[0].old is None
    assert got[0].pk == {"id": 1}
    assert got[2].new == {"after": "inserts"}
    assert got[3].new == {"id": 1, "v": 11, "body": "a"}
    assert got[3].old == {"id": 1}  # default replica identity: the key
    assert got[4].new is None and got[4].old == {"id": 2} and got[4].pk == {"id": 2}
    assert got[5].new is None and got[5].old is None
    # One transaction, one commit LSN and txid; ids unique and increasing in delivery order.
    assert got[0].lsn == got[1].lsn == got[2].lsn and got[0].txid == got[2].txid
    assert len({c.lsn for c in got}) == 4
    assert [c.id for c in got] == sorted({c.id for c in got})
    assert got[3].at >= got[0].at


async def test_replica_identity_full_gives_the_whole_old_row(db: ps.Database) -> None:
    t = await make_table(db)
    await execute(db, sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(sql.Identifier(t)))
    await execute(db, sql.SQL("INSERT INTO {} VALUES (1, 1, 'x')").format(sql.Identifier(t)))
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")

    async def write() -> None:
        await execute(db, sql.SQL("UPDATE {} SET v = 2").format(sql.Identifier(t)))
        await execute(db, sql.SQL("DELETE FROM {}").format(sql.Identifier(t)))

    upd, dele = await live(cs, 2, write)
    assert upd.old == {"id": 1, "v": 1, "body": "x"} and upd.new == {"id": 1, "v": 2, "body": "x"}
    assert dele.old == {"id": 1, "v": 2, "body": "x"}


async def test_values_equal_trigger_capture_for_the_same_rows(db: ps.Database) -> None:
    t = tname()
    await execute(
        db,
        sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY, i int, b bigint, n numeric, n2 numeric(10,3),"
            " f float8, t text, flag bool, ts timestamptz, tsn timestamp, d date, j jsonb,"
            " js json, u uuid, ia int[], ta text[], na numeric[], nested int[][], s smallint,"
            " vc varchar(10), by bytea, iv interval, tm time)"
        ).format(sql.Identifier(t)),
    )
    trig: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t)
    await trig.install_trigger()
    wal: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    rows = [
        "(1, 1, 9007199254740993, 12345.678, 1.5, 0.1, 'héllo \"q\" \\ back', true,"
        " '2024-02-29 13:14:15.123456+05:30', '2024-01-01 00:00:00', '2024-02-29',"
        ' \'{"a": [1, 2.5, null], "b": {"c": "d"}}\', \'[1, {"x": true}]\','
        " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,NULL,3}',"
        ' \'{"a b",NULL,"NULL","q\\"x",""}\','
        " '{1.5,NaN}', '{{1,2},{3,4}}', -3, 'vc', '\\x00ff', '1 day 02:03:04', '04:05:06.5')",
        "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
        " NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        "(3, -2147483648, -1, 'NaN', 0, 'Infinity', '', false, 'infinity', '-infinity',"
        " 'infinity', 'null', '\"s\"', '00000000-0000-0000-0000-000000000000', '{}', '{}',"
        " '{}', '{}', 0, '', '\\x', '-1 mons', '00:00')",
    ]

    async def write() -> None:
        for values in rows:
            insert = [sql.SQL("INSERT INTO "), sql.Identifier(t), sql.SQL(" VALUES " + values)]
            await execute(db, sql.Composed(insert))

    from_wal = await live(wal, len(rows), write)
    from_trigger = await trig.subscribe_from(0).take(len(rows)).collect()
    assert [c.new for c in from_wal] == [c.new for c in from_trigger]
    first = new(from_wal[0])
    assert first["b"] == 9007199254740993 and first["ia"] == [1, None, 3]
    assert first["ts"] == "2024-02-29T07:44:15.123456+00:00"
    await trig.remove_trigger()


async def test_unchanged_toasted_value_is_absent_and_named_never_null(db: ps.Database) -> None:
    t = await make_table(db)
    big = "".join(uuid.uuid4().hex for _ in range(400))  # 12.8 kB, incompressible: out of line
    await execute(db, sql.SQL("INSERT INTO {} VALUES (1, 0, %s)").format(sql.Identifier(t)), big)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")

    async def write() -> None:
        await execute(db, sql.SQL("UPDATE {} SET v = 1").format(sql.Identifier(t)))
        await execute(db, sql.SQL("UPDATE {} SET body = 'small'").format(sql.Identifier(t)))

    first, second = await live(cs, 2, write)
    assert first.new == {"id": 1, "v": 1} and "body" not in first.new
    assert first.unchanged == ("body",)
    assert second.new == {"id": 1, "v": 1, "body": "small"} and second.unchanged == ()


async def test_several_tables_share_one_stream_in_commit_order(db: ps.Database) -> None:
    a, b = await make_table(db), await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, [a, ("public", b)], capture="wal")
    assert await cs.key() == ", ".join(sorted([f"public.{a}", f"public.{b}"]))

    async def write() -> None:
        async with db.connection() as conn:
            async with conn.transaction():
                await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(b)))
                await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(a)))
            await conn.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(sql.Identifier(a)))

    got = await live(cs, 3, write)
    assert [(c.table, new(c)["id"]) for c in got] == [
        (f"public.{b}", 1),
        (f"public.{a}", 1),
        (f"public.{a}", 2),
    ]


async def test_operations_filter_what_is_published(db: ps.Database) -> None:
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal", operations=["delete"])

    async def write() -> None:
        await execute(db, sql.SQL("INSERT INTO {} VALUES (1), (2)").format(sql.Identifier(t)))
        await execute(db, sql.SQL("UPDATE {} SET v = 5").format(sql.Identifier(t)))
        await execute(db, sql.SQL("DELETE FROM {} WHERE id = 2").format(sql.Identifier(t)))

    (only,) = await live(cs, 1, write)
    assert only.op == "delete" and only.old == {"id": 2}


async def test_transactions_committing_out_of_order_arrive_in_commit_order(
    db: ps.Database,
) -> None:
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")

    async def write() -> None:
        first = await psycopg.AsyncConnection.connect(db.dsn)
        second = await psycopg.AsyncConnection.connect(db.dsn, autocommit=True)
        async with first, second:
            await first.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(t)))
            await second.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(sql.Identifier(t)))
            await first.commit()

    got = await live(cs, 2, write)
    assert [new(c)["id"] for c in got] == [2, 1]  # the first to commit comes first


# -- durable consumers ---------------------------------------------------------------------


async def test_durable_consumer_confirms_only_transactions_it_finished(db: ps.Database) -> None:
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    # The first read creates the slot "now": nothing was there to read yet.
    await cs.add_consumer("c1")
    await execute(db, sql.SQL("INSERT INTO {} VALUES (1), (2)").format(sql.Identifier(t)))
    await execute(db, sql.SQL("INSERT INTO {} VALUES (3), (4)").format(sql.Identifier(t)))

    # Finish the first transaction and close cleanly: it is confirmed.
    got = await cs.subscribe(consumer="c1").take(2).collect()
    assert [new(c)["id"] for c in got] == [1, 2]

    # Fail in the middle of the second: none of it is confirmed.
    seen: list[int] = []

    async def fail_on_4(change: ps.Change[Any]) -> None:
        seen.append(new(change)["id"])
        if new(change)["id"] == 4:
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await cs.subscribe(consumer="c1").for_each(fail_on_4)
    assert seen == [3, 4]

    # Resuming redelivers the whole unfinished transaction, and nothing before it.
    again = await cs.subscribe(consumer="c1").take(2).collect()
    assert [new(c)["id"] for c in again] == [3, 4]
    (info,) = await cs.consumers()
    assert info.name == "c1" and info.slot is not None and info.slot.endswith("_c1")
    assert info.active is False and info.wal_status in ("reserved", "extended")
    assert info.confirmed_lsn is not None and info.lag is not None and info.retained_bytes
    await cs.drop_consumer("c1")
    assert await cs.consumers() == []
    assert await slot_names(db) == []


async def test_drop_consumer_refuses_while_streaming(db: ps.Database) -> None:
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    async with cs.subscribe(consumer="busy") as stream:

        async def write() -> None:
            await wait_for_slot_activity()
            with pytest.raises(ps.InvalidArgumentError, match="streaming now"):
                await cs.drop_consumer("busy")
            await execute(db, sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(t)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            assert new(await anext(stream))["id"] == 1
    await cs.drop_consumer("busy")


async def test_live_slot_is_dropped_when_the_stream_closes(db: ps.Database) -> None:
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")

    async def write() -> None:
        names = await slot_names(db)
        assert len(names) == 1 and names[0].startswith("pgslive_")
        await execute(db, sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(t)))

    assert len(await live(cs, 1, write)) == 1
    assert await slot_names(db) == []


# -- schema changes while streaming --------------------------------------------------------


async def test_each_change_has_its_rows_shape_at_commit(db: ps.Database) -> None:
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    ident = sql.Identifier(t)

    async def write() -> None:
        await execute(db, sql.SQL("INSERT INTO {} VALUES (1, 1, 'a')").format(ident))
        await execute(db, sql.SQL("ALTER TABLE {} ADD COLUMN extra jsonb").format(ident))
        await execute(db, sql.SQL("INSERT INTO {} VALUES (2, 2, 'b', '[1]')").format(ident))
        await execute(db, sql.SQL("ALTER TABLE {} DROP COLUMN body").format(ident))
        await execute(db, sql.SQL("INSERT INTO {} VALUES (3, 3, '{{\"k\": 1}}')").format(ident))
        await execute(db, sql.SQL("ALTER TABLE {} RENAME COLUMN v TO w").format(ident))
        await execute(db, sql.SQL("UPDATE {} SET w = 30 WHERE id = 3").format(ident))
        await execute(db, sql.SQL("ALTER TABLE {} ALTER COLUMN w TYPE text").format(ident))
        await execute(db, sql.SQL("INSERT INTO {} VALUES (4, 'four')").format(ident))

    got = await live(cs, 5, write)
    assert [c.new for c in got] == [
        {"id": 1, "v": 1, "body": "a"},
        {"id": 2, "v": 2, "body": "b", "extra": [1]},
        {"id": 3, "v": 3, "extra": {"k": 1}},
        {"id": 3, "w": 30, "extra": {"k": 1}},
        {"id": 4, "w": "four", "extra": None},
    ]


# -- bad input and bad setups: refused before anything is created ---------------------------


async def created(db: ps.Database) -> tuple[list[str], list[Any]]:
    """The slots and publications that exist."""
    return await slot_names(db), await fetch(db, "SELECT pubname FROM pg_publication ORDER BY 1")


async def test_missing_table_and_missing_replica_identity_are_refused(db: ps.Database) -> None:
    before = await created(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, "no_such_table", capture="wal")
    with pytest.raises(ps.InvalidArgumentError, match="does not exist"):
        await cs.subscribe().first()
    t = tname()
    await execute(db, sql.SQL("CREATE TABLE {} (v int)").format(sql.Identifier(t)))
    nokey: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")
    with pytest.raises(ps.InvalidArgumentError, match="REPLICA IDENTITY FULL"):
        await nokey.subscribe(consumer="x").first()
    assert await created(db) == before
    # Inserts only need no identity.
    inserts: ps.PgChangeStream[Any] = ps.PgChangeStream(
        db, t, capture="wal", operations=("insert",)
    )

    async def write() -> None:
        await execute(db, sql.SQL("INSERT INTO {} VALUES (7)").format(sql.Identifier(t)))

    (got,) = await live(inserts, 1, write)
    assert got.new == {"v": 7} and got.pk is None


@pytest.mark.parametrize("name", ["", "Upper", "_lead", "has-dash", "x" * 51, 7, "sp ace"])
async def test_bad_consumer_names_are_refused_at_once(db: ps.Database, name: Any) -> None:
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, "t", capture="wal")
    with pytest.raises(ps.InvalidArgumentError, match="consumer"):
        cs.subscribe(consumer=name)


async def test_wal_mode_refuses_trigger_only_calls_with_the_way_out(db: ps.Database) -> None:
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, "t", capture="wal")
    with pytest.raises(ps.InvalidArgumentError, match=r"trigger capture.*snapshot=True"):
        cs.subscribe_from(0)
    with pytest.raises(ps.InvalidArgumentError, match="trigger capture"):
        await cs.install_trigger()
    with pytest.raises(ps.InvalidArgumentError, match="needs a durable consumer"):
        cs.subscribe(snapshot=True)
    with pytest.raises(ps.InvalidArgumentError, match="durable consumer"):
        cs.subscribe(on_slot_lost="resnapshot")
    with pytest.raises(ps.InvalidArgumentError, match="on_slot_lost"):
        cs.subscribe(consumer="a", on_slot_lost="ignore")  # type: ignore[arg-type]
    with pytest.raises(ps.InvalidArgumentError, match="capture must be"):
        ps.PgChangeStream(db, "t", capture="logical")  # type: ignore[arg-type]
    with pytest.raises(ps.InvalidArgumentError, match="capture='wal' for several"):
        ps.PgChangeStream(db, ["a", "b"])
    with pytest.raises(ps.InvalidArgumentError, match="snapshot and on_slot_lost"):
        ps.PgChangeStream(db, "t").subscribe(snapshot=True)


async def test_role_without_replication_is_refused(db: ps.Database, wal_dsn: str) -> None:
    role = f"r_{uuid.uuid4().hex[:8]}"
    await execute(db, sql.SQL("CREATE ROLE {} LOGIN NOREPLICATION").format(sql.Identifier(role)))
    t = await make_table(db)
    before = await created(db)
    await execute(
        db, sql.SQL("GRANT ALL ON {} TO {}").format(sql.Identifier(t), sql.Identifier(role))
    )
    try:
        params = psycopg.conninfo.conninfo_to_dict(wal_dsn)
        params["user"] = role
        async with ps.connect(psycopg.conninfo.make_conninfo("", **params)) as other:
            cs: ps.PgChangeStream[Any] = ps.PgChangeStream(other, t, capture="wal")
            with pytest.raises(ps.InvalidArgumentError, match="REPLICATION") as err:
                await cs.subscribe().first()
            assert "ALTER ROLE" in str(err.value)
        assert await created(db) == before
    finally:
        await execute(db, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        await execute(db, sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_partitions_are_published_as_their_root_table(db: ps.Database) -> None:
    t = tname()
    ident = sql.Identifier(t)
    await execute(
        db, sql.SQL("CREATE TABLE {} (id int PRIMARY KEY) PARTITION BY RANGE (id)").format(ident)
    )
    for low, high in ((0, 100), (100, 200)):
        part = sql.Identifier(f"{t}_{low}")
        await execute(
            db,
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                part, ident, sql.Literal(low), sql.Literal(high)
            ),
        )
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")

    async def write() -> None:
        await execute(db, sql.SQL("INSERT INTO {} VALUES (5), (150)").format(ident))
        await execute(db, sql.SQL("INSERT INTO {} VALUES (7)").format(sql.Identifier(f"{t}_0")))

    got = await live(cs, 3, write)
    assert [(c.table, new(c)["id"]) for c in got] == [
        (f"public.{t}", 5),
        (f"public.{t}", 150),
        (f"public.{t}", 7),
    ]


async def test_a_quiet_server_gets_no_heartbeats(db: ps.Database) -> None:
    """Heartbeats are written only when the slot is behind: an idle stream on an idle
    database writes nothing (seen by a second slot peeking at the WAL)."""
    t = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal", heartbeat=0.2)
    await execute(db, "SELECT pg_create_logical_replication_slot('probe', 'test_decoding')")
    try:
        async with cs.subscribe() as stream:

            async def idle_then_write() -> None:
                await wait_for_slot_activity()
                await anyio.sleep(2)  # ten heartbeat periods
                await execute(db, sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(t)))

            async with anyio.create_task_group() as tg:
                tg.start_soon(idle_then_write)
                assert new(await anext(stream))["id"] == 1
        rows = await fetch(
            db,
            "SELECT data FROM pg_logical_slot_peek_changes('probe', NULL, NULL)"
            " WHERE data LIKE 'message:%%'",
        )
        assert [r for r in rows if "pgstreams.heartbeat" in r[0]] == []
    finally:
        await execute(db, "SELECT pg_drop_replication_slot('probe')")


async def test_the_callers_connection_options_reach_the_replication_session(
    wal_dsn: str,
) -> None:
    """A time zone set in the DSN's options shapes WAL values as it shapes the pool's."""
    params = psycopg.conninfo.conninfo_to_dict(wal_dsn)
    params["options"] = "-c TimeZone=Asia/Kolkata"
    async with ps.connect(psycopg.conninfo.make_conninfo("", **params)) as db:
        _ACTIVE.append(db)
        t = tname()
        await execute(
            db,
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, at timestamptz)").format(
                sql.Identifier(t)
            ),
        )
        cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, t, capture="wal")

        async def write() -> None:
            await execute(
                db,
                sql.SQL("INSERT INTO {} VALUES (1, '2024-01-01 00:00+00')").format(
                    sql.Identifier(t)
                ),
            )

        (got,) = await live(cs, 1, write)
        assert new(got)["at"] == "2024-01-01T05:30:00+05:30"
