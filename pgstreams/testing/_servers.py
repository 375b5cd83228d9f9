"""Which PostgreSQL a test session uses, fresh databases on it, and fault injection."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .._pg.embedded import EmbeddedPostgres

TEST_DSN_ENV = "PGSTREAMS_TEST_DSN"
"""An admin DSN (a role allowed to CREATE DATABASE) that ``server()`` uses when set."""

_DOCKER_IMAGE = "postgres:17"


def embedded(
    *, bindir: str | None = None, settings: Mapping[str, str] | None = None
) -> EmbeddedPostgres:
    """A throwaway local PostgreSQL, not yet started: use it as ``with`` or ``async with``.

    Superuser ``postgres``, trust auth on 127.0.0.1 only, ``wal_level=logical``; ``settings``
    override the server's defaults (``postgresql.conf`` names).
    """
    return EmbeddedPostgres(bindir=bindir, settings=settings)


def docker_answers(timeout: float = 2.0) -> bool:
    """True if a Docker daemon answers ``GET /_ping`` within ``timeout`` (unix socket or tcp)."""
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
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(1024)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def server() -> Iterator[tuple[str, str]]:
    """Yield (admin DSN, where it came from) of the server for a test session.

    ``$PGSTREAMS_TEST_DSN``; else testcontainers' PostgreSQL 17 with ``wal_level=logical`` if
    a Docker daemon answers; else ``embedded()``. A server started here stops on exit.
    """
    dsn = os.environ.get(TEST_DSN_ENV)
    if dsn:
        yield dsn, TEST_DSN_ENV
        return
    if docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(_DOCKER_IMAGE, driver=None).with_command(
            "postgres -c wal_level=logical -c max_replication_slots=32"
        ) as pg:
            yield pg.get_connection_url(), "testcontainers"
        return
    with embedded() as local:
        yield local.dsn, "embedded"


def _admin(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


@contextlib.contextmanager
def fresh_database(admin_dsn: str, label: str = "test") -> Iterator[str]:
    """Create a uniquely named database, yield its DSN, then drop it (and its slots)."""
    name = f"pgs_{re.sub(r'[^a-z0-9_]', '_', label.lower())[:30]}_{uuid.uuid4().hex[:8]}"
    with _admin(admin_dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = name
    try:
        yield make_conninfo("", **params)
    finally:
        with _admin(admin_dsn) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE database = %s AND NOT active",
                [name],
            )
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def maintenance_dsn(dsn: str) -> tuple[str, str]:
    """(DSN of the server's ``postgres`` database, name of ``dsn``'s database)."""
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
    maintenance, name = maintenance_dsn(dsn)
    with _admin(maintenance) as conn:
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
    with _admin(dsn) as conn:
        cur = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            " AND (%(app)s::text IS NULL OR application_name = %(app)s)",
            {"app": application_name},
        )
        row = cur.fetchone()
        return int(row[0]) if row else 0
