"""The ``pgstreams`` command line, run as a subprocess against a real server: read commands
write nothing, errors are one line with the right exit code, tail follows and stops
cleanly on a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from psycopg import sql

import pgstreams as ps

from .test_changes import execute, make_table

pytestmark = pytest.mark.anyio


async def cli(dsn: str, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run ``pgstreams ARGS`` with ``$PGSTREAMS_DSN``; (exit code, stdout, stderr)."""
    env = {**os.environ, "PGSTREAMS_DSN": dsn}
    result = await anyio.run_process(
        [sys.executable, "-m", "pgstreams.cli", *args], input=stdin, env=env, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def schemas(dsn: str) -> list[str]:
    async with ps.connect(dsn) as db, db.connection() as conn:
        cur = await conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = 'pgstreams'")
        return [r[0] for r in await cur.fetchall()]


async def test_status_on_an_empty_database_writes_nothing(pg_server: str) -> None:
    from pgstreams.testing import fresh_database

    with fresh_database(pg_server, "cli_empty") as dsn:
        code, out, err = await cli(dsn, "status")
        assert (code, err) == (0, "")
        assert "not installed (run `pgstreams migrate`)" in out
        assert await schemas(dsn) == []
        code, out, _ = await cli(dsn, "--json", "status")
        assert json.loads(out)["version"] == 0 and json.loads(out)["pending_migrations"]
        code, out, _ = await cli(dsn, "migrate")
        assert code == 0 and "applied 0001_queues" in out
        code, out, _ = await cli(dsn, "migrate")
        assert code == 0 and "nothing to apply" in out


async def test_queue_commands(db: ps.Database, dsn: str) -> None:
    name = f"jobs_{uuid.uuid4().hex[:6]}"
    queue: ps.PgQueue[dict[str, Any]] = await ps.PgQueue.create(db, name, max_attempts=1)
    await queue.publish_batch([{"n": i} for i in range(3)])
    code, out, _ = await cli(dsn, "queue", "list")
    assert code == 0 and name in out
    code, out, _ = await cli(dsn, "--json", "queue", "stats", name)
    stats = json.loads(out)
    assert (code, stats["kind"], stats["pending"], stats["dead"]) == (0, "pgqueue", 3, 0)
    code, out, _ = await cli(dsn, "--json", "queue", "peek", name, "-n", "2")
    assert code == 0 and [json.loads(r["payload"]) for r in json.loads(out)] == [{"n": 0}, {"n": 1}]
    assert (await queue.metrics()).pending == 3  # peek took nothing
    env = await queue.subscribe_ack().first()
    await env.nack(error="boom")  # max_attempts=1: dead
    code, out, _ = await cli(dsn, "queue", "requeue-dead", name)
    assert code == 0 and "requeued 1" in out
    # purge asks; with no terminal to ask on it refuses and deletes nothing
    code, _, err = await cli(dsn, "queue", "purge", name)
    assert code == 2 and "--yes" in err and (await queue.metrics()).pending == 3
    code, out, _ = await cli(dsn, "queue", "purge", name, "--yes")
    assert code == 0 and "deleted 3" in out
    await queue.drop()

    orders: ps.PgmqQueue[dict[str, Any]] = await ps.PgmqQueue.create(
        db, f"orders_{uuid.uuid4().hex[:6]}", max_attempts=1
    )
    await orders.publish({"order": 1})
    first = await orders.subscribe_ack().first()
    await first.nack(error="boom")
    with anyio.move_on_after(0.5):  # the next read moves it to the dead-letter queue
        await orders.subscribe_ack(poll_interval=0.05).first()
    assert (await orders.metrics()).dead == 1
    code, out, _ = await cli(dsn, "queue", "requeue-dead", orders.name)
    assert code == 0 and "requeued 1" in out
    assert (await orders.metrics()).dead == 0
    assert (await orders.subscribe_ack().first()).value == {"order": 1}
    await orders.drop()


async def test_errors_are_one_line_with_their_exit_code(dsn: str) -> None:
    code, out, err = await cli(dsn, "queue", "stats", "no_such_queue")
    assert code == 2 and out == "" and err.count("\n") == 1 and "no queue named" in err
    code, _, err = await cli("postgresql://nobody@127.0.0.1:1/none", "status")
    assert code == 1 and err.count("\n") == 1 and "cannot connect" in err
    assert "Traceback" not in err
    code, _, err = await cli(dsn, "tail", "t", "--since", "yesterday-ish")
    assert code == 2 and "not a time" in err
    code, _, err = await cli(dsn, "tail", "no_table_here")
    assert code == 2 and "no trigger capture" in err
    code, _, err = await cli(dsn, "-v", "queue", "stats", "no_such_queue")
    assert code == 2 and "Traceback" in err
    code, _, err = await cli(dsn, "frobnicate")
    assert code == 2 and "invalid choice" in err


async def _tail(dsn: str, *args: str, lines: int) -> list[str]:
    """Run ``pgstreams ARGS`` (a tail) until it printed ``lines`` lines, then SIGINT it; it must
    exit 0. (A plain Popen: asyncio's child watcher can lose the exit code of a child that
    exits on a signal while another thread reaps processes.)"""
    env = {**os.environ, "PGSTREAMS_DSN": dsn}
    proc = subprocess.Popen(  # noqa: ASYNC220 - see the docstring
        [sys.executable, "-m", "pgstreams.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    got: list[str] = []
    try:
        assert proc.stdout is not None
        with anyio.fail_after(20):
            while len(got) < lines:
                line = await anyio.to_thread.run_sync(proc.stdout.readline)
                assert line, f"tail ended: {proc.stderr.read() if proc.stderr else ''}"
                got.append(line.rstrip("\n"))
        assert await _stopped(proc, signal.SIGINT) == 0
    finally:
        _reap(proc)
    return got


async def _stopped(proc: subprocess.Popen[str], sig: int) -> int:
    """Send ``sig`` and wait (in a thread) for the exit code."""
    proc.send_signal(sig)
    return await anyio.to_thread.run_sync(lambda: proc.wait(10))


def _reap(proc: subprocess.Popen[str]) -> str:
    """Kill ``proc`` if it still runs; its stderr, and close its pipes."""
    if proc.returncode is None:
        proc.kill()
        proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return err


async def test_tail_replays_filters_and_stops_on_ctrl_c(db: ps.Database, dsn: str) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    ident = sql.Identifier(table)
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (1), (2)").format(ident))
    await execute(db, sql.SQL("UPDATE {} SET v = 5 WHERE id = 1").format(ident))
    lines = await _tail(dsn, "--json", "tail", table, "--since", "1h", "--op", "update", lines=1)
    assert [json.loads(line)["new"] for line in lines] == [{"id": 1, "v": 5, "body": None}]
    await cs.remove_trigger()


async def test_tail_wal_and_wal_consumers(wal_dsn: str) -> None:
    async with ps.connect(wal_dsn) as db:
        table = await make_table(db)
        cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, table, capture="wal")
        await cs.add_consumer("cli_seen")
        code, out, _ = await cli(wal_dsn, "--json", "consumers", "list")
        assert code == 0 and [c["consumer"] for c in json.loads(out)] == [
            (await cs.consumers())[0].slot
        ]
        async with anyio.create_task_group() as tg:

            async def write() -> None:
                with anyio.fail_after(20):
                    while not await _live_slot(db):  # noqa: ASYNC110 - server state
                        await anyio.sleep(0.05)
                await execute(
                    db, sql.SQL("INSERT INTO {} (id) VALUES (7)").format(sql.Identifier(table))
                )

            tg.start_soon(write)
            lines = await _tail(wal_dsn, "tail", table, "--capture", "wal", lines=1)
        assert "insert" in lines[0] and '"id": 7' in lines[0]
        code, out, _ = await cli(
            wal_dsn, "consumers", "drop", "cli_seen", "--table", table, "--capture", "wal"
        )
        assert code == 0 and await cs.consumers() == []


async def _live_slot(db: ps.Database) -> bool:
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name LIKE 'pgslive%%'"
        )
        row = await cur.fetchone()
        return bool(row and row[0])


async def test_schedule_and_workflow_commands(db: ps.Database, dsn: str) -> None:
    sched = ps.Scheduler(db)
    sid = f"s_{uuid.uuid4().hex[:6]}"
    await sched.register(sid, cron="0 2 * * *", timezone="UTC")
    code, out, _ = await cli(dsn, "--json", "schedules", "list")
    assert code == 0 and sid in [s["id"] for s in json.loads(out)]
    code, out, _ = await cli(dsn, "--json", "schedules", "next", sid, "-n", "2")
    assert code == 0 and [t[11:16] for t in json.loads(out)] == ["02:00", "02:00"]
    code, _, _ = await cli(dsn, "schedules", "pause", sid)
    assert code == 0 and (await sched.get(sid)).paused  # type: ignore[union-attr]
    code, _, _ = await cli(dsn, "schedules", "resume", sid)
    assert code == 0 and not (await sched.get(sid)).paused  # type: ignore[union-attr]
    code, out, _ = await cli(dsn, "schedules", "trigger", sid)
    assert code == 0 and f"triggered {sid}" in out
    code, _, err = await cli(dsn, "schedules", "pause", "no_such_schedule")
    assert code == 2 and err.count("\n") == 1

    wf: ps.Workflow[dict[str, Any], dict[str, Any]] = ps.Workflow(f"w_{uuid.uuid4().hex[:6]}")

    @wf.run
    async def body(ctx: ps.WorkflowContext, data: dict[str, Any]) -> dict[str, Any]:
        return data

    engine = ps.WorkflowEngine(db)
    run = await engine.start(wf, {"x": 1}, workflow_id=f"{wf.name}-1")
    code, out, _ = await cli(dsn, "--json", "workflows", "list", "--status", "queued")
    assert code == 0 and run.workflow_id in [r["workflow_id"] for r in json.loads(out)]
    code, out, _ = await cli(dsn, "--json", "workflows", "show", run.workflow_id)
    assert code == 0 and json.loads(out)["input"] == {"x": 1}
    code, out, _ = await cli(dsn, "workflows", "cancel", run.workflow_id)
    assert code == 0 and "cancel requested" in out
    assert await run.status() == "cancelled"
    code, out, _ = await cli(dsn, "workflows", "retry", run.workflow_id)
    assert code == 0 and "again" in out and await run.status() == "queued"
    code, _, err = await cli(dsn, "workflows", "retry", run.workflow_id)
    assert code == 2 and "only a failed or cancelled run can be retried" in err
    code, _, err = await cli(dsn, "workflows", "show", "nope")
    assert code == 2 and "no workflow run" in err
    code, _, err = await cli(dsn, "workflows", "--prefix", "nope_", "list")
    assert code == 2 and "no workflow tables" in err


WORKER_MODULE = """
import os

import anyio
import psycopg

import pgstreams as ps

flow = ps.Workflow("cli_flow")


async def effect(dsn, step):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("INSERT INTO cli_effects VALUES (%s)", [step])
    if step == "two" and os.environ.get("CLI_HANG"):
        await anyio.sleep_forever()
    if step == "two" and os.environ.get("CLI_SLOW"):
        await anyio.sleep(float(os.environ["CLI_SLOW"]))
    return step


@flow.run
async def body(ctx, data):
    return [await ctx.step(s, effect, data["dsn"], s) for s in ("one", "two", "three")]


def make(db):
    storage = ps.PgWorkflowStorage(db, table_prefix="cli_")
    return ps.WorkflowEngine(storage=storage, workflows=[flow], lease=1.0)
"""


@asynccontextmanager
async def _worker_module(db: ps.Database, tmp_path: Any) -> AsyncIterator[Any]:
    """``cli_jobs`` (WORKER_MODULE) importable here and by a worker started in tmp_path."""
    (tmp_path / "cli_jobs.py").write_text(WORKER_MODULE)
    await execute(db, "CREATE TABLE IF NOT EXISTS cli_effects (step text)")
    await execute(db, "TRUNCATE cli_effects")
    sys.path.insert(0, str(tmp_path))
    try:
        import cli_jobs  # type: ignore[import-not-found]

        yield cli_jobs
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cli_jobs", None)


def _start_worker(dsn: str, tmp_path: Any, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgstreams.cli", "worker", "cli_jobs:make", *args],
        cwd=tmp_path,
        env={**os.environ, "PGSTREAMS_DSN": dsn, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _until_effect(db: ps.Database, step: str) -> None:
    with anyio.fail_after(20):
        while (step,) not in await _effects(db):  # noqa: ASYNC110 - server state
            await anyio.sleep(0.05)


async def test_worker_hands_back_its_run_when_the_grace_period_ends(
    db: ps.Database, dsn: str, tmp_path: Any
) -> None:
    async with _worker_module(db, tmp_path) as cli_jobs:
        engine = cli_jobs.make(db)
        run = await engine.start(cli_jobs.flow, {"dsn": dsn}, workflow_id="cli-1")
        proc = _start_worker(dsn, tmp_path, "--grace", "0.3", CLI_HANG="1")
        try:
            await _until_effect(db, "two")
            assert await _stopped(proc, signal.SIGTERM) == 0
        finally:
            err = _reap(proc)
        assert "workflow cli-1 (cli_flow): started" in err and "handing back 1" in err
        assert await run.status() == "queued"  # handed back, not left to its lease
        async with engine.worker():
            assert await run.result() == ["one", "two", "three"]
        # The finished step is not run again; the interrupted one is; the run ends once.
        assert sorted(await _effects(db)) == [("one",), ("three",), ("two",), ("two",)]


async def test_worker_finishes_its_run_on_sigterm_and_takes_no_new_one(
    db: ps.Database, dsn: str, tmp_path: Any
) -> None:
    async with _worker_module(db, tmp_path) as cli_jobs:
        engine = cli_jobs.make(db)
        run = await engine.start(cli_jobs.flow, {"dsn": dsn}, workflow_id="cli-2")
        proc = _start_worker(dsn, tmp_path, "--concurrency", "2", CLI_SLOW="1.5")
        try:
            await _until_effect(db, "two")
            proc.send_signal(signal.SIGTERM)
            await anyio.sleep(0.2)
            # Started after the signal: the stopping worker, with a slot free, leaves it.
            later = await engine.start(cli_jobs.flow, {"dsn": dsn}, workflow_id="cli-3")
            assert await anyio.to_thread.run_sync(lambda: proc.wait(20)) == 0
        finally:
            err = _reap(proc)
        assert "finishing the runs in flight" in err
        assert "workflow cli-2 (cli_flow): completed" in err
        assert await run.status() == "completed" and await later.status() == "queued"
        # Each step ran once: the run finished in the stopping worker, not elsewhere.
        assert sorted(await _effects(db)) == [("one",), ("three",), ("two",)]


async def _effects(db: ps.Database) -> list[tuple[str]]:
    async with db.connection() as conn:
        cur = await conn.execute("SELECT step FROM cli_effects")
        return [(str(r[0]),) for r in await cur.fetchall()]


async def test_demo_runs_every_part_and_keeps_its_server_on_request() -> None:
    code, _, err = await cli("", "demo", "--pace", "-1")
    assert code == 2 and "--pace must be 0 or more" in err
    code, out, err = await cli("", "demo")
    assert code == 0, err
    for part in (
        "PgQueue",
        "dead letters: ['user1@example.com']",
        "pgmq",
        "trigger    update",
        "wal        delete",
        "tick of demo_heartbeat",
        "worker 2 finished it",
        "== done",
    ):
        assert part in out
    proc = subprocess.Popen(  # noqa: ASYNC220 - waited on in a thread
        [sys.executable, "-m", "pgstreams.cli", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        dsn = ""
        assert proc.stdout is not None
        with anyio.fail_after(40):
            while not dsn:
                line = await anyio.to_thread.run_sync(proc.stdout.readline)
                assert line, "demo --keep ended early"
                if "export PGSTREAMS_DSN=" in line:
                    dsn = line.split("'")[1]
        code, out, _ = await cli(dsn, "status")
        assert code == 0 and "demo_emails" in out
        assert await _stopped(proc, signal.SIGINT) == 0
    finally:
        _reap(proc)
