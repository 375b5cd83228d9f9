"""What WAL capture needs from the server, checked before anything is created, and the
objects it creates: one publication per (library schema, tables, operations), one logical
replication slot per durable consumer and one per live subscription.

Names: the publication is ``pgstreams_<hash>``; a durable consumer's slot is
``pgs_<hash>_<consumer>``; a live subscription's is ``pgslive_<hash>_<random>``. A live
slot is permanent (a temporary one dies with its session, so a reconnect would lose the
changes made meanwhile) and dropped when the subscription ends; live slots a crashed
process left behind are dropped once they have been inactive for ``STALE_LIVE``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from ...._core.errors import InvalidArgumentError
from ...._pg.database import Database
from ..capture import Operation

__all__ = [
    "STALE_LIVE",
    "SetupError",
    "WalTable",
    "WalTarget",
    "check_consumer_name",
    "check_may_publish",
    "check_sender_room",
    "check_server",
    "check_slot_room",
    "ensure_publication",
    "resolve_tables",
]

STALE_LIVE = timedelta(minutes=10)
_CONSUMER = re.compile(r"^[a-z0-9][a-z0-9_]*$")
MAX_CONSUMER = 50  # 63 (NAMEDATALEN - 1) less "pgs_" + 8 hex + "_"


class SetupError(InvalidArgumentError):
    """A server, role or table that WAL capture cannot work with (raised before anything
    is created; the message says how to fix it)."""


def check_consumer_name(name: object) -> str:
    """A WAL consumer names a replication slot: 1-50 of a-z, 0-9 and _, not starting with _."""
    if not isinstance(name, str) or not _CONSUMER.fullmatch(name) or len(name) > MAX_CONSUMER:
        raise InvalidArgumentError(
            f"a WAL consumer name becomes part of a replication slot's name: use 1-{MAX_CONSUMER}"
            f" lower-case letters, digits and underscores, not starting with one; got {name!r}"
        )
    return name


@dataclass(frozen=True, slots=True)
class WalTable:
    oid: int
    schema: str
    name: str
    key: str
    """Schema-qualified and quoted, as ``Change.table`` shows it."""
    identity: str
    """pg_class.relreplident: d(efault), n(othing), f(ull), i(ndex)."""
    pk: tuple[str, ...]
    """Primary key columns (empty if none)."""
    pk_types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WalTarget:
    """The tables of one WAL change stream and the names derived from them."""

    tables: tuple[WalTable, ...]
    operations: tuple[Operation, ...]
    tag: str
    """8 hex characters naming the (schema, tables, operations) combination."""
    publication: str

    def slot(self, consumer: str) -> str:
        return f"pgs_{self.tag}_{consumer}"

    @property
    def live_prefix(self) -> str:
        return f"pgslive_{self.tag}_"

    @property
    def durable_prefix(self) -> str:
        return f"pgs_{self.tag}_"

    def consumer_of(self, slot: str) -> str:
        return slot[len(self.durable_prefix) :]


async def check_server(conn: AsyncConnection[Any]) -> None:
    """``wal_level`` is logical and the role may replicate."""
    cur = await conn.execute(
        "SELECT current_setting('wal_level'), current_user,"
        " (SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles"
        "   WHERE rolname = current_user)"
    )
    row = await cur.fetchone()
    assert row is not None
    level, user, may_replicate = row
    if level != "logical":
        raise SetupError(
            f"WAL capture needs wal_level = logical; this server has wal_level = {level}."
            " Set it (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL -- the"
            " setting only takes effect at server start. Or use trigger capture"
            " (capture='statement'), which works at any wal_level."
        )
    if not may_replicate:
        raise SetupError(
            f"WAL capture needs a role with the REPLICATION attribute; {user!r} lacks it."
            f" Run ALTER ROLE {sql.Identifier(user).as_string(conn)} REPLICATION (as a"
            " superuser), or use trigger capture."
        )


async def _room(conn: AsyncConnection[Any], query: str) -> tuple[int, int]:
    """(used, limit) as ``query`` counts them."""
    cur = await conn.execute(query)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def check_sender_room(conn: AsyncConnection[Any]) -> None:
    """A WAL sender is free for the subscription's session."""
    used, limit = await _room(
        conn,
        "SELECT count(*), current_setting('max_wal_senders')::int FROM pg_catalog.pg_stat_activity"
        " WHERE backend_type = 'walsender'",
    )
    if used >= limit:
        raise SetupError(
            f"all {limit} WAL senders are busy (max_wal_senders = {limit}): each running WAL"
            " subscription needs one. Stop a replication client or raise max_wal_senders and"
            " restart PostgreSQL."
        )


async def check_may_publish(conn: AsyncConnection[Any], db: Database, target: WalTarget) -> None:
    """Unless its publication exists, the role must own the tables (to create it) and,
    unless the library's schema exists, may create one."""
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s),"
        " (SELECT coalesce(array_agg(format('%%I.%%I', n.nspname, c.relname)), '{}')"
        "    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
        "      ON n.oid = c.relnamespace"
        "   WHERE c.oid = ANY(%s) AND NOT pg_catalog.pg_has_role(c.relowner, 'USAGE')),"
        " EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s)"
        "   OR pg_catalog.has_database_privilege(current_database(), 'CREATE'),"
        " current_user",
        [target.publication, [t.oid for t in target.tables], db.schema],
    )
    row = await cur.fetchone()
    assert row is not None
    published, not_owned, may_create, user = row
    if not published and not_owned:
        raise SetupError(
            f"WAL capture creates a publication for {', '.join(not_owned)}, and only a"
            f" table's owner may: {user!r} does not own it. Run the first subscription as the"
            f" owner (or a superuser), or have one run CREATE PUBLICATION {target.publication}"
            f" FOR TABLE {', '.join(t.key for t in target.tables)}"
        )
    if not may_create:
        raise SetupError(
            f"the library's schema {db.schema!r} does not exist and {user!r} may not create it:"
            " GRANT CREATE ON DATABASE to the role, or run db.migrate() once as one that may"
        )


async def check_slot_room(conn: AsyncConnection[Any]) -> None:
    """A free replication slot exists (checked before creating one)."""
    used, limit = await _room(
        conn,
        "SELECT count(*), current_setting('max_replication_slots')::int"
        " FROM pg_catalog.pg_replication_slots",
    )
    if used >= limit:
        raise SetupError(
            f"all {limit} replication slots are in use (max_replication_slots = {limit})."
            " Drop slots nothing reads any more (see pg_replication_slots, or"
            " PgChangeStream.drop_consumer), or raise max_replication_slots and restart."
        )


def _table_arg(table: str | tuple[str, str]) -> tuple[str | None, str]:
    if isinstance(table, tuple):
        return table
    return None, table


async def resolve_tables(
    db: Database,
    conn: AsyncConnection[Any],
    tables: Sequence[str | tuple[str, str]],
    operations: tuple[Operation, ...],
) -> WalTarget:
    """Look the tables up; refuse missing ones and ones without the replica identity that
    ``operations`` need."""
    found: list[WalTable] = []
    for arg in tables:
        schema, name = _table_arg(arg)
        cur = await conn.execute(
            "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text,"
            "  c.relreplident::text, format('%%I.%%I', n.nspname, c.relname),"
            "  coalesce((SELECT array_agg(a.attname::text ORDER BY k.i)"
            "    FROM pg_catalog.pg_index x,"
            "      unnest(x.indkey::int2[]) WITH ORDINALITY AS k(att, i)"
            "      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.att"
            "    WHERE x.indrelid = c.oid AND x.indisprimary), '{}'),"
            "  coalesce((SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.i)"
            "    FROM pg_catalog.pg_index x,"
            "      unnest(x.indkey::int2[]) WITH ORDINALITY AS k(att, i)"
            "      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.att"
            "    WHERE x.indrelid = c.oid AND x.indisprimary), '{}'),"
            "  EXISTS (SELECT 1 FROM pg_catalog.pg_index x"
            "    WHERE x.indrelid = c.oid AND x.indisreplident)"
            " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
            "   ON n.oid = c.relnamespace"
            " WHERE c.oid = CASE WHEN %(schema)s::text IS NULL"
            "   THEN to_regclass(%(name)s)"
            "   ELSE to_regclass(format('%%I.%%I', %(schema)s::text, %(name)s::text)) END",
            {"schema": schema, "name": name},
        )
        row = await cur.fetchone()
        shown = name if schema is None else f"{schema}.{name}"
        if row is None:
            raise SetupError(f"table {shown!r} does not exist (or is not visible to this role)")
        oid, nsp, rel, kind, ident, key, pk, pk_types, ident_index = row
        if kind not in ("r", "p"):
            raise SetupError(f"{key} is not a table (relkind {kind!r}): it has no changes")
        needs_identity = "update" in operations or "delete" in operations
        missing = ident == "n" or (ident == "d" and not pk) or (ident == "i" and not ident_index)
        if needs_identity and missing:
            raise SetupError(
                f"{key} has no replica identity, so PostgreSQL cannot log which row an update"
                f" or delete changed. Add a primary key, or run ALTER TABLE {key} REPLICA"
                " IDENTITY FULL (old rows in full) or USING INDEX <unique index>; or capture"
                " only operations=('insert', 'truncate')."
            )
        found.append(WalTable(int(oid), nsp, rel, key, ident, tuple(pk), tuple(pk_types)))
    if len({t.oid for t in found}) != len(found):
        raise InvalidArgumentError("a table is named more than once")
    found.sort(key=lambda t: t.key)
    digest = hashlib.sha256(
        "\0".join([db.schema, *(t.key for t in found), *sorted(operations)]).encode()
    ).hexdigest()[:8]
    return WalTarget(tuple(found), operations, digest, f"pgstreams_{digest}")


async def ensure_publication(conn: AsyncConnection[Any], target: WalTarget) -> None:
    """Create the stream's publication unless it exists (partition changes are published
    as their root table's)."""
    cur = await conn.execute(
        "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s", [target.publication]
    )
    if await cur.fetchone() is not None:
        return
    publish = ", ".join(
        op for op in ("insert", "update", "delete", "truncate") if op in target.operations
    )
    statement = sql.SQL(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = {}, publish_via_partition_root = true)"
    ).format(
        sql.Identifier(target.publication),
        sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in target.tables),
        sql.Literal(publish),
    )
    try:
        await conn.execute(statement)
    except psycopg.errors.DuplicateObject:
        pass  # created by another subscriber meanwhile
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SetupError(
            f"creating publication {target.publication} needs ownership of"
            f" {', '.join(t.key for t in target.tables)}: {exc}"
        ) from exc
