"""The command line's long commands -- ``migrate``, ``queue requeue-dead``, ``schedules
backfill`` -- draw progress on stderr and print their result alone on stdout (``--json``
stays parseable); run as subprocesses against the test server."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import pgstreams as ps
from pgstreams._pg.migrate import MIGRATIONS, SNAPSHOTS, WORKFLOWS

from .test_cli import cli
from .test_progress import kill_all

pytestmark = pytest.mark.anyio


async def test_migrate_shows_progress_on_stderr(pg_server: str) -> None:
    from pgstreams.testing import fresh_database

    every = len(MIGRATIONS) + len(WORKFLOWS.migrations) + len(SNAPSHOTS.migrations)
    with fresh_database(pg_server, "cli_progress") as dsn:
        code, out, err = await cli(dsn, "migrate")
        assert code == 0 and "applied 0001_queues" in out
        lines = err.splitlines()
        assert lines[0] == f"migrate: 0/{every} migrations (0%)"  # not a terminal: plain lines
        assert lines[-1].startswith(f"migrate: {every}/{every} migrations (100%) snapshots ")
        assert "starting" not in err  # the library's own progress log lines are held back
        code, out, err = await cli(dsn, "--json", "migrate")
        assert code == 0 and json.loads(out)["applied"] == []
        assert err == "migrate: 0/0 migrations (100%)\n"
    with fresh_database(pg_server, "cli_progress_q") as dsn:
        code, out, err = await cli(dsn, "-q", "--json", "migrate")
        assert code == 0 and err == "" and json.loads(out)["applied"]


async def test_requeue_dead_shows_progress_on_stderr(db: ps.Database, dsn: str) -> None:
    q: ps.PgQueue[Any] = await ps.PgQueue.create(db, f"cli_{uuid.uuid4().hex[:6]}")
    await q.publish_batch([{"n": i} for i in range(2500)])
    await kill_all(db, q)
    code, out, err = await cli(dsn, "queue", "requeue-dead", q.name)
    assert code == 0 and out == f"requeued 2500 dead message(s) of {q.name}\n"
    lines = err.splitlines()
    assert lines[0] == f"requeue_dead {q.name}: 0/2500 messages (0%)"
    assert lines[-1] == f"requeue_dead {q.name}: 2500/2500 messages (100%)"
    assert (await q.metrics()).pending == 2500
    await kill_all(db, q)
    code, out, err = await cli(dsn, "--json", "queue", "requeue-dead", q.name)
    assert code == 0 and json.loads(out) == {"requeued": 2500} and "2500/2500" in err
    await q.drop()


async def test_schedules_backfill(db: ps.Database, dsn: str) -> None:
    sched = ps.Scheduler(db)
    sid = f"b_{uuid.uuid4().hex[:6]}"
    await sched.register(sid, cron="* * * * *")
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=3)
    end = start + timedelta(minutes=119)
    window = ["--start", start.isoformat(), "--end", end.isoformat()]
    code, out, err = await cli(dsn, "schedules", "backfill", sid, *window)
    assert code == 0 and out.startswith(f"backfilled {sid}: 120 new tick(s), ")
    assert err.splitlines()[-1] == f"backfill {sid}: 120/120 fire times (100%)"
    history = await sched.history(sid, limit=200)
    assert len(history) == 120 and all(t.manual and t.catch_up for t in history)
    code, out, err = await cli(dsn, "--json", "schedules", "backfill", sid, *window)
    made = json.loads(out)
    assert code == 0 and (made["schedule"], made["ticks"]) == (sid, [])  # none twice
    assert err.splitlines()[-1] == f"backfill {sid}: 120/120 fire times (100%)"
    # --end defaults to now; relative times are ages.
    code, out, _ = await cli(dsn, "schedules", "backfill", sid, "--start", "3h")
    assert code == 0 and "new tick(s)" in out

    await sched.unregister(sid, keep_history=False)
    await sched.register(sid, cron="* * * * *")
    bad = [
        (["--start", end.isoformat(), "--end", start.isoformat()], "after end"),
        (["--start", "yesterday-ish"], "--start 'yesterday-ish' is not a time"),
        (["--start", "1h", "--end", "soon"], "--end 'soon' is not a time"),
        (["--start", "1h", "--end", (datetime.now(UTC) + timedelta(days=1)).isoformat()], "future"),
    ]
    for args, message in bad:
        code, out, err = await cli(dsn, "schedules", "backfill", sid, *args)
        assert (code, out) == (2, "") and message in err and err.count("\n") == 1, err
    assert await sched.history(sid) == []  # nothing written
    code, _, err = await cli(dsn, "schedules", "backfill", "no_such_schedule", "--start", "1h")
    assert code == 2 and "no schedule" in err
    code, _, err = await cli(dsn, "schedules", "backfill", sid)
    assert code == 2 and "--start" in err
    await sched.unregister(sid, keep_history=False)
