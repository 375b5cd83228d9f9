from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator
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
