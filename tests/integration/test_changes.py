"""PgChangeStream on a real PostgreSQL: capture (TRUNCATE too), lossless delivery, durable
consumers, replay, pruning and bad input (faults: tests/faults/test_changes_faults.py)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import anyio
import psycopg
import pytest
from psycopg import sql

import pgstreams as ps
from pgstreams._pg.migrate import migrate
from pgstreams._sources.changes.log import Log

from ..streams import forward, until_idle

Row = dict[str, Any]
Capture = Literal["statement", "row"]
CAPTURES: list[Capture] = ["statement", "row"]


def tname() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


async def execute(db: ps.Database, query: str | sql.Composed, *params: Any) -> None:
    async with db.connection() as conn:
        await conn.execute(query, params or None)


async def make_table(db: ps.Database, name: str | None = None) -> str:
    name = name or tname()
    await execute(
        db,
        sql.SQL(
            "CREATE TABLE {} (id bigint PRIMARY KEY, v int NOT NULL DEFAULT 0, body text)"
        ).format(sql.Identifier(name)),
    )
    return name


async def logged_ids(db: ps.Database, key: str) -> list[int]:
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM pgstreams.changes WHERE stream = %s ORDER BY id", [key]
        )
        return [int(r[0]) for r in await cur.fetchall()]


async def triggers_on(db: ps.Database, table: str) -> int:
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal",
            [table],
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# -- capture --------------------------------------------------------------------------


@pytest.mark.parametrize("capture", CAPTURES)
async def test_insert_update_delete_are_captured_with_images(
    db: ps.Database, capture: Capture
) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table, capture=capture)
    await cs.install_trigger()
    async with db.connection() as conn:
        await conn.execute(
            sql.SQL("INSERT INTO {} (id, body) VALUES (1, 'a'), (2, 'b')").format(
                sql.Identifier(table)
            )
        )
        await conn.execute(
            sql.SQL("UPDATE {} SET v = v + 1, id = id + 10").format(sql.Identifier(table))
        )
        await conn.execute(sql.SQL("DELETE FROM {} WHERE id = 11").format(sql.Identifier(table)))
    changes = await cs.subscribe_from(0).take(5).collect()
    assert [(c.op, c.pk) for c in changes] == [
        ("insert", {"id": 1}),
        ("insert", {"id": 2}),
        ("update", {"id": 11}),
        ("update", {"id": 12}),
        ("delete", {"id": 11}),
    ]
    # A multi-row UPDATE that changes the key still pairs each row's old and new image.
    assert [(c.old, c.new) for c in changes[2:4]] == [
        ({"id": 1, "v": 0, "body": "a"}, {"id": 11, "v": 1, "body": "a"}),
        ({"id": 2, "v": 0, "body": "b"}, {"id": 12, "v": 1, "body": "b"}),
    ]
    assert (changes[0].new, changes[0].old) == ({"id": 1, "v": 0, "body": "a"}, None)
    assert (changes[4].new, changes[4].old) == (None, {"id": 11, "v": 1, "body": "a"})
    assert all(c.table == f"public.{table}" for c in changes)
    assert changes[0].txid == changes[1].txid != changes[2].txid
    assert changes[0].at.tzinfo is not None


async def test_remove_trigger_stops_capture_and_keeps_the_log(db: ps.Database) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    await cs.install_trigger()  # idempotent
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (1)").format(sql.Identifier(table)))
    await cs.remove_trigger()
    assert await triggers_on(db, table) == 0
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (2)").format(sql.Identifier(table)))
    assert [c.new for c in await cs.subscribe_from(0).take(1).collect()] == [
        {"id": 1, "v": 0, "body": None}
    ]
    assert len(await logged_ids(db, await cs.key())) == 1


@pytest.mark.parametrize("capture", CAPTURES)
async def test_quoted_names_operations_and_columns(db: ps.Database, capture: Capture) -> None:
    table = f"Order Lines {capture}"
    await execute(db, 'CREATE SCHEMA IF NOT EXISTS "Sales Dept"')
    await execute(
        db,
        sql.SQL('CREATE TABLE {} ("Id" int PRIMARY KEY, "Qty" int, note text)').format(
            sql.Identifier("Sales Dept", table)
        ),
    )
    quoted = sql.Identifier("Sales Dept", table)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(
        db,
        ("Sales Dept", table),
        operations=("insert", "delete"),
        capture=capture,
        columns=["Qty"],
    )
    await cs.install_trigger()
    name = f'"Sales Dept"."{table}"'
    assert await triggers_on(db, name) == 2
    await execute(db, sql.SQL("INSERT INTO {} VALUES (1, 5, 'x')").format(quoted))
    await execute(db, sql.SQL('UPDATE {} SET "Qty" = 6').format(quoted))  # not captured
    await execute(db, sql.SQL("DELETE FROM {}").format(quoted))
    same: ps.PgChangeStream[Row] = ps.PgChangeStream(db, name)
    assert await same.key() == await cs.key() == name
    changes = await same.subscribe_from(0).take(2).collect()
    assert [(c.op, c.pk, c.new, c.old) for c in changes] == [
        ("insert", {"Id": 1}, {"Qty": 5}, None),
        ("delete", {"Id": 1}, None, {"Qty": 6}),
    ]


@pytest.mark.parametrize("capture", CAPTURES)
async def test_table_without_primary_key_and_notify_events(
    db: ps.Database, capture: Capture
) -> None:
    table = tname()
    await execute(db, sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(table)))
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, table, capture=capture)
    await cs.install_trigger()
    await execute(db, sql.SQL("INSERT INTO {} VALUES (7)").format(sql.Identifier(table)))
    note_id = await cs.notify({"user_id": "u_42"})
    changes = await cs.subscribe_from(0).take(2).collect()
    assert [(c.op, c.pk, c.new) for c in changes] == [
        ("insert", None, {"x": 7}),
        ("notify", None, {"user_id": "u_42"}),
    ]
    assert changes[1].id == note_id


async def test_large_row_is_delivered_intact(db: ps.Database) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    body = "".join(random.choice("abcdefghij\u00e9\u4e2d") for _ in range(64 * 1024))
    send, receive = anyio.create_memory_object_stream[ps.Change[Row]](10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward, cs.subscribe(poll_interval=3600), send)
        await until_idle(db, 1)
        await execute(
            db,
            sql.SQL("INSERT INTO {} (id, body) VALUES (1, %s)").format(sql.Identifier(table)),
            body,
        )
        with anyio.fail_after(10):  # NOTIFY carries no data: the row comes from the log
            change = await receive.receive()
        tg.cancel_scope.cancel()
    receive.close()
    assert change.new is not None and change.new["body"] == body


# -- TRUNCATE -------------------------------------------------------------------------


def ops_of(changes: list[ps.Change[Row]]) -> list[tuple[str, Any]]:
    return [(c.op, (c.new or {}).get("id")) for c in changes]


@pytest.mark.parametrize("capture", CAPTURES)
async def test_truncate_is_one_change_in_order_for_every_reader(
    db: ps.Database, capture: Capture
) -> None:
    table = await make_table(db)
    ident = sql.Identifier(table)
    insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(ident)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table, capture=capture)
    await cs.install_trigger()
    await cs.add_consumer("mirror")
    expected = [("insert", 1), ("insert", 2), ("truncate", None), ("insert", 3), ("truncate", None)]
    send, receive = anyio.create_memory_object_stream[ps.Change[Row]](10)
    async with anyio.create_task_group() as tg:
        # Polling every hour: only the truncate's own NOTIFY can wake this subscriber.
        tg.start_soon(forward, cs.subscribe(poll_interval=3600), send)
        await until_idle(db, 1)
        async with db.connection() as conn, conn.transaction():
            await conn.execute(insert, [1])
            await conn.execute(insert, [2])
            await conn.execute(sql.SQL("TRUNCATE {}").format(ident))
            await conn.execute(insert, [3])
        with anyio.fail_after(10):
            live = [await receive.receive() for _ in range(4)]
            await until_idle(db, 1)
            await execute(db, sql.SQL("TRUNCATE TABLE ONLY {} RESTART IDENTITY").format(ident))
            live.append(await receive.receive())
        tg.cancel_scope.cancel()
    receive.close()
    assert ops_of(live) == expected
    truncate = live[2]
    assert (truncate.new, truncate.old, truncate.pk) == (None, None, None)
    assert truncate.table == f"public.{table}" == await cs.key()
    assert truncate.txid == live[0].txid == live[3].txid != live[4].txid
    assert truncate.at.tzinfo is not None
    assert [c.id for c in live] == sorted(c.id for c in live)
    replayed = await cs.subscribe_from(0).take(5).collect()
    assert replayed == live
    durable = await cs.subscribe(consumer="mirror").take(5).collect()
    assert durable == live
    assert (await cs.lag("mirror")).changes == 0
    # The replay by time starts at the truncate's statement.
    assert await cs.subscribe_from(truncate.at).take(3).collect() == live[2:]


async def test_truncate_of_several_tables_and_cascade(db: ps.Database) -> None:
    a, b, child = tname(), tname(), tname()
    await make_table(db, a)
    await make_table(db, b)
    await execute(
        db,
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, a_id bigint REFERENCES {})").format(
            sql.Identifier(child), sql.Identifier(a)
        ),
    )
    streams: dict[str, ps.PgChangeStream[Row]] = {
        name: ps.PgChangeStream(db, name) for name in (a, b, child)
    }
    for cs in streams.values():
        await cs.install_trigger()
    inserts = await make_table(db)  # TRUNCATE not among its operations
    only_inserts: ps.PgChangeStream[Row] = ps.PgChangeStream(db, inserts, operations=["insert"])
    await only_inserts.install_trigger()
    plain = await make_table(db)  # not captured at all
    await execute(
        db,
        sql.SQL("TRUNCATE {}, {}, {}, {}, {}, {}").format(
            *(sql.Identifier(t) for t in (a, b, child, a, plain, inserts))
        ),
    )
    await execute(db, sql.SQL("TRUNCATE {} CASCADE").format(sql.Identifier(a)))
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (1)").format(sql.Identifier(b)))

    async def ops(cs: ps.PgChangeStream[Row]) -> list[tuple[str, Any]]:
        async with db.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pgstreams.changes WHERE stream = %s", [await cs.key()]
            )
            row = await cur.fetchone()
        assert row is not None
        return ops_of(await cs.subscribe_from(0).take(int(row[0])).collect())

    # One change per statement for each table it truncated, listed twice or by CASCADE.
    assert await ops(streams[a]) == [("truncate", None), ("truncate", None)]
    assert await ops(streams[b]) == [("truncate", None), ("insert", 1)]
    assert await ops(streams[child]) == [("truncate", None), ("truncate", None)]
    assert await ops(only_inserts) == []
    assert only_inserts.operations == ("insert",)
    assert streams[a].operations == ("insert", "update", "delete", "truncate")


async def test_truncate_of_a_partitioned_table_is_one_change(db: ps.Database) -> None:
    parent = tname()
    ident = sql.Identifier(parent)
    await execute(
        db,
        sql.SQL(
            "CREATE TABLE {} (id int, region text, PRIMARY KEY (id, region))"
            " PARTITION BY LIST (region)"
        ).format(ident),
    )
    for region in ("eu", "us"):
        await execute(
            db,
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES IN ({})").format(
                sql.Identifier(f"{parent}_{region}"), ident, sql.Literal(region)
            ),
        )
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, parent, capture="row")
    await cs.install_trigger()
    await execute(db, sql.SQL("INSERT INTO {} VALUES (1, 'eu'), (2, 'us')").format(ident))
    await execute(db, sql.SQL("TRUNCATE {}").format(ident))
    await execute(db, sql.SQL("INSERT INTO {} VALUES (3, 'eu')").format(ident))
    assert len(await logged_ids(db, await cs.key())) == 4  # not one per partition
    changes = await cs.subscribe_from(0).take(4).collect()
    assert [(c.op, c.pk) for c in changes] == [
        ("insert", {"id": 1, "region": "eu"}),
        ("insert", {"id": 2, "region": "us"}),
        ("truncate", None),
        ("insert", {"id": 3, "region": "eu"}),
    ]
    await cs.remove_trigger()
    assert await triggers_on(db, parent) == 0


async def test_upgrade_adds_truncate_capture_to_captures_installed_before(
    db: ps.Database, dsn: str
) -> None:
    # A schema of its own, migrated up to the version before truncate capture, with
    # captures installed as that version did (no truncate trigger) ...
    schema = "chg_upgrade"
    async with ps.connect(dsn, schema=schema) as old:
        async with old.connection() as conn:
            await migrate(conn, schema, upto={"main": 8})
        old._migrated = True  # install as the previous version: what it migrated is all
        everything = await make_table(db, f"Caf\u00e9 {'x' * 40}")  # a hashed channel name
        subset = await make_table(db)
        parent = tname()
        await execute(
            db,
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY) PARTITION BY RANGE (id)").format(
                sql.Identifier(parent)
            ),
        )
        await execute(
            db,
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (0) TO (100)").format(
                sql.Identifier(f"{parent}_p"), sql.Identifier(parent)
            ),
        )
        previous: tuple[Any, ...] = ("insert", "update", "delete")
        for table, kwargs in (
            (everything, {"operations": previous}),
            (subset, {"operations": ("insert", "delete")}),
            (parent, {"operations": previous, "capture": "row"}),
        ):
            await ps.PgChangeStream(old, ("public", table), **kwargs).install_trigger()
    assert [await triggers_on(db, f'"{t}"') for t in (everything, subset, parent)] == [3, 2, 3]
    # ... then the upgrade.
    async with ps.connect(dsn, schema=schema) as new:
        await new.migrate()
        async with new.connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT stream, operations FROM {} ORDER BY stream").format(
                    sql.Identifier(schema, "change_captures")
                )
            )
            registered = {str(r[0]): list(r[1]) for r in await cur.fetchall()}
        cs: ps.PgChangeStream[Row] = ps.PgChangeStream(new, ("public", everything))
        partitioned: ps.PgChangeStream[Row] = ps.PgChangeStream(new, parent, capture="row")
        send, receive = anyio.create_memory_object_stream[ps.Change[Row]](10)
        async with anyio.create_task_group() as tg:
            # The trigger the upgrade added notifies the stream's channel: no poll needed.
            tg.start_soon(forward, cs.subscribe(poll_interval=3600), send)
            await until_idle(new, 1)
            await execute(
                db, sql.SQL("INSERT INTO {} (id) VALUES (1)").format(sql.Identifier(everything))
            )
            await execute(
                db, sql.SQL("INSERT INTO {} (id) VALUES (1)").format(sql.Identifier(parent))
            )
            await execute(
                db,
                sql.SQL("TRUNCATE {}, {}, {}").format(
                    *(sql.Identifier(t) for t in (everything, subset, parent))
                ),
            )
            with anyio.fail_after(10):
                got = [await receive.receive(), await receive.receive()]
            tg.cancel_scope.cancel()
        receive.close()
        assert [(c.op, c.new) for c in got] == [
            ("insert", {"id": 1, "v": 0, "body": None}),
            ("truncate", None),
        ]
        assert [c.op for c in await partitioned.subscribe_from(0).take(2).collect()] == [
            "insert",
            "truncate",
        ]
        async with new.connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE stream = %s").format(
                    sql.Identifier(schema, "changes")
                ),
                [await ps.PgChangeStream(new, subset).key()],
            )
            assert await cur.fetchone() == (0,)
    # Captures that had every operation there was now have truncate too; a chosen subset
    # stays as chosen (installing it afresh with the same arguments would not add it).
    assert registered == {
        f'public."{everything}"': ["insert", "update", "delete", "truncate"],
        f"public.{parent}": ["insert", "update", "delete", "truncate"],
        f"public.{subset}": ["insert", "delete"],
    }
    assert [await triggers_on(db, f'"{t}"') for t in (everything, subset, parent)] == [4, 2, 4]
    assert await triggers_on(db, f"{parent}_p") == 3  # its cloned row triggers only


# -- delivery -------------------------------------------------------------------------


async def test_late_commit_of_an_earlier_transaction_is_not_skipped(
    db: ps.Database, dsn: str
) -> None:
    # A takes the smaller change id but commits after B. A reader that remembered "the last
    # id I delivered" would skip A's change for good once it had delivered B's.
    table = await make_table(db)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(table))
    send, receive = anyio.create_memory_object_stream[ps.Change[Row]](10)
    async with (
        await psycopg.AsyncConnection.connect(dsn) as a,
        await psycopg.AsyncConnection.connect(dsn) as b,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(forward, cs.subscribe(poll_interval=0.05), send)
        await until_idle(db, 1)
        await a.execute(insert, [1])  # A: the smaller change id, still open
        await b.execute(insert, [2])
        await b.commit()
        with anyio.fail_after(10):
            first = await receive.receive()  # B's, without waiting for A
        await anyio.sleep(0.2)  # the subscriber polls on, past B's id
        await a.commit()
        with anyio.fail_after(10):
            second = await receive.receive()
        with anyio.move_on_after(0.3):
            extra = await receive.receive()
            pytest.fail(f"delivered twice: {extra}")
        tg.cancel_scope.cancel()
    receive.close()
    assert [(c.new or {})["id"] for c in (first, second)] == [2, 1]
    assert first.id > second.id


async def test_deferred_commit_stops_at_its_change_when_a_late_commit_follows(
    db: ps.Database, dsn: str
) -> None:
    """Deferred commits (the NATS sink's) count in delivery order: B's two changes come
    first, then A's, whose id is smaller (A committed late). Committing B's second change
    must not commit A's, which was handed out after it and may not be stored yet."""
    table = await make_table(db)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    await cs.add_consumer("ahead")
    insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(table))
    deferring = cs.subscribe(consumer="ahead", poll_interval=0.05)._deferring()
    assert deferring is not None
    free, checkpoint = deferring
    async with (
        await psycopg.AsyncConnection.connect(dsn) as a,
        await psycopg.AsyncConnection.connect(dsn) as b,
        free,
    ):
        await a.execute(insert, [1])  # A: the smallest change id, still open
        await b.execute(insert, [2])
        await b.execute(insert, [3])
        await b.commit()
        with anyio.fail_after(10):
            read = [await anext(free), await anext(free)]
        await a.commit()
        with anyio.fail_after(10):
            read.append(await anext(free))
        assert [(c.new or {})["id"] for c in read] == [2, 3, 1]
        assert read[2].id < read[1].id
        await checkpoint.commit(read[1])
    with anyio.fail_after(10):
        again = await cs.subscribe(consumer="ahead", poll_interval=0.05).take(1).collect()
    assert [(c.new or {})["id"] for c in again] == [1]


async def test_row_order_holds_across_interleaved_transactions(db: ps.Database, dsn: str) -> None:
    # T2 gets a transaction id before R, and R before T1. T1 updates the row and commits;
    # T2 then updates the same row and commits while R is still open. A reader that
    # delivers by ranges of transaction ids below the oldest open one (R) would hand out
    # T2's update -- made second -- before T1's.
    table = await make_table(db)
    ident = sql.Identifier(table)
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (1)").format(ident))
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    update = sql.SQL("UPDATE {} SET v = v + 1 WHERE id = 1").format(ident)
    send, receive = anyio.create_memory_object_stream[ps.Change[Row]](10)
    async with (
        await psycopg.AsyncConnection.connect(dsn) as t2,
        await psycopg.AsyncConnection.connect(dsn) as r,
        await psycopg.AsyncConnection.connect(dsn) as t1,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(forward, cs.subscribe(poll_interval=0.05), send)
        await until_idle(db, 1)
        for conn in (t2, r, t1):
            await conn.execute("SELECT pg_current_xact_id()")  # ids in this order
        await t1.execute(update)
        await t1.commit()
        await t2.execute(update)
        await t2.commit()
        with anyio.fail_after(10):
            got = [await receive.receive(), await receive.receive()]
        await r.commit()
        tg.cancel_scope.cancel()
    receive.close()
    assert [((c.old or {})["v"], (c.new or {})["v"]) for c in got] == [(0, 1), (1, 2)]


@pytest.mark.parametrize("capture", CAPTURES)
async def test_concurrent_writers_every_change_once_in_row_order(
    db: ps.Database, dsn: str, capture: Capture
) -> None:
    table = await make_table(db)
    ident = sql.Identifier(table)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table, capture=capture)
    await cs.install_trigger()
    shared = 40
    await execute(
        db,
        sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(1, %s) g").format(ident),
        shared,
    )
    first_id = max(await logged_ids(db, await cs.key())) + 1  # after the setup rows

    async def writer(w: int) -> None:
        rng = random.Random(w)
        mine: list[int] = []
        ops = made = 0
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            while ops < 1000:
                async with conn.transaction():
                    for target in sorted(rng.sample(range(1, shared + 1), rng.randint(0, 2))):
                        await conn.execute(
                            sql.SQL("UPDATE {} SET v = v + 1 WHERE id = %s").format(ident), [target]
                        )
                        ops += 1
                    made += 1
                    new_id = 100_000 * (w + 1) + made
                    await conn.execute(
                        sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(ident), [new_id]
                    )
                    mine.append(new_id)
                    ops += 1
                    if len(mine) > 3 and rng.random() < 0.5:
                        victim = mine.pop(rng.randrange(len(mine) - 1))
                        await conn.execute(
                            sql.SQL("DELETE FROM {} WHERE id = %s").format(ident), [victim]
                        )
                        ops += 1
                    await anyio.sleep(rng.random() * 0.002)  # commit in a random order

    delivered: list[ps.Change[Row]] = []

    async def consume() -> None:
        async with cs.subscribe_from(first_id, poll_interval=0.05) as stream:
            async for change in stream:
                delivered.append(change)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        async with anyio.create_task_group() as writers:
            for w in range(4):
                writers.start_soon(writer, w)
        expected = [i for i in await logged_ids(db, await cs.key()) if i >= first_id]
        with anyio.fail_after(30):
            while len(delivered) < len(expected):  # noqa: ASYNC110 - polling the consumer
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)  # anything extra would show up now
        tg.cancel_scope.cancel()
    assert len(expected) >= 4000
    ids = [c.id for c in delivered]
    assert sorted(ids) == expected and len(set(ids)) == len(ids)  # each once, none missing
    # Per row, each change starts from the image the previous one left.
    last: dict[int, Row | None] = {}
    for c in delivered:
        key = (c.pk or {})["id"]
        if c.op == "insert":
            assert key not in last, c
        elif key in last:
            assert c.old == last[key], c
        else:
            assert key <= shared, c  # only a setup row may first appear as an update
        last[key] = c.new


async def test_notify_off_relies_on_polling(db: ps.Database) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table, notify="off")
    await cs.install_trigger()
    send, receive = anyio.create_memory_object_stream[ps.Change[Row]](10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward, cs.subscribe(poll_interval=0.1), send)
        await until_idle(db, 1)
        await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (5)").format(sql.Identifier(table)))
        with anyio.fail_after(10):
            assert (await receive.receive()).op == "insert"
        tg.cancel_scope.cancel()
    receive.close()


# -- durable consumers ----------------------------------------------------------------


async def test_durable_consumer_resumes_after_the_last_finished_item(db: ps.Database) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    await cs.add_consumer("idx")  # positioned "now"
    await execute(
        db,
        sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(1, 10) g").format(
            sql.Identifier(table)
        ),
    )

    def ids(changes: list[ps.Change[Row]]) -> list[int]:
        return [c.new["id"] for c in changes if c.new]

    assert ids(await cs.subscribe(consumer="idx").take(3).collect()) == [1, 2, 3]
    assert (await cs.lag("idx")).changes == 7

    def fail_on_5(change: ps.Change[Row]) -> None:
        if change.new and change.new["id"] == 5:
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        await cs.subscribe(consumer="idx").for_each(fail_on_5)
    # 4 was finished; 5 was not, so it comes again.
    assert ids(await cs.subscribe(consumer="idx").take(6).collect()) == [5, 6, 7, 8, 9, 10]
    assert (await cs.lag("idx")).changes == 0
    assert [c.name for c in await cs.consumers()] == ["idx"]
    async with cs.subscribe(consumer="idx") as stream:
        await execute(
            db, sql.SQL("INSERT INTO {} (id) VALUES (11), (12)").format(sql.Identifier(table))
        )
        assert ids([await stream.__anext__()]) == [11]
        await cs.remove_consumer("idx")
        with pytest.raises(ps.InvalidArgumentError, match="removed"):
            await stream.__anext__()  # it cannot store that 11 is finished
    assert await cs.consumers() == []
    with pytest.raises(ps.InvalidArgumentError):
        await cs.lag("idx")


# -- replay ---------------------------------------------------------------------------


async def test_replay_from_a_time_while_writes_continue(db: ps.Database) -> None:
    table = await make_table(db)
    insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(table))
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    total = 600
    since: datetime | None = None
    half = anyio.Event()

    async def write() -> None:
        nonlocal since
        for i in range(total):
            await execute(db, insert, i)
            if i == total // 2:
                async with db.connection() as conn:
                    cur = await conn.execute("SELECT statement_timestamp()")
                    row = await cur.fetchone()
                    assert row is not None
                    since = row[0]
                half.set()

    delivered: list[ps.Change[Row]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        await half.wait()
        assert since is not None
        async with cs.subscribe_from(since, poll_interval=0.05, page_size=50) as stream:
            with anyio.fail_after(20):
                async for change in stream:  # replay, then live, while the writer goes on
                    delivered.append(change)
                    if change.new and change.new["id"] == total - 1:
                        break
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM pgstreams.changes WHERE stream = %s AND at >= %s ORDER BY id",
            [await cs.key(), since],
        )
        expected = [int(r[0]) for r in await cur.fetchall()]
    assert [c.id for c in delivered] == expected  # no gap, no duplicate, in order
    assert delivered[0].new is not None and delivered[0].new["id"] > total // 2


# -- operations -----------------------------------------------------------------------


async def test_prune_keeps_what_a_consumer_has_not_reached(db: ps.Database) -> None:
    table = await make_table(db)
    ident = sql.Identifier(table)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table, retention=timedelta(hours=1))
    await cs.install_trigger()
    await cs.add_consumer("slow")
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (1), (2)").format(ident))
    assert await cs.prune() == 0  # within the retention
    assert await cs.prune(older_than=timedelta(0)) == 0  # "slow" has not read them
    await cs.subscribe(consumer="slow").take(2).collect()
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (3)").format(ident))
    await cs.subscribe(consumer="slow").take(1).collect()  # moves "slow" into a later range
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (4)").format(ident))
    # Only the first transaction's changes lie wholly behind "slow"'s position.
    assert await cs.prune(older_than=datetime.now(UTC) + timedelta(seconds=1)) == 2
    assert len(await logged_ids(db, await cs.key())) == 2
    assert await cs.prune(older_than=timedelta(0), force=True) == 2


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "kwargs"),
    [
        ("no_such_table", {}),
        ("a.b.c.d", {}),
        ('"unterminated', {}),
        ("", {}),
        (("public", ""), {}),
        ("EXISTING", {"operations": ("insert", "upsert")}),
        ("EXISTING", {"operations": ()}),
        ("EXISTING", {"operations": "insert"}),
        ("EXISTING", {"columns": ["no_such_column"]}),
        ("EXISTING", {"columns": []}),
        ("EXISTING", {"notify": "transaction"}),
        ("EXISTING", {"capture": "bulk"}),
        ("EXISTING", {"retention": timedelta(0)}),
    ],
)
async def test_bad_input_installs_nothing(
    db: ps.Database, table: Any, kwargs: dict[str, Any]
) -> None:
    existing = await make_table(db)
    if table == "EXISTING":
        table = existing

    async def install() -> None:
        await ps.PgChangeStream(db, table, **kwargs).install_trigger()

    with pytest.raises(ps.InvalidArgumentError):
        await install()
    assert await triggers_on(db, existing) == 0


async def test_a_view_is_not_a_table(db: ps.Database) -> None:
    existing = await make_table(db)
    view = tname()
    await execute(
        db,
        sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
            sql.Identifier(view), sql.Identifier(existing)
        ),
    )
    with pytest.raises(ps.InvalidArgumentError, match="not a table"):
        await ps.PgChangeStream(db, view).install_trigger()
    with pytest.raises(ps.InvalidArgumentError):
        ps.PgChangeStream(db, existing).subscribe(consumer="tab\there")
    with pytest.raises(ps.InvalidArgumentError):
        ps.PgChangeStream(db, existing).subscribe_from(datetime(2020, 1, 1))  # naive


async def test_durable_consumers_refuse_read_ahead_and_redeliver_given_back(
    db: ps.Database,
) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    # These would ask for changes before the handler is done with earlier ones, which a
    # durable consumer takes as "finished": refused before anything runs.
    durable = cs.subscribe(consumer="idx")
    for make in (
        lambda: durable.buffer(5),
        lambda: durable.batch(5),
        lambda: durable.map(lambda c: c, concurrency=2),
        lambda: durable.filter(lambda c: True).batch(2),
        lambda: ps.merge(durable, cs.subscribe()),
        lambda: ps.Stream(durable).buffer(2),
    ):
        with pytest.raises(ps.InvalidArgumentError, match="durable consumer"):
            make()
    await durable.aclose()
    assert await cs.subscribe().buffer(5).take(0).collect() == []  # fine without a consumer

    await cs.add_consumer("idx")
    await execute(
        db,
        sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(1, 6) g").format(
            sql.Identifier(table)
        ),
    )
    below_3 = cs.subscribe(consumer="idx").take_while(lambda c: (c.pk or {})["id"] < 3)
    assert [(c.pk or {})["id"] for c in await below_3.collect()] == [1, 2]
    # 3 was read to test the predicate but never handed on: it comes again -- also with
    # other operators in between.
    below_4 = (
        ps.Stream(cs.subscribe(consumer="idx")).map(lambda c: (c.pk or {})["id"])
    ).take_while(lambda i: i < 4)
    assert await below_4.collect() == [3]
    again = await cs.subscribe(consumer="idx").take(3).collect()
    assert [(c.pk or {})["id"] for c in again] == [4, 5, 6]


async def test_partitioned_tables_and_refusals(db: ps.Database) -> None:
    parent = tname()
    ident = sql.Identifier(parent)
    await execute(
        db,
        sql.SQL(
            "CREATE TABLE {} (id int, region text, PRIMARY KEY (id, region))"
            " PARTITION BY LIST (region)"
        ).format(ident),
    )
    part = sql.Identifier(f"{parent}_eu")
    await execute(
        db, sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES IN ('eu')").format(part, ident)
    )
    with pytest.raises(ps.InvalidArgumentError, match='capture="row"'):
        await ps.PgChangeStream(db, parent).install_trigger()
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, parent, capture="row")
    await cs.install_trigger()
    await execute(db, sql.SQL("INSERT INTO {} VALUES (1, 'eu')").format(ident))
    await execute(db, sql.SQL("INSERT INTO {} VALUES (2, 'eu')").format(part))  # directly
    changes = await cs.subscribe_from(0).take(2).collect()
    assert [(c.table, c.pk) for c in changes] == [
        (f"public.{parent}", {"id": 1, "region": "eu"}),
        (f"public.{parent}", {"id": 2, "region": "eu"}),
    ]
    with pytest.raises(ps.InvalidArgumentError, match="pgstreams itself"):
        await ps.PgChangeStream(db, "pgstreams.changes").install_trigger()
    base = await make_table(db)
    await execute(
        db,
        sql.SQL("CREATE TABLE {} () INHERITS ({})").format(
            sql.Identifier(tname()), sql.Identifier(base)
        ),
    )
    with pytest.raises(ps.InvalidArgumentError, match="inheritance"):
        await ps.PgChangeStream(db, base, capture="row").install_trigger()


async def test_a_page_reads_its_own_rows_without_statistics(dsn: str) -> None:
    """A change log autovacuum has not analysed yet (just after a bulk load, say): a page
    of a round is still an ordered scan that stops after its rows. Planned from no
    statistics, the plain query was a bitmap scan of the whole rest of the round plus a
    sort -- each page reading the round again."""
    schema = f"s_{uuid.uuid4().hex[:8]}"
    async with ps.connect(dsn, schema=schema) as db:
        await db.migrate()
        changes = sql.Identifier(schema, "changes")
        await execute(db, sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off)").format(changes))
        table = await make_table(db)
        await ps.PgChangeStream(db, table).install_trigger()
        await execute(
            db,
            sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(1, 5000) g").format(
                sql.Identifier(table)
            ),
        )
        page = Log.of(db).sql["page"]
        params = {
            "stream": f"public.{table}",
            "after": 0,
            "top": 2**62,
            "since_at": datetime(1, 1, 1, tzinfo=UTC),
            "since_id": 0,
            "n": 100,
        }
        async with db.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
                [f"{schema}.changes"],
            )
            assert (await cur.fetchone() or [0])[0] < 0  # never analysed: no statistics
            cur = await conn.execute(page, params)
            ids = [int(r[0]) for r in await cur.fetchall()]
            cur = await conn.execute(
                "SELECT pg_stat_get_xact_tuples_fetched(%s::regclass)", [f"{schema}.changes"]
            )
            fetched = int((await cur.fetchone() or [0])[0])
        assert len(ids) == 100 and ids == sorted(ids)
        assert fetched <= 2 * len(ids), f"{fetched} rows read for a page of {len(ids)}"
