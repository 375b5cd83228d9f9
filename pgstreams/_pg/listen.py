"""One shared LISTEN connection per Database, fanning wake-ups out to every subscriber.

Notifications are wake-ups only: a subscriber always re-reads its source after one, so a
notification that is lost (the connection dropped, the server restarted) costs latency,
never data. After every reconnect each subscriber is woken, because something may have
been missed while the connection was down.

The listener runs in a daemon thread on its own synchronous connection, so it works the
same whether the Database was opened with ``async with`` or ``await``, and it never holds
a connection of the caller's pool. It waits on the socket and a self-pipe together, so a
new channel is LISTENed at once rather than at the next poll slice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import threading
import time
from collections.abc import Mapping
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
_JOIN_TIMEOUT = 10.0
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


class Wakeup:
    """A subscriber's wake-up flag: set by notifications, cleared by ``arm()``.

    Call ``arm()`` *before* reading the source and ``wait()`` after an empty read: a
    notification that arrives in between leaves the flag set, so it is never missed.
    """

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._event = anyio.Event()
        self._ready = anyio.Event()
        self.waiting = False
        """True while the subscriber sleeps in ``wait()`` (it has read everything visible)."""

    def arm(self) -> bool:
        """Clear the flag; True if a notification had arrived since the last ``arm()``."""
        if self._event.is_set():
            self._event = anyio.Event()
            return True
        return False

    async def wait(self, seconds: float) -> bool:
        """Wait until woken or ``seconds`` pass; True if woken."""
        self.waiting = True
        try:
            with anyio.move_on_after(seconds):
                await self._event.wait()
                return True
            return False
        finally:
            self.waiting = False

    def fire(self) -> None:
        """Wake the subscriber (event-loop thread only)."""
        self._event.set()

    def _threadsafe(self, fn: Any) -> None:
        # RuntimeError: the subscriber's loop is closed, so there is nothing left to wake.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn)

    def _fire_threadsafe(self) -> None:
        self._threadsafe(self.fire)

    def _ready_threadsafe(self) -> None:
        self._threadsafe(self._ready.set)


class Listener:
    """The shared LISTEN connection of one Database (see module docstring)."""

    def __init__(self, conninfo: str, connect_kwargs: Mapping[str, Any] | None = None) -> None:
        self._conninfo = conninfo
        self._kwargs = {
            k: v
            for k, v in (connect_kwargs or {}).items()
            if k not in {"autocommit", "row_factory", "prepare_threshold"}
        }
        self._lock = threading.Lock()
        self._subs: dict[str, set[Wakeup]] = {}
        self._active: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pipe: tuple[int, int] | None = None
        self.backend_pid: int | None = None
        """PID of the listener's current backend (None while disconnected)."""
        self.reconnects = 0
        """How many times the connection was re-established after a failure."""

    async def register(self, channel: str) -> Wakeup:
        """Subscribe to ``channel``; returns once LISTEN is active (or after a bounded wait).

        If the server is unreachable the wait gives up after a few seconds: the caller's
        polling covers the gap, and every subscriber is woken once the listener reconnects.
        """
        wakeup = Wakeup(channel)
        with self._lock:
            if self._stopping:
                raise PgStreamsError("the Database is closed")
            self._subs.setdefault(channel, set()).add(wakeup)
            ready = channel in self._active
            self._ensure_thread()
        if ready:
            wakeup._ready.set()
            return wakeup
        self._poke()
        try:
            with anyio.move_on_after(_REGISTER_WAIT):
                await wakeup._ready.wait()
        except BaseException:  # cancelled while waiting: leave nothing registered
            self.unregister(wakeup)
            raise
        return wakeup

    def unregister(self, wakeup: Wakeup) -> None:
        """Drop a subscription; UNLISTEN happens when a channel's last subscriber leaves."""
        with self._lock:
            subs = self._subs.get(wakeup.channel)
            if subs is None:
                return
            subs.discard(wakeup)
            if subs:
                return
            del self._subs[wakeup.channel]
        self._poke()

    def subscriber_count(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._subs.values())

    def idle_count(self) -> int:
        """Subscribers asleep until a wake-up or their poll interval."""
        with self._lock:
            return sum(w.waiting for s in self._subs.values() for w in s)

    async def close(self) -> None:
        """Stop the thread and close its connection; waits for the thread to finish."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._poke()
        if thread is not None:
            # Bounded: a thread stuck on a dead network is a daemon and is left behind.
            await anyio.to_thread.run_sync(thread.join, _JOIN_TIMEOUT, abandon_on_cancel=True)
            if thread.is_alive():
                logger.warning("listener thread did not stop within %.0fs", _JOIN_TIMEOUT)
                return
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    # -- listener thread -------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[0], False)
        os.set_blocking(self._pipe[1], False)
        self._thread = threading.Thread(target=self._run, name="pgstreams-listener", daemon=True)
        self._thread.start()

    def _poke(self) -> None:
        if self._pipe is not None:
            # BlockingIOError: the pipe is full, so the thread has a wake-up pending anyway.
            with contextlib.suppress(BlockingIOError):
                os.write(self._pipe[1], b"x")

    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        connected_before = False
        while not self._stopping:
            try:
                options = {
                    **keepalive_defaults(self._conninfo),
                    **self._kwargs,
                    "application_name": "pgstreams-listener",
                }
                conn = psycopg.connect(self._conninfo, autocommit=True, **options)
            except Exception as exc:
                logger.warning("listener cannot connect (retry in %.2fs): %s", backoff, exc)
                self._sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            try:
                conn.add_notify_handler(lambda n: self._dispatch(n.channel))
                self.backend_pid = conn.info.backend_pid
                if connected_before:
                    self.reconnects += 1
                self._sync_channels(conn)
                if connected_before:
                    self._wake_all()
                connected_before = True
                backoff = _BACKOFF_MIN
                self._serve(conn)
            except psycopg.Error as exc:
                if not self._stopping:
                    logger.warning("listener connection lost, reconnecting: %s", exc)
            except Exception:  # a bug must not silently end every wake-up: log, reconnect
                logger.exception("listener failed unexpectedly, reconnecting")
            finally:
                self.backend_pid = None
                with self._lock:
                    self._active = set()
                conn.close()
            if not self._stopping:
                self._sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _serve(self, conn: psycopg.Connection[Any]) -> None:
        assert self._pipe is not None
        pipe_r = self._pipe[0]
        sock = conn.pgconn.socket
        # selectors, not select.select: file descriptors above 1024 are fine.
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ, "db")
            selector.register(pipe_r, selectors.EVENT_READ, "pipe")
            while not self._stopping:
                self._sync_channels(conn)
                ready = {key.data for key, _ in selector.select(_HEALTH_CHECK_EVERY)}
                if "pipe" in ready:
                    self._drain_pipe()
                if "db" in ready:
                    conn.pgconn.consume_input()
                    while (n := conn.pgconn.notifies()) is not None:
                        self._dispatch(n.relname.decode())
                    if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
                        raise psycopg.OperationalError("listener connection closed by the server")
                elif not ready:
                    conn.execute("SELECT 1")  # detects a silently dead connection

    def _sync_channels(self, conn: psycopg.Connection[Any]) -> None:
        # A channel leaves _active before its UNLISTEN and joins only after its LISTEN, so
        # register() never mistakes a channel on its way out for a live one.
        with self._lock:
            wanted = set(self._subs)
            to_listen = wanted - self._active
            to_unlisten = self._active - wanted
            self._active -= to_unlisten
        for channel in sorted(to_unlisten):
            conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
        for channel in sorted(to_listen):
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        with self._lock:
            self._active |= to_listen
            ready = [w for ch in self._active for w in self._subs.get(ch, ())]
        for w in ready:
            if not w._ready.is_set():
                w._ready_threadsafe()

    def _dispatch(self, channel: str) -> None:
        with self._lock:
            targets = list(self._subs.get(channel, ()))
        for w in targets:
            w._fire_threadsafe()

    def _wake_all(self) -> None:
        with self._lock:
            targets = [w for subs in self._subs.values() for w in subs]
        for w in targets:
            w._fire_threadsafe()

    def _drain_pipe(self) -> None:
        assert self._pipe is not None
        try:
            while os.read(self._pipe[0], 4096):
                pass
        except BlockingIOError:
            pass

    def _sleep(self, seconds: float) -> None:
        """Sleep, but return early when poked (so close() is never delayed by a backoff)."""
        assert self._pipe is not None
        deadline = time.monotonic() + seconds
        with selectors.DefaultSelector() as selector:
            selector.register(self._pipe[0], selectors.EVENT_READ)
            while not self._stopping and (left := deadline - time.monotonic()) > 0:
                if selector.select(left):
                    self._drain_pipe()
