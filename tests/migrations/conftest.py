"""Fixtures of the migration tests: more fresh databases, and a connection to the module's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from pgstreams.testing import fresh_database

from .support import Conn


@pytest.fixture
def new_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh database for this test alone."""
    with fresh_database(pg_admin_dsn, "upgraded") as dsn:
        yield dsn


@pytest.fixture
def fresh_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """Another fresh database for this test alone."""
    with fresh_database(pg_admin_dsn, "fresh") as dsn:
        yield dsn


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[Conn]:
    """An autocommit connection to the module's database."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        yield c
