"""``pgstreams tail TABLE`` and ``pgstreams consumers list | drop``."""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

from .._pg.database import Database
from .._sources.changes.capture import OPERATIONS
from .._sources.changes.change import change_document
from .._sources.changes.stream import Change, PgChangeStream
from .inspect import consumer_rows, installed
from .output import UsageError, emit, table

__all__ = ["consumers", "parse_since", "tail"]

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime, option: str = "--since") -> datetime:
    """An ISO 8601 time (UTC if it names no zone), or ``30s``/``5m``/``2h``/``1d`` ago
    (``option`` names the argument in the error)."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        return now - timedelta(seconds=float(relative[1]) * _UNITS[relative[2]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not a time: use ISO 8601 (2026-12-06T10:00:00+00:00)"
            " or an age such as 30s, 5m, 2h, 1d"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _operations(text: str | None) -> set[str] | None:
    if text is None:
        return None
    ops = {op.strip() for op in text.split(",") if op.strip()}
    allowed = {*OPERATIONS, "notify", "snapshot"}
    unknown = ops - allowed
    if unknown or not ops:
        raise UsageError(f"--op takes some of {', '.join(sorted(allowed))}; got {text!r}")
    return ops


async def tail(db: Database, args: argparse.Namespace) -> int:
    ops = _operations(args.op)
    tables = [t.strip() for t in args.table.split(",") if t.strip()]
    if args.capture == "wal":
        if args.since is not None:
            raise UsageError(
                "--since needs --capture trigger: the WAL keeps no log to replay by time"
            )
        stream: PgChangeStream[Any] = PgChangeStream(db, tables, capture="wal")
        changes = stream.subscribe()
    else:
        if len(tables) != 1:
            raise UsageError("trigger capture tails one table at a time (or use --capture wal)")
        since = None if args.since is None else parse_since(args.since, datetime.now(UTC))
        await _require_trigger(db, tables[0])
        stream = PgChangeStream(db, tables[0])
        changes = stream.subscribe() if since is None else stream.subscribe_from(since)
    async with changes:
        async for change in changes:
            if ops is None or change.op in ops:
                print(_line(change, args.json), flush=True)
    return 0


async def _require_trigger(db: Database, name: str) -> None:
    """Trigger capture must be installed: tail reads its log and installs nothing."""
    if not await installed(db):
        raise UsageError(
            f"nothing captures {name}: the library is not installed here (run `pgstreams"
            " migrate` and PgChangeStream.install_trigger()), or use --capture wal"
        )
    async with db.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT 1 FROM {} c JOIN pg_catalog.pg_class r ON r.oid = to_regclass(%s)"
                " JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace"
                " WHERE c.stream = format('%%I.%%I', n.nspname, r.relname)"
                " AND c.removed_at IS NULL"
            ).format(sql.Identifier(db.schema, "change_captures")),
            [name],
        )
        found = await cur.fetchone()
    if found is None:
        raise UsageError(
            f"no trigger capture is installed on {name}: install it with"
            " PgChangeStream(db, table).install_trigger(), or use --capture wal"
        )


def _line(change: Change[Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(change_document(change), default=str)
    body = change.new if change.new is not None else change.old
    where = change.lsn or f"#{change.id}"
    row = json.dumps(body, default=str)
    return f"{change.at:%H:%M:%S} {where} {change.op:<8} {change.table} {row}"


async def consumers(db: Database, args: argparse.Namespace) -> int:
    if args.action == "drop":
        tables = [t.strip() for t in args.table.split(",") if t.strip()]
        if args.capture == "wal":
            stream: PgChangeStream[Any] = PgChangeStream(db, tables, capture="wal")
        else:
            stream = PgChangeStream(db, tables[0])
        await stream.drop_consumer(args.name)
        emit(args, {"dropped": args.name}, f"dropped consumer {args.name} of {args.table}")
        return 0
    headers, rows = await consumer_rows(db)
    emit(args, [dict(zip(headers, r, strict=True)) for r in rows], table(headers, rows))
    return 0
