"""PgChangeStream under injected failures: the shared listener's backend terminated while
a subscriber waits, durable consumer processes killed while they hold a change."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from psycopg import sql

import pgstreams as ps

from .._killed_consumer import kill_when_ready
from ..integration.test_changes import Row, execute, logged_ids, make_table
from ..pgserver import allow_connections, terminate_backends
from ..streams import forward, until_idle

CHANGE_CONSUMER = Path(__file__).parents[1] / "_change_consumer.py"


async def test_listener_killed_mid_stream_loses_nothing(db: ps.Database, dsn: str) -> None:
    table = await make_table(db)
    insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(table))
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    send, receive = anyio.create_memory_object_stream[ps.Change[Row]](100)
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward, cs.subscribe(poll_interval=3600), send)
        await until_idle(db, 1)
        await execute(db, insert, 0)
        with anyio.fail_after(10):
            assert (await receive.receive()).new == {"id": 0, "v": 0, "body": None}
            await until_idle(db, 1)  # its connection is back: the insert below needs one
            allow_connections(dsn, False)
            try:
                assert terminate_backends(dsn, application_name="pgstreams-listener") == 1
                await execute(db, insert, 1)  # its NOTIFY reaches nobody
                with anyio.move_on_after(0.3):
                    await receive.receive()
                    pytest.fail("delivered without a listener or a poll")
            finally:
                allow_connections(dsn, True)
            # The listener reconnects and wakes every subscriber, which reads the log.
            assert (await receive.receive()).new == {"id": 1, "v": 0, "body": None}
            await execute(db, insert, 2)
            assert (await receive.receive()).new == {"id": 2, "v": 0, "body": None}
        tg.cancel_scope.cancel()
    receive.close()
    assert db.listener.reconnects == 1


async def test_durable_consumer_killed_mid_stream(db: ps.Database, dsn: str) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    await cs.add_consumer("billing-sync")
    await execute(
        db,
        sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(1, 30) g").format(
            sql.Identifier(table)
        ),
    )
    handed = await kill_when_ready(CHANGE_CONSUMER, dsn, table, "billing-sync", "12")
    assert len(handed) == 12
    finished, unfinished = handed[:-1], handed[-1]
    rest = await cs.subscribe(consumer="billing-sync").take(30 - len(finished)).collect()
    again = [c.id for c in rest]
    assert again[0] == unfinished  # the one it held is delivered again ...
    assert not set(again) & set(finished)  # ... and nothing it had finished
    assert sorted(finished + again) == await logged_ids(db, await cs.key())


async def test_durable_consumer_killed_holding_a_truncate(db: ps.Database, dsn: str) -> None:
    table = await make_table(db)
    ident = sql.Identifier(table)
    cs: ps.PgChangeStream[Row] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    await cs.add_consumer("mirror")
    fill = sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(%s::int, %s::int) g").format(
        ident
    )
    await execute(db, fill, 1, 5)
    await execute(db, sql.SQL("TRUNCATE {}").format(ident))
    await execute(db, fill, 6, 8)
    handed = await kill_when_ready(CHANGE_CONSUMER, dsn, table, "mirror", "6")
    assert len(handed) == 6  # five inserts, then the truncate it never finished
    rest = await cs.subscribe(consumer="mirror").take(4).collect()
    assert [(c.id, c.op) for c in rest][:1] == [(handed[-1], "truncate")]
    assert [(c.new or {}).get("id") for c in rest] == [None, 6, 7, 8]
    assert handed[:-1] + [c.id for c in rest] == await logged_ids(db, await cs.key())
