"""``pgstreams schedules ...`` and ``pgstreams workflows ...``."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from .._core.errors import ScheduleNotFoundError
from .._pg.database import Database
from .._sources.scheduler.scheduler import Scheduler
from .._workflows.engine import WorkflowEngine
from .._workflows.pg import PgWorkflowStorage
from .changes import parse_since
from .inspect import require_current, require_workflow_tables
from .output import UsageError, emit, table
from .progress import progress_line

__all__ = ["schedules", "workflows"]


async def schedules(db: Database, args: argparse.Namespace) -> int:
    await require_current(db)
    sched = Scheduler(db)
    try:
        if args.action == "list":
            found = await sched.list()
            headers = ["id", "every", "timezone", "state", "next_fire"]
            rows = [
                [
                    s.id,
                    s.cron or f"{s.interval:g} s",
                    s.timezone,
                    "paused" if s.paused else "active",
                    s.next_fire_at,
                ]
                for s in found
            ]
            data = [dataclasses.asdict(s) for s in found]
            emit(args, data, table(headers, rows) if rows else "(no schedules)")
        elif args.action == "next":
            if args.n < 1:
                raise UsageError(f"-n must be at least 1, got {args.n}")
            times = await sched.next_fire_times(args.id, args.n)
            emit(args, [t.isoformat() for t in times], "\n".join(t.isoformat() for t in times))
        elif args.action == "pause":
            await sched.pause(args.id)
            emit(args, {"paused": args.id}, f"paused {args.id}")
        elif args.action == "resume":
            await sched.resume(args.id)
            emit(args, {"resumed": args.id}, f"resumed {args.id}")
        elif args.action == "trigger":
            tick = await sched.trigger_now(args.id)
            text = f"triggered {args.id}: tick at {tick.scheduled_at}"
            emit(args, dataclasses.asdict(tick), text)
        elif args.action == "backfill":
            now = datetime.now(UTC)
            start = parse_since(args.start, now, "--start")
            end = now if args.end is None else parse_since(args.end, now, "--end")
            with progress_line(args) as line:
                ticks = await sched.backfill(args.id, start=start, end=end, progress=line)
            made = {"schedule": args.id, "ticks": [dataclasses.asdict(t) for t in ticks]}
            emit(args, made, f"backfilled {args.id}: {len(ticks)} new tick(s), {start} .. {end}")
    except ScheduleNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    return 0


async def workflows(db: Database, args: argparse.Namespace) -> int:
    await require_workflow_tables(db, args.prefix)
    storage = PgWorkflowStorage(db, table_prefix=args.prefix, auto_migrate=False)
    if args.action == "list":
        rows = await _runs(db, args.prefix, args.status, args.limit)
        headers = ["workflow_id", "workflow", "status", "executions", "updated_at"]
        emit(args, [dict(zip(headers, r, strict=True)) for r in rows], table(headers, rows))
        return 0
    run = await storage.get_run(args.id)
    if run is None:
        raise UsageError(f"no workflow run {args.id!r}")
    if args.action == "show":
        steps = await storage.run_history(args.id)
        data: dict[str, Any] = {
            **dataclasses.asdict(run),
            "history": [dataclasses.asdict(s) for s in steps],
        }
        lines = [f"{k}: {v}" for k, v in dataclasses.asdict(run).items()]
        lines += [f"  step {s.step} #{s.attempt}: {s.status}" for s in steps]
        emit(args, data, "\n".join(lines))
    elif args.action == "cancel":
        after = await storage.request_cancel(args.id)
        status = after.status if after is not None else run.status
        emit(args, {"workflow_id": args.id, "status": status}, f"cancel requested: {status}")
    elif args.action == "retry":
        await WorkflowEngine(storage=storage).retry(args.id)
        emit(args, {"workflow_id": args.id, "status": "queued"}, f"queued {args.id} again")
    return 0


async def _runs(db: Database, prefix: str, status: str | None, limit: int) -> list[list[Any]]:
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    async with db.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT workflow_id, workflow, status, executions, updated_at FROM {}"
                " WHERE %(status)s::text IS NULL OR status = %(status)s"
                " ORDER BY updated_at DESC LIMIT %(limit)s"
            ).format(sql.Identifier(db.schema, f"{prefix}runs")),
            {"status": status, "limit": limit},
        )
        return [list(r) for r in await cur.fetchall()]
