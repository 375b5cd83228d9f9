"""pytest fixtures for suites that test code built on pgstreams.

Enable them with ``pytest_plugins = ["pgstreams.testing.fixtures"]`` in a conftest.py:

- ``pg_server`` (session): the admin DSN of the server ``pgstreams.testing.server()`` picks.
- ``pg_database`` (module): the DSN of a fresh database on it, dropped after the module, so
  test modules never share queues, tables or replication slots.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._servers import fresh_database, server

__all__ = ["pg_database", "pg_server"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with server() as (dsn, _where):
        yield dsn


@pytest.fixture(scope="module")
def pg_database(pg_server: str, request: pytest.FixtureRequest) -> Iterator[str]:
    label = request.module.__name__.rsplit(".", 1)[-1]
    with fresh_database(pg_server, label) as dsn:
        yield dsn
