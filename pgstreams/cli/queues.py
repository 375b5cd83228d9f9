"""``pgstreams queue list | stats | peek | requeue-dead | purge`` for PgQueue and pgmq."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from psycopg import sql

from .._pg.database import Database
from .._sources.pgmq.queue import PgmqQueue
from .._sources.queue.queue import PgQueue
from .inspect import pgqueue_names
from .output import UsageError, emit, table
from .progress import progress_line

__all__ = ["run"]


async def run(db: Database, args: argparse.Namespace) -> int:
    pgqueues = await pgqueue_names(db)
    pgmq = await PgmqQueue.list(db)
    if args.action == "list":
        names = [["pgqueue", n] for n in pgqueues] + [["pgmq", n] for n in pgmq]
        emit(args, [{"kind": k, "name": n} for k, n in names], table(["kind", "name"], names))
        return 0
    name = args.name
    if name not in pgqueues and name not in pgmq:
        known = ", ".join(pgqueues + pgmq) or "none"
        raise UsageError(f"no queue named {name!r} (queues: {known})")
    kind = "pgqueue" if name in pgqueues else "pgmq"
    if args.action == "stats":
        if kind == "pgqueue":
            stats = dataclasses.asdict(await PgQueue(db, name).metrics())
        else:
            stats = dataclasses.asdict(await PgmqQueue(db, name).metrics())
        emit(
            args, {"kind": kind, "name": name, **stats}, table(list(stats), [list(stats.values())])
        )
    elif args.action == "peek":
        if args.n < 1:
            raise UsageError(f"-n must be at least 1, got {args.n}")
        rows = await _peek(db, kind, name, args.n)
        headers = ["id", "attempts", "visible_at", "payload"]
        emit(args, [dict(zip(headers, r, strict=True)) for r in rows], table(headers, rows))
    elif args.action == "requeue-dead":
        queue = PgQueue[object](db, name) if kind == "pgqueue" else PgmqQueue[object](db, name)
        with progress_line(args) as line:
            count = await queue.requeue_dead(progress=line)
        emit(args, {"requeued": count}, f"requeued {count} dead message(s) of {name}")
    elif args.action == "purge":
        if not args.yes and not _confirm(f"delete every message of {kind} queue {name!r}?"):
            print("nothing deleted", file=sys.stderr)
            return 1
        if kind == "pgqueue":
            count = await PgQueue(db, name).purge()
        else:
            count = await PgmqQueue(db, name).purge()
        emit(args, {"deleted": count}, f"deleted {count} message(s) of {name}")
    return 0


async def _peek(db: Database, kind: str, name: str, n: int) -> list[list[object]]:
    async with db.connection() as conn:
        if kind == "pgqueue":
            query = sql.SQL(
                "SELECT id, attempts, visible_at, payload::text FROM {} WHERE dead_at IS NULL"
                " ORDER BY visible_at, id LIMIT %s"
            ).format(sql.Identifier(db.schema, f"q_{name}"))
        else:
            query = sql.SQL(
                "SELECT msg_id, read_ct, vt, message::text FROM {} ORDER BY vt, msg_id LIMIT %s"
            ).format(sql.Identifier("pgmq", f"q_{name}"))
        cur = await conn.execute(query, [n])
        return [[r[0], r[1], r[2], _short(r[3])] for r in await cur.fetchall()]


def _short(text: str, width: int = 60) -> str:
    compact = json.dumps(json.loads(text), separators=(",", ":"))
    return compact if len(compact) <= width else compact[: width - 1] + "…"


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError(f"{question} Pass --yes to confirm (no terminal to ask on)")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
