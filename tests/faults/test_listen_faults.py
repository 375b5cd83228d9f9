"""The shared LISTEN connection under failures: refused and killed connections, cancelled
subscribers, closing while in use."""

from __future__ import annotations

import random
from typing import Any

import anyio
import psycopg
import pytest

import pgstreams as ps
from pgstreams._pg import listen

from ..pgserver import allow_connections, count_backends, terminate_backends

LISTENER = "pgstreams-listener"


async def notify(db: ps.Database, channel: str) -> None:
    async with db.connection() as conn:
        await conn.execute("SELECT pg_notify(%s, '')", [channel])


async def until_no_listener(dsn: str) -> None:
    with anyio.fail_after(10):
        while count_backends(dsn, application_name=LISTENER):  # noqa: ASYNC110 - a server-side state
            await anyio.sleep(0.01)


async def test_a_subscriber_registered_while_the_server_refused_is_woken_once_connected(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listen, "_REGISTER_WAIT", 0.2)
    async with ps.connect(dsn, min_size=1) as db:
        allow_connections(dsn, False)
        try:
            # Registering gives up after a bounded wait: the subscriber polls meanwhile.
            async with db.wakeups("refused") as w:
                assert db.listener.backend_pid is None
                w.arm()
                await notify(db, "refused")  # nobody listens: this one is lost
                allow_connections(dsn, True)
                # The first connection of this subscription must wake it, as a reconnect
                # does: something may have been sent while nothing listened.
                assert await w.wait(10)
                assert db.listener.backend_pid is not None
                w.arm()
                await notify(db, "refused")
                assert await w.wait(10)
        finally:
            allow_connections(dsn, True)


async def test_a_connection_killed_while_nobody_waits_is_noticed_and_replaced(dsn: str) -> None:
    async with ps.connect(dsn) as db, db.wakeups("busy_kill") as w:
        w.arm()
        first = db.listener.backend_pid
        assert terminate_backends(dsn, application_name=LISTENER) == 1
        await notify(db, "busy_kill")  # lost with the connection
        # Nobody was waiting when the connection died; the next wait finds it gone and is
        # woken by the reconnect, since a notification may have been lost.
        assert await w.wait(10)
        assert db.listener.reconnects == 1
        assert db.listener.backend_pid not in (None, first)


async def test_close_while_a_subscriber_reads_the_connection(dsn: str) -> None:
    db = await ps.connect(dsn)
    try:
        async with db.wakeups("closing") as w:
            w.arm()
            async with anyio.create_task_group() as tg:
                tg.start_soon(w.wait, 60)
                with anyio.fail_after(10):
                    while db.listener.idle_count() < 1:  # noqa: ASYNC110 - no event to await
                        await anyio.sleep(0.005)
                await db.listener.close()
                assert db.listener.backend_pid is None
                await until_no_listener(dsn)
                tg.cancel_scope.cancel()
    finally:
        await db.close()


async def test_a_cancelled_register_leaves_nothing_registered(dsn: str) -> None:
    async with ps.connect(dsn, min_size=1) as db:
        allow_connections(dsn, False)
        try:
            with anyio.move_on_after(0.1):
                await db.listener.register("never")
            assert db.listener.subscriber_count() == 0
        finally:
            allow_connections(dsn, True)


async def test_churning_subscribers_and_killed_connections(dsn: str) -> None:
    # Subscribers come and go, are cancelled mid-wait and mid-register, while the listener's
    # backend is killed now and then. Afterwards a subscriber is still woken, and closing
    # leaves no listener connection behind.
    rng = random.Random(13)
    async with ps.connect(dsn, max_size=4) as db:

        async def churn(channel: str) -> None:
            while True:
                with anyio.move_on_after(rng.uniform(0.0, 0.05)):
                    async with db.wakeups(channel) as w:
                        w.arm()
                        await w.wait(rng.uniform(0.0, 0.05))

        async def kill() -> None:
            for _ in range(5):
                await anyio.sleep(0.1)
                terminate_backends(dsn, application_name=LISTENER)

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(churn, f"churn_{i % 3}")
            await kill()
            tg.cancel_scope.cancel()
        assert db.listener.subscriber_count() == 0
        async with db.wakeups("churn_0") as w:
            w.arm()
            await notify(db, "churn_0")
            assert await w.wait(10)
    await until_no_listener(dsn)


async def test_a_connection_that_cannot_listen_is_retried_with_growing_backoff(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a hot standby ("cannot execute LISTEN during recovery"): connecting works and
    # LISTEN fails. A connection made must not count as a success, or the listener would
    # reconnect 20 times a second for as long as that lasts.
    async def refuse(self: listen.Listener, conn: Any) -> None:
        raise psycopg.errors.ReadOnlySqlTransaction("cannot execute LISTEN during recovery")

    delays: list[float] = []
    four = anyio.Event()
    schedule = listen.Listener._schedule_retry

    def record(self: listen.Listener) -> None:
        delays.append(self._backoff)  # the delay this retry waits
        if len(delays) == 4:
            four.set()
        schedule(self)

    monkeypatch.setattr(listen, "_REGISTER_WAIT", 60.0)
    monkeypatch.setattr(listen.Listener, "_sync", refuse)
    monkeypatch.setattr(listen.Listener, "_schedule_retry", record)
    async with ps.connect(dsn) as db, anyio.create_task_group() as tg:
        tg.start_soon(db.listener.register, "standby")
        await four.wait()
        tg.cancel_scope.cancel()
    assert delays[:4] == [listen._BACKOFF_MIN * 2**i for i in range(4)]
