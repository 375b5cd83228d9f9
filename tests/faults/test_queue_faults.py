"""PgQueue under injected faults: terminated backends, a read whose result is lost with its
connection, pool connections killed under a stream holding messages, killed consumer
processes, and a killed LISTEN connection. Nothing delivered may be lost."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgstreams as ps
from pgstreams._sources.queue import autoack

from .._killed_consumer import run_and_kill
from ..pgserver import allow_connections, terminate_backends
from ..streams import forward, until_idle


def qname() -> str:
    return f"f_{uuid.uuid4().hex[:10]}"


async def ack_attempts(q: ps.PgQueue[int], count: int, *, prefetch: int) -> dict[int, int]:
    """Lease and ack ``count`` messages; returns each value's attempt number."""
    attempts: dict[int, int] = {}
    async with q.subscribe_ack(visibility=30, prefetch=prefetch) as envelopes:
        with anyio.fail_after(20):
            async for env in envelopes:
                attempts[env.value] = env.attempts
                assert await env.ack()
                if len(attempts) == count:
                    break
    return attempts


# -- auto-ack (subscribe) ------------------------------------------------------------------


async def test_auto_ack_read_lost_with_its_connection_reaches_a_fresh_subscriber(
    db: ps.Database, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish({"job": 1})
    lost = anyio.Event()
    run = autoack._run

    async def read_then_lose_the_connection(
        conn: psycopg.AsyncConnection[Any],
        parts: list[bytes],
        params: dict[str, Any],
        *,
        fetch: bool = False,
    ) -> list[Any]:
        """The read runs on the server, then its backend is terminated before the rows
        reach the subscriber."""
        rows = await run(conn, parts, params, fetch=fetch)
        if fetch and not lost.is_set():
            assert len(rows) == 1
            assert terminate_backends(dsn, pid=conn.info.backend_pid) == 1
            lost.set()
            await run(conn, [b"SELECT 1"], {})  # the connection is gone: raises
            pytest.fail("a terminated connection ran a statement")
        return rows

    monkeypatch.setattr(autoack, "_run", read_then_lose_the_connection)
    async with anyio.create_task_group() as tg:
        tg.start_soon(q.subscribe(visibility=3600).first)  # rides out the failure, retrying
        await lost.wait()
        tg.cancel_scope.cancel()  # and then gives up
    # Back in line at once, not after the hour-long lease.
    with anyio.fail_after(10):
        assert await q.subscribe().first() == {"job": 1}
    m = await q.metrics()
    assert (m.pending, m.processing, m.completed, m.dead, m.total) == (0, 0, 1, 0, 1)


async def test_auto_ack_read_ahead_survives_its_pool_connections_being_killed(dsn: str) -> None:
    app = f"holder-{uuid.uuid4().hex[:6]}"
    async with ps.connect(make_conninfo(dsn, application_name=app)) as db:
        q = await ps.PgQueue.create(db, qname())
        await q.publish_batch(list(range(10)))
        second_read = anyio.Event()

        def note(value: int) -> None:
            if value == 5:
                second_read.set()

        # Reads of 5 under a long lease: only the close can bring back what is held.
        async with q.subscribe(prefetch=5, visibility=3600).tap(note).buffer(4) as values:
            assert await anext(values) == 0
            with anyio.fail_after(10):
                await second_read.wait()
            # Now 1-4 wait in the buffer, 5 is on its way there and 6-9 are read ahead.
            assert terminate_backends(dsn, application_name=app) >= 1
        with anyio.fail_after(10):
            rest = await q.subscribe(prefetch=9).take(9).collect()
        assert rest == list(range(1, 10))
        m = await q.metrics()
        assert (m.pending, m.processing, m.completed, m.total) == (0, 0, 10, 10)


async def test_auto_ack_consumer_process_killed_mid_batch_loses_nothing(
    db: ps.Database, dsn: str
) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish_batch(list(range(30)))
    # Reads 4 at a time under a 2 s lease; killed while handling its 10th message.
    seen_by_victim = await run_and_kill(dsn, q.name, 0, "pgqueue-auto")
    assert seen_by_victim == list(range(10))
    m = await q.metrics()
    # 0-7 were deleted by the reads after theirs; 8-11 (8 and 9 delivered, 10 and 11 read
    # ahead) were taken by the open read when it died, and are back as they were.
    assert (m.completed, m.processing + m.pending, m.total) == (8, 22, 30)

    redelivered = await ack_attempts(q, 22, prefetch=30)
    assert sorted(redelivered) == list(range(8, 30))
    assert set(redelivered.values()) == {1}
    assert (await q.metrics()).completed == 30


# -- manual ack (subscribe_ack), the listener and the pool ---------------------------------


async def test_consumer_whose_connection_dies_mid_lease_is_redelivered(
    db: ps.Database, dsn: str
) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish({"job": 1})
    app = f"doomed-{uuid.uuid4().hex[:6]}"
    async with ps.connect(make_conninfo(dsn, application_name=app)) as doomed_db:
        doomed: ps.PgQueue[Any] = ps.PgQueue(doomed_db, q.name)
        env = await doomed.subscribe_ack(visibility=1.0).first()
        assert env.attempts == 1
        assert terminate_backends(dsn, application_name=app) >= 1
        with pytest.raises(ps.DatabaseError):
            await env.ack()
    # The lease is still held: nobody else may see the message until it runs out.
    m = await q.metrics()
    assert (m.pending, m.processing) == (0, 1)
    with anyio.fail_after(10):
        again = await q.subscribe_ack(visibility=5).first()
    assert (again.id, again.attempts) == (env.id, 2)
    assert await again.ack()


async def test_listener_killed_mid_stream_loses_nothing(db: ps.Database, dsn: str) -> None:
    q = await ps.PgQueue.create(db, qname())
    send, receive = anyio.create_memory_object_stream[int](100)

    with anyio.fail_after(30):
        async with receive, anyio.create_task_group() as tg:
            tg.start_soon(forward, q.subscribe(poll_interval=3600), send)
            await q.publish(0)
            assert await receive.receive() == 0
            await until_idle(db, 1)  # the consumer has read everything and sleeps
            # Keep the listener from reconnecting while a message is published, so its
            # notification is certainly lost; only the wake-up after reconnect can save it.
            allow_connections(dsn, False)
            try:
                assert terminate_backends(dsn, application_name="pgstreams-listener") == 1
                await q.publish(1)
                with anyio.move_on_after(0.3):
                    await receive.receive()
                    pytest.fail("delivered without a listener")
            finally:
                allow_connections(dsn, True)
            assert await receive.receive() == 1
            for i in range(2, 6):  # and the new LISTEN connection carries the rest
                await q.publish(i)
                assert await receive.receive() == i
            tg.cancel_scope.cancel()
    assert db.listener.reconnects == 1


async def test_consumer_process_killed_mid_batch_loses_nothing(db: ps.Database, dsn: str) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish_batch(list(range(30)))
    seen_by_victim = await run_and_kill(dsn, q.name, 4)
    assert seen_by_victim == list(range(10))
    m = await q.metrics()
    assert (m.completed, m.processing, m.pending) == (4, 6, 20)

    redelivered = await ack_attempts(q, 26, prefetch=5)
    # Acked before the kill: never again. Leased but unacked: back after the lease, attempt 2.
    assert sorted(redelivered) == list(range(4, 30))
    assert {v: redelivered[v] for v in range(4, 10)} == dict.fromkeys(range(4, 10), 2)
    assert set(redelivered[v] for v in range(10, 30)) == {1}
    assert (await q.metrics()).completed == 30


async def test_subscriber_survives_losing_its_pool_connections(dsn: str) -> None:
    app = f"survivor-{uuid.uuid4().hex[:6]}"
    async with ps.connect(make_conninfo(dsn, application_name=app)) as db:
        q = await ps.PgQueue.create(db, qname())
        send, receive = anyio.create_memory_object_stream[int](10)
        with anyio.fail_after(20):
            async with receive, anyio.create_task_group() as tg:
                tg.start_soon(forward, q.subscribe(poll_interval=3600), send)
                await q.publish(1)
                assert await receive.receive() == 1
                await until_idle(db, 1)
                assert terminate_backends(dsn, application_name=app) >= 1
                async with ps.connect(dsn) as other:
                    producer: ps.PgQueue[int] = ps.PgQueue(other, q.name)
                    await producer.publish(2)
                assert await receive.receive() == 2
                tg.cancel_scope.cancel()


async def test_failed_ack_can_be_retried(db: ps.Database, dsn: str) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish("x")
    env = await q.subscribe_ack(visibility=60).first()
    app = f"acker-{uuid.uuid4().hex[:6]}"
    async with ps.connect(make_conninfo(dsn, application_name=app)) as flaky:
        handle: ps.PgQueue[Any] = ps.PgQueue(flaky, q.name)
        stale = ps.Envelope(
            handle,
            id=env.id,
            value=env.value,
            headers={},
            attempts=1,
            enqueued_at=env.enqueued_at,
            lease=env._lease,
        )
        terminate_backends(dsn, application_name=app)
        with pytest.raises(ps.DatabaseError) as info:
            await stale.ack()
        assert info.value.transient
        assert not stale.settled
        assert await stale.ack() is True  # the lease is still held: the retry succeeds
    assert (await q.metrics()).completed == 1
