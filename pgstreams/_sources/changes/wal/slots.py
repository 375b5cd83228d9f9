"""Replication slots of a WAL change stream: opening (creating, finding a lost one),
dropping, and reporting them as ``ConsumerInfo``."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from ...._core.errors import SlotLostError
from .setup import STALE_LIVE, WalTarget, check_slot_room

__all__ = [
    "ConsumerInfo",
    "SlotLostError",
    "consumer_infos",
    "create",
    "drop",
    "drop_stale_live",
    "live_name",
    "state",
]

logger = logging.getLogger("pgstreams.changes.wal")


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """A durable consumer of a change stream as ``PgChangeStream.consumers()`` reports it."""

    name: str
    slot: str | None
    """Its replication slot (WAL capture), None for trigger capture."""
    confirmed_lsn: str | None
    """Up to where it confirmed handling changes (WAL capture)."""
    retained_bytes: int | None
    """WAL the server keeps for the slot (WAL capture)."""
    wal_status: str | None
    """The slot's ``wal_status``: reserved, extended, unreserved or lost (WAL capture)."""
    active: bool
    """A session is streaming from the slot now (WAL capture; trigger capture: False)."""
    lag: int | None
    """WAL capture: bytes of WAL written since its confirmed position. Trigger capture:
    committed changes it has not finished with."""


def live_name(target: WalTarget) -> str:
    return target.live_prefix + secrets.token_hex(6)


async def state(conn: AsyncConnection[Any], slot: str) -> tuple[str | None, int] | None:
    """(wal_status, confirmed_flush_lsn as int) of a slot, None if it does not exist."""
    cur = await conn.execute(
        "SELECT wal_status, (confirmed_flush_lsn - '0/0'::pg_lsn)::int8"
        " FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
        [slot],
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return (None if row[0] is None else str(row[0])), int(row[1] or 0)


async def create(conn: AsyncConnection[Any], slot: str) -> int:
    """Create a pgoutput slot; returns its consistent point (the position changes start at)."""
    await check_slot_room(conn)
    cur = await conn.execute(
        "SELECT (lsn - '0/0'::pg_lsn)::int8"
        " FROM pg_catalog.pg_create_logical_replication_slot(%s, 'pgoutput')",
        [slot],
    )
    row = await cur.fetchone()
    assert row is not None
    logger.info("created replication slot %s", slot)
    return int(row[0])


async def drop(conn: AsyncConnection[Any], slot: str) -> bool:
    """Drop a slot unless a session still streams from it; True if it is gone."""
    cur = await conn.execute(
        "SELECT pg_catalog.pg_drop_replication_slot(slot_name)"
        " FROM pg_catalog.pg_replication_slots WHERE slot_name = %s AND NOT active",
        [slot],
    )
    await cur.fetchall()
    cur = await conn.execute(
        "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = %s", [slot]
    )
    gone = await cur.fetchone() is None
    if gone:
        logger.info("dropped replication slot %s", slot)
    return gone


async def drop_stale_live(conn: AsyncConnection[Any], target: WalTarget) -> None:
    """Drop live slots of this stream that a dead process left (inactive for STALE_LIVE;
    PostgreSQL 17 and later record since when)."""
    cur = await conn.execute("SELECT current_setting('server_version_num')::int >= 170000")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return
    cur = await conn.execute(
        "SELECT slot_name, pg_catalog.pg_drop_replication_slot(slot_name)"
        " FROM pg_catalog.pg_replication_slots"
        " WHERE starts_with(slot_name::text, %s) AND NOT active"
        "   AND inactive_since < now() - %s",
        [target.live_prefix, STALE_LIVE],
    )
    for name, _ in await cur.fetchall():
        logger.warning("dropped replication slot %s, left behind by a live subscription", name)


async def consumer_infos(conn: AsyncConnection[Any], target: WalTarget) -> list[ConsumerInfo]:
    cur = await conn.execute(
        "SELECT slot_name::text, confirmed_flush_lsn::text,"
        "  (pg_current_wal_lsn() - restart_lsn)::int8, wal_status, active,"
        "  (pg_current_wal_lsn() - confirmed_flush_lsn)::int8"
        " FROM pg_catalog.pg_replication_slots"
        " WHERE starts_with(slot_name::text, %s) AND database = current_database()"
        " ORDER BY slot_name",
        [target.durable_prefix],
    )
    return [
        ConsumerInfo(
            name=target.consumer_of(slot),
            slot=slot,
            confirmed_lsn=confirmed,
            retained_bytes=None if retained is None else max(int(retained), 0),
            wal_status=status,
            active=bool(active),
            lag=None if lag is None else max(int(lag), 0),
        )
        for slot, confirmed, retained, status, active, lag in await cur.fetchall()
    ]
