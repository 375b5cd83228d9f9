"""The shared LISTEN connection: fan-out, quoting, reconnecting, taking turns, closing."""

from __future__ import annotations

import os
import threading

import anyio
import pytest

import pgstreams as ps
from pgstreams._pg import listen

from ..pgserver import count_backends, terminate_backends

LISTENER = "pgstreams-listener"


async def notify(db: ps.Database, channel: str) -> None:
    async with db.connection() as conn:
        await conn.execute("SELECT pg_notify(%s, '')", [channel])


async def test_one_listen_connection_fans_out_to_many_subscribers(dsn: str) -> None:
    async with ps.connect(dsn) as db:
        async with (
            db.wakeups("chan_a") as a1,
            db.wakeups("chan_a") as a2,
            db.wakeups("chan_b") as b,
        ):
            assert count_backends(dsn, application_name=LISTENER) == 1
            for w in (a1, a2, b):
                w.arm()
            async with db.connection() as conn:
                await conn.execute("SELECT pg_notify('chan_a', '')")
            assert await a1.wait(5) and await a2.wait(5)
            assert not await b.wait(0.2)
        assert db.listener.subscriber_count() == 0
    assert count_backends(dsn, application_name=LISTENER) == 0


async def test_listener_reconnects_and_wakes_everyone(dsn: str) -> None:
    async with ps.connect(dsn) as db, db.wakeups("chan_r") as w:
        w.arm()
        assert terminate_backends(dsn, application_name=LISTENER) == 1
        # Woken by the reconnect itself: a notification may have been missed meanwhile.
        assert await w.wait(10)
        assert db.listener.reconnects == 1
        w.arm()
        async with db.connection() as conn:
            await conn.execute("SELECT pg_notify('chan_r', '')")
        assert await w.wait(10)


async def test_channel_names_are_quoted(dsn: str) -> None:
    weird = 'Mixed."Case"; DROP TABLE x'
    async with ps.connect(dsn) as db, db.wakeups(weird) as w:
        w.arm()
        async with db.connection() as conn:
            await conn.execute("SELECT pg_notify(%s, '')", [weird])
        assert await w.wait(5)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
async def test_opening_and_closing_200_databases_leaves_no_descriptor_behind(dsn: str) -> None:
    async def cycle(i: int) -> None:
        db = await ps.connect(dsn, min_size=1, max_size=1)
        try:
            async with db.wakeups("fd_chan") as w:
                w.arm()
                await notify(db, "fd_chan")
                assert await w.wait(10)  # this subscriber read the LISTEN connection
        finally:
            # Every other close runs in a cancelled scope, as when the task closing the
            # Database is itself being cancelled: it must release everything all the same.
            with anyio.CancelScope() as scope:
                if i % 2:
                    scope.cancel()
                await db.close()

    threads = threading.active_count()
    for i in range(10):  # warm-up: lazily created process-wide resources
        await cycle(i)
    before = open_descriptors()
    for i in range(200):
        await cycle(i)
    assert open_descriptors() == before
    assert threading.active_count() == threads  # and no thread was left behind


async def test_the_listener_runs_no_thread(dsn: str) -> None:
    before = set(threading.enumerate())
    async with ps.connect(dsn) as db, db.wakeups("no_thread") as w:
        w.arm()
        await notify(db, "no_thread")
        assert await w.wait(10)
        assert not [t.name for t in set(threading.enumerate()) - before]


async def test_the_turn_to_read_passes_between_waiting_subscribers(dsn: str) -> None:
    async with (
        ps.connect(dsn) as db,
        db.wakeups("turn_a") as a,
        db.wakeups("turn_b") as b,
    ):
        a.arm()
        b.arm()
        woken = anyio.Event()

        async def wait_b() -> None:
            assert await b.wait(10)
            woken.set()

        async with anyio.create_task_group() as tg:
            # `a` reads first, then its short wait ends; `b`, waiting meanwhile, takes over.
            assert not await a.wait(0.05)
            tg.start_soon(wait_b)
            assert not await a.wait(0.05)
            await notify(db, "turn_b")
            await woken.wait()


async def test_a_cancelled_reader_hands_its_turn_on(dsn: str) -> None:
    async with (
        ps.connect(dsn) as db,
        db.wakeups("cancel_a") as a,
        db.wakeups("cancel_b") as b,
    ):
        a.arm()
        b.arm()
        reader_scope = anyio.CancelScope()
        b_woken = anyio.Event()

        async def reader() -> None:
            with reader_scope:
                await a.wait(60)

        async def follower() -> None:
            assert await b.wait(10)
            b_woken.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)  # starts first, so it is the one reading
            tg.start_soon(follower)
            with anyio.fail_after(10):
                while db.listener.idle_count() < 2:  # noqa: ASYNC110 - no event to await
                    await anyio.sleep(0.005)
            reader_scope.cancel()
            await notify(db, "cancel_b")
            await b_woken.wait()
        assert reader_scope.cancelled_caught
        assert db.listener.reconnects == 0


async def test_every_waiter_is_woken_by_one_notification(dsn: str) -> None:
    async with ps.connect(dsn) as db:
        woken = 0

        async def waiter(registered: anyio.Event, done: anyio.Event) -> None:
            nonlocal woken
            async with db.wakeups("many") as w:
                w.arm()
                registered.set()
                if await w.wait(10):
                    woken += 1
            done.set()

        pairs = [(anyio.Event(), anyio.Event()) for _ in range(50)]
        async with anyio.create_task_group() as tg:
            for registered, done in pairs:
                tg.start_soon(waiter, registered, done)
            for registered, _ in pairs:
                await registered.wait()
            with anyio.fail_after(10):
                while db.listener.idle_count() < 50:  # noqa: ASYNC110 - no event to await
                    await anyio.sleep(0.005)
            await notify(db, "many")
        assert woken == 50
        assert db.listener.subscriber_count() == 0


async def test_a_busy_subscriber_sees_notifications_when_it_arms(dsn: str) -> None:
    # Nobody waits, so nobody reads the socket -- except arm(), which looks without waiting.
    async with ps.connect(dsn) as db, db.wakeups("busy") as w:
        w.arm()
        await notify(db, "busy")
        with anyio.fail_after(10):
            while not w.arm():  # noqa: ASYNC110 - what arm() sees is what is tested
                await anyio.sleep(0.005)
        assert not w.arm()


async def test_the_connection_closes_when_the_last_subscriber_leaves(dsn: str) -> None:
    async with ps.connect(dsn) as db:
        async with db.wakeups("last") as w:
            w.arm()
            assert db.listener.backend_pid is not None
        assert db.listener.backend_pid is None
        async with db.wakeups("last") as w:  # a new subscriber connects again
            w.arm()
            await notify(db, "last")
            assert await w.wait(10)
        assert db.listener.reconnects == 0  # leaving is not a failure


async def test_register_after_close_is_refused(dsn: str) -> None:
    db = await ps.connect(dsn)
    await db.close()
    with pytest.raises(ps.PgStreamsError, match="closed"):
        await db.listener.register("after_close")


async def test_fire_wakes_the_subscriber_that_is_reading_the_connection(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reader sleeps on the socket, not on its own signal: fire() (the engine wakes its
    # workers so) must end that wait too, not leave it until a notification or a deadline.
    monkeypatch.setattr(listen, "_HEALTH_CHECK_EVERY", 600.0)
    async with ps.connect(dsn) as db, db.wakeups("fire_reader") as w:
        w.arm()
        woken: list[bool] = []
        returned = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                woken.append(await w.wait(600))
                returned.set()

            tg.start_soon(waiter)
            with anyio.fail_after(10):
                while db.listener.idle_count() < 1:  # noqa: ASYNC110 - no event to await
                    await anyio.sleep(0.005)
            assert db.listener._reader is w
            w.fire()
            with anyio.move_on_after(10):
                await returned.wait()
            tg.cancel_scope.cancel()
        assert woken == [True]
