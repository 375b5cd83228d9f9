"""One shared LISTEN connection per Database, fanning wake-ups out to every subscriber.

Notifications are wake-ups only: a subscriber always re-reads its source after one, so a
notification that is lost (the connection dropped, the server restarted) costs latency,
never data. After every reconnect each subscriber is woken, because something may have
been missed while the connection was down.

The listener has no thread and no task of its own: its subscribers drive it. The first
subscriber to wait becomes the reader -- it waits on the connection's socket in bounded
slices, hands each notification to the subscribers of its channel, checks a quiet
connection with ``SELECT 1`` and reconnects with backoff -- while the others wait on their
own flags; when the reader's wait ends, another waiting subscriber takes over. A
subscriber that is busy reads whatever has arrived each time it arms its flag. So the
connection is read for as long as anyone subscribes, in the subscribers' own tasks and
cancel scopes, and with anyio only.

The connection is one dedicated autocommit connection, never one of the caller's pool. It
is closed when the last subscriber leaves and when the Database closes -- at once, or as
soon as the statement in flight (bounded) ends -- so closing leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from .._core.errors import PgStreamsError

logger = logging.getLogger("pgstreams.listen")

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 5.0
_HEALTH_CHECK_EVERY = 10.0
_REGISTER_WAIT = 5.0
_STATEMENT_TIMEOUT = 10.0
# A dead peer must not hang the listener: TCP keepalives and a send timeout bound how long a
# silent network failure goes unnoticed (about 30 s), after which it reconnects.
KEEPALIVE_OPTIONS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "connect_timeout": 10,
}


def keepalive_defaults(conninfo: str) -> dict[str, Any]:
    """KEEPALIVE_OPTIONS, less those the DSN sets itself (the caller's choice wins)."""
    try:
        present = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        present = {}
    return {k: v for k, v in KEEPALIVE_OPTIONS.items() if k not in present}


async def own_connection(
    conninfo: str, kwargs: Mapping[str, Any], **extra: Any
) -> psycopg.AsyncConnection[Any]:
    """A connection of the library's own, outside any pool, in autocommit mode: the pool's
    connection ``kwargs`` (less those that would change what statements return) over the
    keepalive defaults, then ``extra``."""
    own = {k: v for k, v in kwargs.items() if k not in _NOT_OWN}
    options = {**keepalive_defaults(conninfo), **own, **extra, "autocommit": True}
    return await psycopg.AsyncConnection.connect(conninfo, **options)


_NOT_OWN = frozenset({"autocommit", "row_factory", "prepare_threshold", "context"})


class Wakeup:
    """A subscriber's wake-up flag: set by notifications, cleared by ``arm()``.

    Call ``arm()`` *before* reading the source and ``wait()`` after an empty read: a
    notification that arrives in between leaves the flag set, so it is never missed.
    A Wakeup without a listener is fired by nothing but ``fire()`` (a subscriber that polls).
    """

    def __init__(self, channel: str, listener: Listener | None = None) -> None:
        self.channel = channel
        self._listener = listener
        self._fired = False
        self._signal: anyio.Event | None = None
        self._registered = False
        self.waiting = False
        """True while the subscriber sleeps in ``wait()`` (it has read everything visible)."""

    def arm(self) -> bool:
        """Clear the flag; True if a notification had arrived since the last ``arm()``."""
        if self._listener is not None:
            self._listener._poll()
        fired, self._fired = self._fired, False
        return fired

    async def wait(self, seconds: float) -> bool:
        """Wait until woken or ``seconds`` pass; True if woken."""
        if self._fired:
            return True
        deadline = anyio.current_time() + seconds
        self.waiting = True
        try:
            if self._listener is None:
                await self._sleep(deadline)
            else:
                await self._listener._wait(self, deadline)
        finally:
            self.waiting = False
        return self._fired

    def fire(self) -> None:
        """Wake the subscriber."""
        self._fired = True
        self._nudge()
        listener = self._listener
        if listener is not None and listener._reader is self and listener._idle is not None:
            listener._idle.cancel()  # the reader sleeps on the socket, not on its signal

    def _nudge(self) -> None:
        """End the current ``_sleep`` without firing (the listener's turn passes here)."""
        if self._signal is not None:
            self._signal.set()

    async def _sleep(self, deadline: float) -> None:
        """Sleep until fired, nudged or the deadline."""
        signal = self._signal = anyio.Event()
        try:
            with anyio.move_on_after(deadline - anyio.current_time()):
                await signal.wait()
        finally:
            self._signal = None


class Listener:
    """The shared LISTEN connection of one Database (see module docstring)."""

    def __init__(self, conninfo: str, connect_kwargs: Mapping[str, Any] | None = None) -> None:
        self._conninfo = conninfo
        self._kwargs = dict(connect_kwargs or {})
        self._subs: dict[str, set[Wakeup]] = {}
        self._active: set[str] = set()
        """Channels LISTENed on the current connection."""
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = anyio.Lock()
        """Held by whoever uses the connection, the reader waiting on its socket included."""
        self._idle: anyio.CancelScope | None = None
        """The reader's wait on the socket, which others cancel to have the connection."""
        self._reader: Wakeup | None = None
        self._followers: dict[Wakeup, None] = {}
        self._closed = False
        self._failed = False
        self._retry_at = 0.0
        self._backoff = _BACKOFF_MIN
        self._quiet_since = 0.0
        self.backend_pid: int | None = None
        """PID of the listener's current backend (None while disconnected)."""
        self.reconnects = 0
        """How many times the connection was re-established after a failure."""

    async def register(self, channel: str) -> Wakeup:
        """Subscribe to ``channel``; returns once LISTEN is active (or after a bounded wait).

        If the server is unreachable the wait gives up after a few seconds: the caller's
        polling covers the gap, and every subscriber is woken once the listener reconnects.
        """
        if self._closed:
            raise PgStreamsError("the Database is closed")
        wakeup = Wakeup(channel, self)
        self._subs.setdefault(channel, set()).add(wakeup)
        try:
            with anyio.move_on_after(_REGISTER_WAIT):
                while channel not in self._active and not self._closed:
                    async with self._exclusive():
                        retry_in = await self._turn()
                    if retry_in > 0:
                        await anyio.sleep(retry_in)
        except BaseException:  # cancelled while waiting: leave nothing registered
            self.unregister(wakeup)
            raise
        wakeup._registered = True
        return wakeup

    def unregister(self, wakeup: Wakeup) -> None:
        """Drop a subscription. A channel left without subscribers is UNLISTENed at the
        next turn; the connection is closed when no subscriber is left."""
        subs = self._subs.get(wakeup.channel)
        if subs is None or wakeup not in subs:
            return
        subs.discard(wakeup)
        if not subs:
            del self._subs[wakeup.channel]
        if not self._subs and not self._lock.locked():
            self._drop()

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def idle_count(self) -> int:
        """Subscribers asleep until a wake-up or their poll interval."""
        return sum(w.waiting for s in self._subs.values() for w in s)

    async def close(self) -> None:
        """Close the connection; if a turn is in progress, once it ends (it is bounded)."""
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
        if not self._lock.locked():
            self._drop()
            return
        async with self._lock:  # if this is cancelled, the holder closes it as it leaves
            self._drop()

    # -- taking turns --------------------------------------------------------------------

    async def _wait(self, wakeup: Wakeup, deadline: float) -> None:
        """Wait as the reader if nobody reads, else as a follower, until woken or deadline."""
        try:
            while not wakeup._fired and anyio.current_time() < deadline:
                if self._reader is None and self._may_read(wakeup):
                    self._reader = wakeup
                    try:
                        await self._read(wakeup, deadline)
                    finally:
                        self._reader = None
                else:
                    self._followers[wakeup] = None
                    try:
                        await wakeup._sleep(deadline)
                    finally:
                        del self._followers[wakeup]
        finally:
            if self._reader is None and self._followers:
                # Someone else reads now; if it leaves before its turn, it passes it on.
                next(iter(self._followers))._nudge()

    def _may_read(self, wakeup: Wakeup) -> bool:
        """Only a current subscriber of an open listener reads (and so keeps it connected)."""
        return not self._closed and wakeup in self._subs.get(wakeup.channel, ())

    async def _read(self, wakeup: Wakeup, deadline: float) -> None:
        while not wakeup._fired and not self._closed:
            now = anyio.current_time()
            if now >= deadline:
                return
            async with self._exclusive():
                retry_in = await self._turn()
                if wakeup._fired:
                    return
                if retry_in == 0 and not self._lock.statistics().tasks_waiting:
                    await self._wait_readable(deadline)
                    continue
            if retry_in > 0:  # disconnected: sleep until the next attempt is due
                await wakeup._sleep(min(deadline, now + retry_in))

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Have the connection to oneself; whoever leaves it last in a closed listener (or
        one nobody subscribes to) closes it."""
        if self._idle is not None:
            self._idle.cancel()  # the reader lets go of the socket
        async with self._lock:
            try:
                yield
            finally:
                if self._closed or not self._subs:
                    self._drop()

    async def _turn(self) -> float:
        """Connect if due, LISTEN/UNLISTEN to match the subscribers, hand out what has
        arrived. 0 when connected; else the seconds until the next connection attempt."""
        conn = self._conn
        fresh = conn is None
        if conn is None:
            conn = await self._connect()
            if conn is None:
                return max(self._retry_at - anyio.current_time(), 0.001)
        try:
            await self._sync(conn)
            self._drain(conn)
        except Exception as exc:
            self._lost(exc)
            return max(self._retry_at - anyio.current_time(), 0.001)
        except BaseException:  # cancelled half-way through a statement: state unknown
            self._drop()
            raise
        if fresh:
            # Only a connection that LISTENs counts as a success: one that connects and
            # then fails (a hot standby refuses LISTEN) keeps backing off.
            self._backoff = _BACKOFF_MIN
            # Whatever was sent while no LISTEN was in place is lost: all re-read.
            for subs in self._subs.values():
                for w in subs:
                    if w._registered:
                        w.fire()
        return 0.0

    async def _connect(self) -> psycopg.AsyncConnection[Any] | None:
        if self._retry_at > anyio.current_time():
            return None
        try:
            conn = await own_connection(
                self._conninfo, self._kwargs, application_name="pgstreams-listener"
            )
        except Exception as exc:
            logger.warning("listener cannot connect (retry in %.2fs): %s", self._backoff, exc)
            self._schedule_retry()
            return None
        conn.add_notify_handler(lambda n: self._dispatch(n.channel))
        self._conn = conn
        self._active = set()
        self.backend_pid = conn.info.backend_pid
        self._quiet_since = anyio.current_time()
        if self._failed:
            self._failed = False
            self.reconnects += 1
            logger.info("listener reconnected; waking every subscriber to look again")
        return conn

    async def _sync(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # A channel leaves _active before its UNLISTEN and joins only after its LISTEN, so
        # register() never mistakes a channel on its way out for a live one.
        for channel in sorted(self._active - set(self._subs)):
            self._active.discard(channel)
            await self._execute(conn, sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
        for channel in sorted(set(self._subs) - self._active):
            await self._execute(conn, sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._active.add(channel)

    async def _execute(
        self, conn: psycopg.AsyncConnection[Any], query: sql.SQL | sql.Composed
    ) -> None:
        with anyio.fail_after(_STATEMENT_TIMEOUT):
            await conn.execute(query, prepare=False)
        self._quiet_since = anyio.current_time()

    async def _wait_readable(self, deadline: float) -> None:
        """Wait (holding the lock) until the socket has data, the deadline, or a health
        check is due -- then make it."""
        conn = self._conn
        assert conn is not None
        check_at = self._quiet_since + _HEALTH_CHECK_EVERY
        with anyio.CancelScope(deadline=min(deadline, check_at)) as idle:
            self._idle = idle
            try:
                await anyio.wait_readable(conn.pgconn.socket)
                self._quiet_since = anyio.current_time()
                return
            except Exception as exc:  # e.g. the socket is gone: as good as a lost connection
                self._lost(exc)
                return
            finally:
                self._idle = None
        if anyio.current_time() < check_at:
            return  # the deadline, or someone else wants the connection
        try:
            await self._execute(conn, sql.SQL("SELECT 1"))  # finds a silently dead peer
        except Exception as exc:
            self._lost(exc)
        except BaseException:
            self._drop()
            raise

    def _drain(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Hand out the notifications that have arrived (never blocks)."""
        pgconn = conn.pgconn
        pgconn.consume_input()  # raises once the server has closed the connection
        encoding = conn.info.encoding
        while (n := pgconn.notifies()) is not None:
            self._dispatch(n.relname.decode(encoding))
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            raise psycopg.OperationalError("listener connection closed by the server")

    def _poll(self) -> None:
        """A busy subscriber's look at the connection, if nobody else is using it."""
        conn = self._conn
        if conn is None or self._lock.locked():
            return
        try:
            self._drain(conn)
        except Exception as exc:
            self._lost(exc)

    def _dispatch(self, channel: str) -> None:
        for w in self._subs.get(channel, ()):
            w.fire()

    # -- failures ------------------------------------------------------------------------

    def _lost(self, exc: Exception) -> None:
        if not self._closed:
            if isinstance(exc, psycopg.Error | TimeoutError):
                logger.warning("listener connection lost, reconnecting: %s", exc)
            else:  # a bug must not silently end every wake-up: log, reconnect
                logger.error("listener failed unexpectedly, reconnecting", exc_info=exc)
        self._failed = True
        self._drop()
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._retry_at = anyio.current_time() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _drop(self) -> None:
        """Close the connection now (only when nobody waits on its socket)."""
        conn, self._conn = self._conn, None
        self._active = set()
        self.backend_pid = None
        if conn is not None:
            conn.pgconn.finish()
