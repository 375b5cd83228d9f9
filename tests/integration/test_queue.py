"""PgQueue on a real PostgreSQL: delivery, leases, dead letters, transactions, metrics."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import anyio
import psycopg
import pytest

import pgstreams as ps
import pgstreams._sources.queue.queue

from ..streams import until_idle


def qname() -> str:
    return f"q_{uuid.uuid4().hex[:10]}"


async def test_publish_then_auto_ack_subscribe(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    ids = await q.publish_batch([{"n": i} for i in range(5)])
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert await q.subscribe().take(5).collect() == [{"n": i} for i in range(5)]
    m = await q.metrics()
    assert (m.pending, m.processing, m.completed, m.dead, m.total) == (0, 0, 5, 0, 5)


async def test_auto_ack_deletes_a_message_once_the_next_is_asked_for(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish_batch(list(range(5)))
    async with q.subscribe(prefetch=2) as values:
        assert await anext(values) == 0
        m = await q.metrics()  # 0 and 1 are taken by the open read; nothing is deleted yet
        assert (m.pending, m.processing, m.completed) == (3, 2, 0)
        assert await anext(values) == 1
        assert (await q.metrics()).completed == 0
        assert await anext(values) == 2  # asking for more deleted the last read
        m = await q.metrics()
        assert (m.pending, m.processing, m.completed) == (1, 2, 2)
    m = await q.metrics()  # the close deleted 2 and released 3
    assert (m.pending, m.processing, m.completed, m.total) == (2, 0, 3, 5)
    rest = await q.subscribe_ack(prefetch=2).take(2).collect()
    assert [(e.value, e.attempts) for e in rest] == [(3, 1), (4, 1)]
    assert await q.ack_many(rest) == 2


async def test_auto_ack_consumer_that_hangs_gives_its_read_back_after_visibility(
    db: ps.Database, caplog: pytest.LogCaptureFixture
) -> None:
    q = await ps.PgQueue.create(db, qname(), max_attempts=1)
    ids = await q.publish_batch([0, 1, 2])
    async with q.subscribe(prefetch=3, visibility=0.2) as slow:
        assert await anext(slow) == 0
        # Handling 0 outlasts the lease: the server ends the session idle in the read's
        # transaction, and all three are back in line as they were (attempts not counted,
        # so max_attempts=1 does not send them to the dead set).
        with anyio.fail_after(10):
            other = await q.subscribe_ack(prefetch=2).take(2).collect()
        assert [(e.id, e.attempts) for e in other] == [(ids[0], 1), (ids[1], 1)]
        # The slow consumer never hands out 1 (the other consumer has it): its read is gone,
        # so it reads again and goes on with 2, which no one else took.
        with anyio.fail_after(10):
            assert await anext(slow) == 2
    assert await q.ack_many(other) == 2
    m = await q.metrics()
    assert (m.pending, m.processing, m.completed, m.dead, m.total) == (0, 0, 3, 0, 3)
    assert "go back in line" in caplog.text


async def test_auto_ack_read_moves_a_spent_manual_ack_lease_to_the_dead_set(
    db: ps.Database,
) -> None:
    q = await ps.PgQueue.create(db, qname(), max_attempts=1)
    await q.publish("slow")
    await q.publish("next")
    env = await q.subscribe_ack(visibility=0.2).first()  # never acked: its only attempt
    assert env.value == "slow"
    await anyio.sleep(0.3)
    with anyio.fail_after(10):
        assert await q.subscribe(prefetch=2).first() == "next"
    [dead] = await q.dead_letters()
    assert (dead.value, dead.attempts, dead.last_error) == ("slow", 1, "visibility timeout expired")
    m = await q.metrics()
    assert (m.pending, m.processing, m.completed, m.dead) == (0, 0, 1, 1)


async def test_auto_ack_close_puts_back_read_ahead_in_its_place(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    ids = await q.publish_batch(list(range(4)), headers={"k": "v"})
    async with q.subscribe(prefetch=4) as values:
        assert [await anext(values), await anext(values)] == [0, 1]
    m = await q.metrics()
    assert (m.pending, m.processing, m.completed, m.total) == (2, 0, 2, 4)
    rest = await q.subscribe_ack(prefetch=2).take(2).collect()
    assert [(e.id, e.value, e.headers, e.attempts) for e in rest] == [
        (ids[2], 2, {"k": "v"}, 1),
        (ids[3], 3, {"k": "v"}, 1),
    ]
    assert await q.ack_many(rest) == 2


async def test_headers_and_envelope_fields(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    msg_id = await q.publish("hello", headers={"x-priority": "high"})
    env = await q.subscribe_ack(visibility=10).first()
    assert (env.id, env.value, env.headers, env.attempts) == (
        msg_id,
        "hello",
        {"x-priority": "high"},
        1,
    )
    assert env.enqueued_at.tzinfo is not None
    assert await env.ack() is True
    with pytest.raises(ps.InvalidArgumentError):
        await env.ack()


async def test_four_concurrent_ack_consumers_process_each_message_once(dsn: str) -> None:
    total = 2000
    async with ps.connect(dsn) as setup:
        q = await ps.PgQueue.create(setup, qname())
        for start in range(0, total, 500):
            await q.publish_batch(list(range(start, start + 500)))
    seen: Counter[int] = Counter()
    done = anyio.Event()

    async def consumer() -> None:
        async with ps.connect(dsn) as db:
            mine: ps.PgQueue[int] = ps.PgQueue(db, q.name)
            async with mine.subscribe_ack(visibility=30, prefetch=7) as envs:
                async for env in envs:
                    seen[env.value] += 1
                    assert await env.ack()
                    await anyio.lowlevel.checkpoint()
                    if sum(seen.values()) >= total:
                        done.set()

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(consumer)
        with anyio.fail_after(60):
            await done.wait()
        tg.cancel_scope.cancel()
    assert sorted(seen) == list(range(total))
    assert set(seen.values()) == {1}
    async with ps.connect(dsn) as check:
        m = await ps.PgQueue(check, q.name).metrics()
    assert (m.pending, m.processing, m.completed, m.dead) == (0, 0, total, 0)


async def test_consumer_cancelled_mid_lease_is_redelivered(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish("work")
    got: list[ps.Envelope[Any]] = []

    async def handler(env: ps.Envelope[Any]) -> None:
        got.append(env)
        await anyio.sleep_forever()

    with anyio.move_on_after(0.3):
        await q.subscribe_ack(visibility=0.8).for_each(handler)
    assert len(got) == 1 and not got[0].settled
    assert (await q.metrics()).processing == 1
    with anyio.fail_after(10):
        again = await q.subscribe_ack(visibility=5).first()
    assert (again.id, again.attempts) == (got[0].id, 2)
    # The first consumer's lease is gone: its late ack must not delete the redelivered one.
    assert await got[0].ack() is False
    assert (await q.metrics()).processing == 1
    assert await again.ack()


async def test_poison_message_goes_dead_and_can_be_requeued(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname(), max_attempts=3)
    await q.publish({"poison": True})
    for attempt in (1, 2, 3):
        env = await q.subscribe_ack(visibility=10).first()
        assert env.attempts == attempt
        assert await env.nack(error=f"boom {attempt}")
    m = await q.metrics()
    assert (m.pending, m.processing, m.dead) == (0, 0, 1)
    [dead] = await q.dead_letters()
    assert (dead.value, dead.attempts, dead.last_error) == ({"poison": True}, 3, "boom 3")
    with anyio.move_on_after(0.3):
        await q.subscribe_ack(visibility=10).first()
        pytest.fail("a dead message was delivered")
    assert await q.requeue_dead() == 1
    env = await q.subscribe_ack(visibility=10).first()
    assert (env.value, env.attempts) == ({"poison": True}, 1)
    assert await env.ack()


async def test_expired_lease_on_last_attempt_goes_dead(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname(), max_attempts=1)
    await q.publish("slow")
    env = await q.subscribe_ack(visibility=0.2).first()
    assert env.attempts == 1
    await anyio.sleep(0.3)
    with anyio.move_on_after(0.3):
        await q.subscribe_ack(visibility=10).first()
        pytest.fail("delivered past max_attempts")
    [dead] = await q.dead_letters()
    assert dead.last_error == "visibility timeout expired"


async def test_nack_with_delay_backs_off(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish("retry me")
    env = await q.subscribe_ack(visibility=10).first()
    assert await env.nack(delay=0.5, error="try later")
    m = await q.metrics()
    assert (m.pending, m.processing) == (1, 0)
    start = anyio.current_time()
    with anyio.fail_after(10):
        again = await q.subscribe_ack(visibility=10).first()
    assert anyio.current_time() - start >= 0.4
    assert again.attempts == 2
    assert await again.ack()


async def test_delayed_publish_becomes_visible_later(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish("later", delay=0.5)
    await q.publish("now")
    assert await q.subscribe().first() == "now"
    with anyio.fail_after(10):
        assert await q.subscribe(poll_interval=30).first() == "later"


async def test_extend_keeps_lease_and_lost_lease_is_reported(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish("x")
    env = await q.subscribe_ack(visibility=0.3).first()
    await env.extend(30)
    await anyio.sleep(0.4)
    assert (await q.metrics()).processing == 1
    await env.extend(0.1)
    await anyio.sleep(0.2)
    stolen = await q.subscribe_ack(visibility=30).first()
    assert stolen.attempts == 2
    with pytest.raises(ps.LeaseLostError):
        await env.extend(10)
    assert await env.nack() is False
    assert await stolen.ack()


async def test_read_ahead_leases_are_released_on_close(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish_batch(list(range(5)))
    taken = await q.subscribe_ack(visibility=30, prefetch=5).take(2).collect()
    assert [e.value for e in taken] == [0, 1]
    m = await q.metrics()
    assert (m.pending, m.processing) == (3, 2)
    rest = await q.subscribe_ack(visibility=30, prefetch=5).take(3).collect()
    assert [(e.value, e.attempts) for e in rest] == [(2, 1), (3, 1), (4, 1)]
    assert await q.ack_many([*taken, *rest]) == 5


async def test_auto_ack_read_ahead_is_put_back_on_close(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    ids = await q.publish_batch([{"i": i} for i in range(5)], headers={"h": 1})
    assert await q.subscribe(prefetch=5).take(2).collect() == [{"i": 0}, {"i": 1}]
    m = await q.metrics()
    assert (m.pending, m.completed, m.total) == (3, 2, 5)
    rest = await q.subscribe_ack(prefetch=3).take(3).collect()
    assert [(e.id, e.value, e.headers) for e in rest] == [
        (ids[i], {"i": i}, {"h": 1}) for i in (2, 3, 4)
    ]
    assert await q.ack_many(rest) == 3


async def test_transactional_publish_commit_and_rollback(db: ps.Database, dsn: str) -> None:
    q = await ps.PgQueue.create(db, qname())
    received: list[Any] = []
    arrived = anyio.Event()

    async def consume() -> None:
        async with q.subscribe(poll_interval=60) as stream:
            received.append(await anext(stream))
            arrived.set()

    class Rollback(Exception):
        pass

    async def publish_then_roll_back(conn: psycopg.AsyncConnection[Any]) -> None:
        async with conn.transaction():
            await q.publish({"rolled": "back"}, conn=conn)
            raise Rollback

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            with pytest.raises(Rollback):
                await publish_then_roll_back(conn)
            async with conn.transaction():
                await q.publish({"committed": True}, conn=conn)
                await anyio.sleep(0.3)
                assert received == []  # not visible before commit
        with anyio.fail_after(10):
            await arrived.wait()
    assert received == [{"committed": True}]
    m = await q.metrics()
    assert (m.pending, m.completed, m.total) == (0, 1, 1)


async def test_metrics_exact_after_mixed_workload(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname(), max_attempts=1)
    await q.publish_batch(list(range(8)))
    await q.publish_batch([100, 101], delay=3600)
    envs = await q.subscribe_ack(visibility=60, prefetch=6).take(6).collect()
    assert [e.value for e in envs] == list(range(6))
    assert await q.ack_many(envs[:3]) == 3  # 3 completed
    assert await envs[3].nack(error="bad")  # attempts == max → dead
    assert await envs[4].nack(delay=3600) is True  # max reached → dead as well
    # envs[5] stays leased; 6 and 7 pending; 100 and 101 pending (delayed)
    assert await q.subscribe().take(1).collect() == [6]  # auto-ack → completed
    m = await q.metrics()
    assert (m.pending, m.processing, m.completed, m.dead, m.total) == (3, 1, 4, 2, 10)
    assert await q.purge() == 6
    m = await q.metrics()
    assert (m.pending, m.processing, m.dead, m.completed) == (0, 0, 0, 4)


async def test_create_is_idempotent_and_drop_removes_queue(db: ps.Database) -> None:
    name = qname()
    q = await ps.PgQueue.create(db, name, max_attempts=2)
    await q.publish(1)
    again = await ps.PgQueue.create(db, name, max_attempts=4)
    assert (await again.metrics()).pending == 1
    await again.drop()
    with pytest.raises(ps.DatabaseError):
        await q.metrics()


async def test_create_races_are_safe(dsn: str) -> None:
    name = qname()

    async def create() -> None:
        async with ps.connect(dsn) as db:
            await ps.PgQueue.create(db, name)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(create)


async def test_failing_handler_keeps_delivered_leases_and_releases_read_ahead(
    db: ps.Database,
) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish_batch(list(range(10)))

    def handle(env: ps.Envelope[int]) -> None:
        if env.value == 2:
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await q.subscribe_ack(prefetch=5, visibility=30).for_each(handle)
    # Three handed out (0, 1, 2) keep their leases; the two read ahead are released.
    m = await q.metrics()
    assert (m.processing, m.pending) == (3, 7)
    # The fixture then checks that no connection is checked out and no LISTEN is registered.


async def test_every_handle_applies_the_stored_max_attempts(
    db: ps.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = qname()
    await ps.PgQueue.create(db, name, max_attempts=2)
    await ps.PgQueue.create(db, name)  # without max_attempts: keeps the stored limit
    other: ps.PgQueue[Any] = ps.PgQueue(db, name)  # opened, not created
    await other.publish("poison")
    for _ in range(2):
        env = await other.subscribe_ack().first()
        assert await env.nack(error="no")
    assert (await other.metrics()).dead == 1
    await ps.PgQueue.create(db, name, max_attempts=None)  # explicitly unlimited
    # Running handles pick the change up within LIMIT_TTL; make that now.
    monkeypatch.setattr(pgstreams._sources.queue.queue, "LIMIT_TTL", 0.0)
    assert await other.requeue_dead() == 1
    for attempt in range(1, 5):
        env = await other.subscribe_ack().first()
        assert env.attempts == attempt
        assert await env.nack()
    assert (await other.metrics()).dead == 0


async def test_operator_read_ahead_goes_back_to_the_queue(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    ids = await q.publish_batch([{"n": i} for i in range(40)], headers={"h": "x"})

    async def slowly(_: Any) -> None:
        await anyio.sleep(0.01)

    got = await q.subscribe().buffer(10).tap(slowly).take(3).collect()
    got += await ps.merge(q.subscribe()).tap(slowly).take(2).collect()
    got += [
        x for b in await q.subscribe().batch(4, within=5).tap(slowly).take(1).collect() for x in b
    ]
    assert got == [{"n": i} for i in range(9)]
    m = await q.metrics()
    assert (m.pending, m.completed, m.total) == (31, 9, 40)
    rest = await q.subscribe_ack(prefetch=31).take(31).collect()
    # Put back with their own ids and headers, in order, never delivered twice.
    assert [(e.id, e.value, e.headers, e.attempts) for e in rest] == [
        (ids[i], {"n": i}, {"h": "x"}, 1) for i in range(9, 40)
    ]
    assert await q.ack_many(rest) == 31


async def test_auto_ack_value_given_back_before_the_close_is_released(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    ids = await q.publish_batch(list(range(3)))
    got: list[int] = []
    # throttle gives its held value back while the source is still open.
    with anyio.move_on_after(0.3):
        await q.subscribe(prefetch=3).throttle(per_second=1).for_each(got.append)
    assert got == [0]
    m = await q.metrics()
    assert (m.pending, m.processing, m.completed) == (2, 0, 1)
    rest = await q.subscribe_ack(prefetch=2).take(2).collect()
    assert [(e.id, e.value, e.attempts) for e in rest] == [(ids[1], 1, 1), (ids[2], 2, 1)]
    assert await q.ack_many(rest) == 2


async def test_operator_read_ahead_leases_are_released(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname(), max_attempts=1)
    await q.publish_batch(list(range(10)))

    async def slowly(_: Any) -> None:
        await anyio.sleep(0.01)

    taken = await q.subscribe_ack(visibility=60).buffer(5).tap(slowly).take(2).collect()
    m = await q.metrics()
    # Read ahead but never delivered: released unharmed, not dead after one "attempt".
    assert (m.processing, m.pending, m.dead) == (2, 8, 0)
    assert await q.ack_many(taken) == 2


async def test_busy_consumer_can_be_cancelled(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish_batch(list(range(5000)))
    handled: list[int] = []
    with anyio.move_on_after(0.2):
        await q.subscribe().for_each(handled.append)  # a callback that never awaits
    assert 0 < len(handled) < 5000
    m = await q.metrics()
    assert (m.pending, m.completed) == (5000 - len(handled), len(handled))


async def test_nack_wakes_an_idle_consumer_at_once(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish("hot potato")
    first = await q.subscribe_ack(visibility=3600).first()
    got: list[ps.Envelope[Any]] = []

    async def idle_consumer() -> None:
        got.append(await q.subscribe_ack(visibility=60, poll_interval=3600).first())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(idle_consumer)
            await until_idle(db, 1)  # asleep until the lease runs out, in an hour
            assert await first.nack()
    assert (got[0].id, got[0].attempts) == (first.id, 2)
    assert await got[0].ack()


async def test_ack_many_matches_each_envelope_to_its_own_lease(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    await q.publish("x")
    stale = await q.subscribe_ack(visibility=0.2).first()
    await anyio.sleep(0.3)
    await q.publish("y")
    fresh = await q.subscribe_ack(visibility=60, prefetch=2).take(2).collect()
    assert [(e.value, e.attempts) for e in fresh] == [("x", 2), ("y", 1)]
    # The stale envelope of "x" must not delete the fresh lease of "x".
    assert await q.ack_many([stale, fresh[1]]) == 1
    assert await fresh[0].ack() is True


async def test_connection_inside_a_transaction_is_refused(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("SELECT 1")  # opens a transaction
        async with ps.connect(conn) as db:
            with pytest.raises(ps.InvalidArgumentError, match="inside a transaction"):
                await db.migrate()


async def test_listener_handles_file_descriptors_above_1024(dsn: str) -> None:
    import os
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        pytest.skip(f"RLIMIT_NOFILE is {soft}: cannot open 1100 descriptors")
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        async with ps.connect(dsn) as db, db.wakeups("high_fd") as w:
            w.arm()
            async with db.connection() as conn:
                await conn.execute("SELECT pg_notify('high_fd', '')")
            assert await w.wait(5)
    finally:
        for fd in fds:
            os.close(fd)


async def test_give_back_with_shared_scalar_payloads_restores_each_row(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    ids = [await q.publish(7, headers={"i": i}) for i in range(8)]  # one shared int object

    async def slowly(_: Any) -> None:
        await anyio.sleep(0.01)

    assert await q.subscribe(prefetch=4).buffer(1).tap(slowly).take(1).collect() == [7]
    m = await q.metrics()
    assert (m.pending, m.completed, m.total) == (7, 1, 8)
    rest = await q.subscribe_ack(prefetch=7).take(7).collect()
    assert sorted((e.id, e.headers["i"]) for e in rest) == [(ids[i], i) for i in range(1, 8)]
    assert await q.ack_many(rest) == 7


async def test_give_back_restores_the_exact_payload_text(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, qname())
    exact = '{"amount": 0.10000000000000000001, "big": 1' + "0" * 400 + ".5}"
    async with db.connection() as conn:
        for _ in range(3):
            await conn.execute(
                psycopg.sql.SQL("INSERT INTO {} (payload) VALUES (%s::jsonb)").format(
                    psycopg.sql.Identifier(db.schema, f"q_{q.name}")
                ),
                [exact],
            )

    async def slowly(_: Any) -> None:
        await anyio.sleep(0.01)

    assert len(await q.subscribe().buffer(2).tap(slowly).take(1).collect()) == 1
    async with db.connection() as conn:
        cur = await conn.execute(
            psycopg.sql.SQL("SELECT payload::text FROM {}").format(
                psycopg.sql.Identifier(db.schema, f"q_{q.name}")
            )
        )
        stored = [r[0] for r in await cur.fetchall()]
    async with db.connection() as conn:
        cur = await conn.execute("SELECT %s::jsonb::text", [exact])
        row = await cur.fetchone()
    assert row is not None
    assert stored == [row[0], row[0]]


async def test_subscriber_of_a_closed_database_stops_with_an_error(dsn: str) -> None:
    db = await ps.connect(dsn)
    q = await ps.PgQueue.create(db, qname())
    errors: list[BaseException] = []

    async def consume() -> None:
        try:
            await q.subscribe(poll_interval=0.1).drain()
        except ps.DatabaseError as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await until_idle(db, 1)
            await db.close()
    assert len(errors) == 1
    assert isinstance(errors[0], ps.DatabaseError)
    assert not errors[0].transient


def test_only_connection_failures_are_transient() -> None:
    from psycopg import errors as e
    from psycopg_pool import PoolClosed, PoolTimeout

    from pgstreams._pg.database import database_error

    transient = [
        psycopg.OperationalError("server closed the connection unexpectedly"),
        e.AdminShutdown("terminating connection due to administrator command"),
        e.ConnectionFailure("connection failure"),
        PoolTimeout("couldn't get a connection after 30 sec"),
    ]
    permanent = [
        PoolClosed("the pool is already closed"),
        e.QueryCanceled("canceling statement due to statement timeout"),
        e.DiskFull("could not extend file"),
        e.UndefinedTable("relation does not exist"),
    ]
    assert [database_error(x).transient for x in transient] == [True] * 4
    assert [database_error(x).transient for x in permanent] == [False] * 4
