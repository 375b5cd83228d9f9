"""The server the suite runs against and fault-injection helpers: the library's own
``pgstreams.testing`` helpers, plus what only this suite needs."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pgstreams.testing import count_backends, fresh_database, server, terminate_backends
from pgstreams.testing._servers import maintenance_dsn

__all__ = [
    "admin_connect",
    "allow_connections",
    "count_backends",
    "fresh_database",
    "server",
    "terminate_backends",
]


def admin_connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def allow_connections(dsn: str, allow: bool) -> None:
    """``ALTER DATABASE ... ALLOW_CONNECTIONS``, run from the maintenance database."""
    maintenance, name = maintenance_dsn(dsn)
    with admin_connect(maintenance) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.Literal(allow)
            )
        )
