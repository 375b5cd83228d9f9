"""PgmqQueue under injected faults: killed consumer processes, consumers cancelled at random
moments, and backends terminated under waiting consumers."""

from __future__ import annotations

import random
import uuid

import anyio
import psycopg
import pytest

import pgstreams as ps

from .._killed_consumer import run_and_kill
from ..pgserver import terminate_backends
from ..streams import forward, until_idle


def qname() -> str:
    return f"f_{uuid.uuid4().hex[:10]}"


async def polling_backend(db: ps.Database, other_than: int | None = None) -> int:
    """The pid of the backend running ``pgmq.read_with_poll`` (once there is one)."""
    with anyio.fail_after(10):
        while True:
            async with db.connection() as conn:
                cur = await conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE state = 'active'"
                    " AND query LIKE '%%pgmq.read_with_poll(%%' AND pid <> pg_backend_pid()"
                    " AND pid IS DISTINCT FROM %s",
                    [other_than],
                )
                row = await cur.fetchone()
            if row is not None:
                return int(row[0])
            await anyio.sleep(0.01)


async def test_killed_consumer_leases_come_back_after_vt(db: ps.Database, dsn: str) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    await q.publish_batch(list(range(30)))
    seen_by_victim = await run_and_kill(dsn, q.name, 4, "pgmq")
    assert seen_by_victim == list(range(10))
    m = await q.metrics()
    assert (m.queue_length, m.visible) == (26, 20)  # 6 still leased by the dead process

    redelivered: dict[int, int] = {}
    mode = ps.ReadMode.standard(vt=30, qty=5)
    async with q.subscribe_ack(read_mode=mode, poll_interval=0.1) as envelopes:
        with anyio.fail_after(20):
            async for env in envelopes:
                redelivered[env.value] = env.attempts
                assert await env.ack()
                if len(redelivered) == 26:
                    break
    assert sorted(redelivered) == list(range(4, 30))
    assert {v: redelivered[v] for v in range(4, 10)} == dict.fromkeys(range(4, 10), 2)
    assert {redelivered[v] for v in range(10, 30)} == {1}


@pytest.mark.parametrize("kind", ["standard", "poll"])
async def test_cancelled_consumers_never_strand_a_message(db: ps.Database, kind: str) -> None:
    # Consumers are cancelled at random moments -- mid-read, mid-poll, between reads. A
    # message read but never handed out must go back at once, not stay hidden for its vt.
    q = await ps.PgmqQueue.create(db, qname())
    total = 200
    rng = random.Random(7)
    delivered: set[int] = set()
    mode = (
        ps.ReadMode.poll(vt=60, qty=3, max_poll_seconds=2, poll_interval_ms=5)
        if kind == "poll"
        else ps.ReadMode.standard(vt=60, qty=3)
    )

    async def produce() -> None:
        for i in range(total):
            await q.publish(i)
            await anyio.sleep(rng.uniform(0, 0.004))

    async def consume() -> None:
        while len(delivered) < total:
            with anyio.move_on_after(rng.uniform(0.0, 0.02)):
                async with q.subscribe_ack(read_mode=mode, poll_interval=0.05) as envelopes:
                    async for env in envelopes:
                        delivered.add(env.id)  # kept under its 60 s lease, never acked

    with anyio.move_on_after(25):
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            for _ in range(3):
                tg.start_soon(consume)
    async with db.connection() as conn:
        cur = await conn.execute(
            psycopg.sql.SQL("SELECT msg_id, read_ct FROM {}").format(
                psycopg.sql.Identifier("pgmq", f"q_{q.name}")
            )
        )
        rows = await cur.fetchall()
    stranded = [(msg_id, reads) for msg_id, reads in rows if msg_id not in delivered and reads]
    assert stranded == []
    assert len(delivered) == total


async def test_server_side_poll_rides_out_its_terminated_backend(db: ps.Database, dsn: str) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    mode = ps.ReadMode.poll(vt=30, qty=1, max_poll_seconds=30, poll_interval_ms=20)
    send, receive = anyio.create_memory_object_stream[ps.Envelope[str]](10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward, q.subscribe_ack(read_mode=mode), send)
        victim = await polling_backend(db)
        assert terminate_backends(dsn, pid=victim) == 1
        await polling_backend(db, other_than=victim)  # polling again, on a new connection
        await q.publish("after")
        with anyio.fail_after(10):
            env = await receive.receive()
        assert (env.value, env.attempts) == ("after", 1)
        assert await env.ack()
        tg.cancel_scope.cancel()
    receive.close()
    assert (await q.metrics()).queue_length == 0


@pytest.mark.parametrize("notify", [False, True])
async def test_idle_subscriber_rides_out_every_backend_terminated(
    db: ps.Database, dsn: str, notify: bool
) -> None:
    # Every pooled connection (and the listener's) dies while the subscriber sleeps: its next
    # pop fails on a dead connection, and it retries on a new one rather than ending.
    q = await ps.PgmqQueue.create(db, qname())
    if notify:
        await q.enable_notify(throttle_ms=0)
    await q.publish("before")
    send, receive = anyio.create_memory_object_stream[str](10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward, q.subscribe(poll_interval=0.05), send)
        with anyio.fail_after(10):
            assert await receive.receive() == "before"
        await until_idle(db, 1)
        assert terminate_backends(dsn) >= 1
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await q.publish("after", conn=conn)
        with anyio.fail_after(10):
            assert await receive.receive() == "after"
        tg.cancel_scope.cancel()
    receive.close()
    assert (await q.metrics()).queue_length == 0
