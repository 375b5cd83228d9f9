"""PgmqQueue on a real PostgreSQL with pgmq installed from the ``pgmq`` package's SQL."""

from __future__ import annotations

import uuid
from collections import Counter

import anyio
import psycopg
import pytest

import pgstreams as ps
import pgstreams._sources.pgmq.install as install

from ..pgserver import fresh_database
from ..streams import forward, until_idle


def qname() -> str:
    return f"m_{uuid.uuid4().hex[:10]}"


async def count_rows(db: ps.Database, table: str) -> int:
    async with db.connection() as conn:
        cur = await conn.execute(
            psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier("pgmq", table))
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# -- publishing and popping -----------------------------------------------------------


async def test_publish_and_pop(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    first = await q.publish({"n": 0})
    ids = await q.publish_batch([{"n": i} for i in range(1, 5)])
    assert ids == list(range(first + 1, first + 5))
    assert await q.subscribe().take(5).collect() == [{"n": i} for i in range(5)]
    m = await q.metrics()
    assert (m.queue_length, m.visible, m.total_sent, m.dead) == (0, 0, 5, 0)
    assert await q.publish_batch([]) == []


async def test_headers_delay_and_envelope_fields(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    await q.publish("later", delay=0.6)
    msg_id = await q.publish("now", headers={"x-priority": "high"})
    env = await q.subscribe_ack().first()
    assert (env.id, env.value, env.headers, env.attempts) == (
        msg_id,
        "now",
        {"x-priority": "high"},
        1,
    )
    assert env.enqueued_at.tzinfo is not None
    assert await env.ack() is True
    m = await q.metrics()
    assert (m.queue_length, m.visible) == (1, 0)  # the delayed one is not visible yet
    # The idle subscriber sleeps only until the delayed message becomes visible.
    with anyio.fail_after(5):
        assert await q.subscribe(poll_interval=3600).first() == "later"


async def test_batch_headers_apply_to_every_message(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    await q.publish_batch(["a", "b"], headers={"source": "import"})
    envs = await q.subscribe_ack(read_mode=ps.ReadMode.standard(qty=2)).take(2).collect()
    assert [(e.value, e.headers) for e in envs] == [
        ("a", {"source": "import"}),
        ("b", {"source": "import"}),
    ]
    assert await q.ack_many(envs) == 2


async def test_popped_but_undelivered_messages_go_back_exactly(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    ids = await q.publish_batch(list(range(6)), headers={"h": 1})
    assert await q.subscribe(prefetch=5).take(2).collect() == [0, 1]
    # Three were popped and never delivered: they are back with their ids and headers.
    envs = await q.subscribe_ack(read_mode=ps.ReadMode.standard(qty=10)).take(4).collect()
    assert [(e.id, e.value, e.headers) for e in envs] == [
        (ids[i], i, {"h": 1}) for i in range(2, 6)
    ]
    assert await q.ack_many(envs) == 4


async def test_given_back_values_go_back(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    ids = await q.publish_batch([{"n": i} for i in range(4)], headers={"h": 1})

    async def slowly(_: object) -> None:
        await anyio.sleep(0.01)

    # buffer() reads ahead and gives back what it holds when the stream closes early.
    assert await q.subscribe(prefetch=4).buffer(1).tap(slowly).take(1).collect() == [{"n": 0}]
    # A value the subscription no longer remembers can only go back as a new message.
    stream = q.subscribe()
    assert stream._putback is not None
    await stream._putback([{"n": "stranger"}])
    envs = await q.subscribe_ack(read_mode=ps.ReadMode.standard(qty=10)).take(4).collect()
    assert [(e.id, e.value, e.headers) for e in envs[:3]] == [
        (ids[i], {"n": i}, {"h": 1}) for i in range(1, 4)
    ]
    assert (envs[3].id > ids[3], envs[3].value, envs[3].headers) == (True, {"n": "stranger"}, {})
    assert await q.ack_many(envs) == 4


async def test_read_ahead_leases_are_released_uncounted(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    await q.publish_batch(list(range(5)))
    mode = ps.ReadMode.standard(vt=30, qty=5)
    taken = await q.subscribe_ack(read_mode=mode).take(2).collect()
    assert [e.value for e in taken] == [0, 1]
    again = await q.subscribe_ack(read_mode=mode).take(3).collect()
    assert [(e.value, e.attempts) for e in again] == [(2, 1), (3, 1), (4, 1)]
    assert await q.ack_many([*taken, *again]) == 5


# -- leases ---------------------------------------------------------------------------


async def test_competing_consumers_process_each_message_once(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    total = 2000
    await q.publish_batch(list(range(total)))
    seen: Counter[int] = Counter()
    done = anyio.Event()

    async def consume() -> None:
        mode = ps.ReadMode.standard(vt=30, qty=7)
        async with q.subscribe_ack(read_mode=mode, poll_interval=0.05) as envelopes:
            async for env in envelopes:
                seen[env.value] += 1
                assert await env.ack()
                if sum(seen.values()) >= total:
                    done.set()

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(consume)
        with anyio.fail_after(40):
            await done.wait()
        tg.cancel_scope.cancel()
    assert sorted(seen) == list(range(total))
    assert set(seen.values()) == {1}
    assert (await q.metrics()).queue_length == 0


async def test_lapsed_lease_is_redelivered_and_the_stale_holder_cannot_settle(
    db: ps.Database,
) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    await q.publish("job")
    short = ps.ReadMode.standard(vt=1)
    first = await q.subscribe_ack(read_mode=short).first()
    with anyio.fail_after(10):
        second = await q.subscribe_ack(read_mode=short, poll_interval=0.1).first()
    assert (second.id, second.attempts) == (first.id, 2)
    # The lease moved on: the stale holder can neither extend nor settle it.
    with pytest.raises(ps.LeaseLostError):
        await first.extend(5)
    assert await first.ack() is False
    with anyio.fail_after(10):
        third = await q.subscribe_ack(poll_interval=0.1).first()
    assert third.attempts == 3
    assert await second.nack() is False
    await third.extend(60)
    assert await third.ack() is True
    assert (await q.metrics()).queue_length == 0


async def test_cancelled_consumer_keeps_nothing_it_did_not_deliver(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    await q.publish_batch(list(range(3)))
    with anyio.move_on_after(0.3):
        async with q.subscribe_ack(read_mode=ps.ReadMode.standard(qty=3)) as envelopes:
            async for env in envelopes:
                assert env.value == 0
                await anyio.sleep_forever()  # cancelled while holding message 0
    envs = await q.subscribe_ack(read_mode=ps.ReadMode.standard(qty=3)).take(2).collect()
    assert [(e.value, e.attempts) for e in envs] == [(1, 1), (2, 1)]


# -- dead letters ---------------------------------------------------------------------


async def test_poison_message_is_dead_lettered_and_requeued(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname(), max_attempts=3)
    await q.publish({"poison": True}, headers={"tenant": "t1"})
    await q.publish({"poison": False})
    attempts: list[int] = []
    good = 0
    async with q.subscribe_ack(poll_interval=0.05) as envelopes:
        with anyio.fail_after(10):
            async for env in envelopes:
                if env.value["poison"]:
                    attempts.append(env.attempts)
                    assert await env.nack(error=f"bad input, try {env.attempts}")
                else:
                    good += 1
                    assert await env.ack()
                if len(attempts) == 3 and good:
                    break
        # The fourth read moves it to the DLQ instead of delivering it.
        with anyio.move_on_after(0.5):
            async for env in envelopes:
                pytest.fail(f"delivered past max_attempts: {env!r}")
    assert attempts == [1, 2, 3]
    m = await q.metrics()
    assert (m.queue_length, m.dead) == (0, 1)
    assert {q.name, q.dead_letter_queue} <= set(await ps.PgmqQueue.list(db))
    [dead] = await q.dead_letters()
    assert dead.value == {"poison": True}
    assert (dead.attempts, dead.last_error) == (3, "bad input, try 3")
    assert dead.headers["tenant"] == "t1"
    assert "pgstreams_nack" not in dead.headers

    assert await q.requeue_dead() == 1
    env = await q.subscribe_ack().first()
    assert (env.value, env.attempts, env.headers) == ({"poison": True}, 1, {"tenant": "t1"})
    assert await env.ack()
    assert (await q.metrics()).dead == 0


async def test_expired_lease_counts_toward_dead_lettering(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname(), max_attempts=1)
    await q.publish("crashy")
    await q.subscribe_ack(read_mode=ps.ReadMode.standard(vt=1)).first()  # never settled
    with anyio.fail_after(10):
        while (await q.metrics()).dead == 0:
            async with q.subscribe_ack(poll_interval=0.05) as envelopes:
                with anyio.move_on_after(0.3):
                    async for env in envelopes:
                        pytest.fail(f"delivered past max_attempts: {env!r}")
    [dead] = await q.dead_letters()
    assert (dead.value, dead.last_error) == ("crashy", "visibility timeout expired")


async def test_max_attempts_is_stored_with_the_queue(db: ps.Database) -> None:
    name = qname()
    await ps.PgmqQueue.create(db, name, max_attempts=1)
    other: ps.PgmqQueue[str] = ps.PgmqQueue(db, name)  # another handle, as in another process
    await other.publish("x")
    env = await other.subscribe_ack().first()
    assert await env.nack()
    async with other.subscribe_ack(poll_interval=0.05) as envelopes:
        with anyio.move_on_after(0.5):
            async for _env in envelopes:
                pytest.fail("delivered past the stored max_attempts")
    assert (await other.metrics()).dead == 1
    await ps.PgmqQueue.create(db, name)  # without max_attempts: keeps the stored limit
    assert (await other._current_settings())[0] == 1


# -- ack modes and transactions -------------------------------------------------------


async def test_archive_mode_keeps_acked_messages(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    await q.publish_batch(["a", "b", "c"])
    stream = q.subscribe_ack(read_mode=ps.ReadMode.standard(qty=3), ack_mode="archive")
    envs = await stream.take(3).collect()
    assert await envs[0].ack()
    assert await q.ack_many(envs[1:]) == 2
    assert await count_rows(db, f"a_{q.name}") == 3
    assert await count_rows(db, f"q_{q.name}") == 0


async def test_publish_joins_the_callers_transaction(db: ps.Database, dsn: str) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction(force_rollback=True):
            await q.publish("rolled back", conn=conn)
            await q.publish_batch(["also rolled back"], conn=conn)
        async with conn.transaction():
            await q.publish("committed", conn=conn)
            assert (await q.metrics()).queue_length == 0  # not visible before commit
    assert await q.subscribe().first() == "committed"
    assert (await q.metrics()).queue_length == 0


# -- wake-ups -------------------------------------------------------------------------


async def test_notify_wakes_an_idle_subscriber(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    await q.enable_notify(throttle_ms=0)
    send, receive = anyio.create_memory_object_stream[str](10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward, q.subscribe(poll_interval=3600), send)
        await until_idle(db, 1)
        await q.publish("wake up")
        with anyio.fail_after(10):  # polling alone would take an hour
            assert await receive.receive() == "wake up"
        tg.cancel_scope.cancel()
    receive.close()


async def test_throttled_notification_is_not_left_to_the_poll(db: ps.Database) -> None:
    # pgmq sends no notification for inserts within throttle_ms of the last one; the
    # subscriber must look again when that window closes rather than sleep until its poll.
    q = await ps.PgmqQueue.create(db, qname())
    await q.enable_notify(throttle_ms=300)
    send, receive = anyio.create_memory_object_stream[str](10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward, q.subscribe(poll_interval=3600), send)
        await until_idle(db, 1)
        await q.publish("first")
        with anyio.fail_after(10):
            assert await receive.receive() == "first"
            await q.publish("second")  # inside the throttle window: no NOTIFY
            assert await receive.receive() == "second"
        tg.cancel_scope.cancel()
    receive.close()
    await q.disable_notify()


async def test_server_side_poll_delivers_and_cancels_promptly(db: ps.Database) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    mode = ps.ReadMode.poll(vt=30, qty=1, max_poll_seconds=30, poll_interval_ms=20)
    got: list[str] = []

    async def consume() -> None:
        async with q.subscribe_ack(read_mode=mode) as envelopes:
            async for env in envelopes:
                got.append(env.value)
                assert await env.ack()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.2)  # the consumer now waits inside pgmq.read_with_poll
        await q.publish("polled")
        with anyio.fail_after(10):
            while not got:  # noqa: ASYNC110 - the consumer has no event to offer
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)  # waiting inside the server again
        cancelled_at = anyio.current_time()
        tg.cancel_scope.cancel()
    # The server was asked to stop: closing did not wait out the 30 s poll.
    assert anyio.current_time() - cancelled_at < 10
    assert got == ["polled"]
    assert (await q.metrics()).queue_length == 0


# -- installing -----------------------------------------------------------------------


async def test_install_race_and_no_second_install(pg_admin_dsn: str) -> None:
    with fresh_database(pg_admin_dsn, "pgmq_install") as url:
        async with ps.connect(url) as a, ps.connect(url) as b:
            async with anyio.create_task_group() as tg:
                tg.start_soon(install.ensure_pgmq, a)
                tg.start_soon(install.ensure_pgmq, b)
            async with a.connection() as conn:
                assert await install.pgmq_installed(conn)
        # A new Database finds it installed and never runs the script again.
        original = install.bundled_sql
        install.bundled_sql = lambda: pytest.fail("re-ran the pgmq install script")
        try:
            async with ps.connect(url) as c:
                q = await ps.PgmqQueue.create(c, "after_install")
                await q.publish(1)
                assert await ps.PgmqQueue.list(c) == ["after_install"]
        finally:
            install.bundled_sql = original


async def test_list_is_empty_without_pgmq(pg_admin_dsn: str) -> None:
    with fresh_database(pg_admin_dsn, "pgmq_absent") as url:
        async with ps.connect(url) as db:
            assert await ps.PgmqQueue.list(db) == []


async def _schemas(db: ps.Database) -> list[str]:
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT nspname::text FROM pg_namespace WHERE nspname IN ('pgmq', %s) ORDER BY 1",
            [db.schema],
        )
        return [str(r[0]) for r in await cur.fetchall()]


async def test_partitioned_without_pg_partman_is_refused_before_anything_is_written(
    pg_admin_dsn: str,
) -> None:
    # pgmq's create_partitioned hands partitioning to pg_partman (create_parent, part_config);
    # a database without that extension gets a clear refusal and no trace of the attempt.
    with fresh_database(pg_admin_dsn, "pgmq_partman") as url:
        async with ps.connect(url) as db:
            with pytest.raises(ps.InvalidArgumentError, match="pg_partman"):
                await ps.PgmqQueue.create(db, "parted", partitioned=True)
            assert await _schemas(db) == []  # neither pgmq nor pgstreams was installed

            await ps.PgmqQueue.create(db, "plain")
            with pytest.raises(ps.InvalidArgumentError, match="CREATE EXTENSION pg_partman"):
                await ps.PgmqQueue.create(db, "parted", partitioned=True, max_attempts=2)
            assert await ps.PgmqQueue.list(db) == ["plain"]  # no queue, no DLQ
            async with db.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_class WHERE relname LIKE %s", ["%parted%"]
                )
                assert await cur.fetchone() == (0,)
                cur = await conn.execute(
                    psycopg.sql.SQL("SELECT count(*) FROM {} WHERE name = 'parted'").format(
                        psycopg.sql.Identifier(db.schema, "pgmq_queues")
                    )
                )
                assert await cur.fetchone() == (0,)  # no stored max_attempts either


async def test_partitioned_queue_with_pg_partman(pg_admin_dsn: str) -> None:
    with fresh_database(pg_admin_dsn, "pgmq_partitioned") as url:
        async with ps.connect(url) as db:
            async with db.connection() as conn:
                cur = await conn.execute(
                    "SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_partman')"
                )
                if await cur.fetchone() != (True,):
                    pytest.skip("this server has no pg_partman")
                await conn.execute("CREATE SCHEMA partman")
                await conn.execute("CREATE EXTENSION pg_partman SCHEMA partman")
            q = await ps.PgmqQueue.create(db, "parted", partitioned=True)
            await ps.PgmqQueue.create(db, "parted", partitioned=True)  # idempotent
            with pytest.raises(ps.InvalidArgumentError, match="partitioned"):
                await ps.PgmqQueue.create(db, "parted")
            await q.publish_batch(["a", "b", "c"])
            assert await q.subscribe().first() == "a"
            stream = q.subscribe_ack(read_mode=ps.ReadMode.standard(qty=2), ack_mode="archive")
            envs = await stream.take(2).collect()
            assert [e.value for e in envs] == ["b", "c"]
            assert await envs[0].ack()
            assert await envs[1].nack()
            again = await q.subscribe_ack(ack_mode="archive").first()
            assert (again.value, again.attempts) == ("c", 2)
            assert await again.ack()
            assert await count_rows(db, "a_parted") == 2
            assert (await q.metrics()).queue_length == 0
            await q.drop()
            assert await ps.PgmqQueue.list(db) == []


async def test_create_is_idempotent_and_checks_the_kind(db: ps.Database) -> None:
    name = qname()
    await ps.PgmqQueue.create(db, name, unlogged=True)
    await ps.PgmqQueue.create(db, name, unlogged=True)
    with pytest.raises(ps.InvalidArgumentError, match="unlogged"):
        await ps.PgmqQueue.create(db, name)
    q = ps.PgmqQueue[int](db, name)
    await q.publish(1)
    assert await q.purge() == 1
    await q.drop()
    assert name not in await ps.PgmqQueue.list(db)


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "x" * 44, "Orders", "a-b", "a;b", "é"])
async def test_bad_names_are_rejected(db: ps.Database, name: str) -> None:
    with pytest.raises(ps.InvalidArgumentError):
        await ps.PgmqQueue.create(db, name)


async def test_bad_arguments_are_rejected_before_writing(db: ps.Database) -> None:
    name = qname()
    for kwargs in (
        {"max_attempts": 0},
        {"partitioned": True, "unlogged": True},
        {"partitioned": True},  # no pg_partman here
    ):
        with pytest.raises(ps.InvalidArgumentError):
            await ps.PgmqQueue.create(db, name, **kwargs)
    assert name not in await ps.PgmqQueue.list(db)

    q = await ps.PgmqQueue.create(db, name)
    with pytest.raises(ps.PayloadError):
        await q.publish({"when": object()})
    with pytest.raises(ps.PayloadError):
        await q.publish_batch([1, float("nan")])
    with pytest.raises(ps.PayloadError):
        await q.publish(1, headers={1: "x"})  # type: ignore[dict-item]
    with pytest.raises(ps.InvalidArgumentError):
        await q.publish(1, delay=-1)
    for bad in (
        lambda: ps.ReadMode.standard(vt=-1),
        lambda: ps.ReadMode.standard(vt=0),
        lambda: ps.ReadMode.standard(qty=0),
        lambda: ps.ReadMode.standard(vt=1.5),  # type: ignore[arg-type]
        lambda: ps.ReadMode.poll(max_poll_seconds=0),
        lambda: ps.ReadMode.poll(poll_interval_ms=0),
        lambda: q.subscribe_ack(ack_mode="keep"),  # type: ignore[arg-type]
        lambda: q.subscribe(prefetch=0),
        lambda: q.subscribe(poll_interval=-1),
    ):
        with pytest.raises(ps.InvalidArgumentError):
            bad()
    with pytest.raises(ps.InvalidArgumentError):
        await q.enable_notify(throttle_ms=-5)
    await q.publish("kept")
    env = await q.subscribe_ack().first()
    with pytest.raises(ps.InvalidArgumentError):
        await env.nack(delay=-1)
    with pytest.raises(ps.InvalidArgumentError):
        await env.extend(0)
    assert await env.ack()
    m = await q.metrics()
    assert (m.queue_length, m.total_sent) == (0, 1)  # nothing bad was ever written


# -- throttling under load ------------------------------------------------------------


async def test_throttle_recheck_after_a_notification_that_came_while_busy(
    db: ps.Database,
) -> None:
    q = await ps.PgmqQueue.create(db, qname())
    await q.enable_notify(throttle_ms=500)
    seen: dict[str, float] = {}
    got_b = anyio.Event()

    async def consume() -> None:
        async with q.subscribe(poll_interval=3600) as stream:
            async for value in stream:
                seen[value] = anyio.current_time()
                if value == "slow":
                    await anyio.sleep(1.0)  # busy while "a" is notified
                if value == "b":
                    got_b.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await until_idle(db, 1)
        await q.publish("slow")
        await anyio.sleep(0.75)
        await q.publish("a")  # notified while the consumer is busy: window until +0.5 s
        await anyio.sleep(0.35)
        await q.publish("b")  # inside that window: pgmq sends no NOTIFY
        with anyio.fail_after(10):  # the hour-long poll would not deliver it
            await got_b.wait()
        tg.cancel_scope.cancel()
    assert list(seen) == ["slow", "a", "b"]
