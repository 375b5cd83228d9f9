"""PgWorkflowStorage: a run waiting on a row lock holds up no other run, and text of any
kind (ids, workflow and step names, errors) is stored as given."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgstreams as ps

from ..pgserver import admin_connect

# -- a run whose row another transaction holds ---------------------------------------------

gates: dict[str, anyio.Event] = {}  # a run's step waits on its gate
entered: dict[str, anyio.Event] = {}  # set when that step has begun
calls: dict[str, int] = {}  # how many times it began


async def _at_gate(workflow_id: str) -> str:
    calls[workflow_id] = calls.get(workflow_id, 0) + 1
    entered[workflow_id].set()
    await gates[workflow_id].wait()
    return "through"


gated = ps.Workflow[None, str]("gated")


@gated.run
async def _gated(ctx: ps.WorkflowContext, input: None) -> str:
    return await ctx.step("gate", _at_gate, ctx.workflow_id)


async def _plus_one(x: int) -> int:
    return x + 1


quick = ps.Workflow[int, int]("quick")


@quick.run
async def _quick(ctx: ps.WorkflowContext, n: int) -> int:
    a = await ctx.step("a", _plus_one, n)
    b = await ctx.step("b", _plus_one, a)
    return await ctx.step("c", _plus_one, b)


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    with anyio.fail_after(10):
        while not await check():  # noqa: ASYNC110 - the server has no event to await
            await anyio.sleep(0.01)


async def waiting_on_a_lock(db: ps.Database) -> list[int]:
    """Backends of this database waiting on a lock (a row another transaction holds)."""
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return [r[0] for r in await cur.fetchall()]


@pytest.mark.parametrize("row", ["run", "step"])
async def test_a_run_waiting_on_a_row_lock_holds_up_no_other_run(
    db: ps.Database, dsn: str, row: str
) -> None:
    prefix = f"hol_{row}_"
    storage = ps.PgWorkflowStorage(db, table_prefix=prefix)
    engine = ps.WorkflowEngine(storage=storage, workflows=[gated, quick])
    gates["held"], entered["held"] = anyio.Event(), anyio.Event()
    held = await engine.start(gated, None, workflow_id="held")
    table = sql.Identifier("pgstreams", f"{prefix}{row}s")
    lock = sql.SQL("SELECT FROM {} WHERE workflow_id = 'held' FOR UPDATE").format(table)
    async with engine.worker(concurrency=21):
        with anyio.fail_after(10):
            await entered["held"].wait()
        async with await psycopg.AsyncConnection.connect(dsn) as other:
            # Another transaction holds the run's row: its step's result (step row) or
            # its last update (run row) waits for it.
            await other.execute(lock)
            gates["held"].set()
            await eventually(lambda: _has_waiter(db))
            runs = [await engine.start(quick, i, workflow_id=f"quick-{i}") for i in range(20)]
            with anyio.fail_after(15):  # before the fix: stuck behind the waiting statement
                assert [await run.result() for run in runs] == [i + 3 for i in range(20)]
            assert await held.status() == "running"
            waiters = await waiting_on_a_lock(db)  # it still waits, alone, off the session
            assert waiters and storage._session.backend_pid not in waiters
            await other.rollback()
        with anyio.fail_after(10):
            assert await held.result() == "through"
    history = await storage.run_history("held")
    assert [(h.step, h.attempt, h.status) for h in history] == [("gate", 1, "succeeded")]
    await storage.close()


async def _has_waiter(db: ps.Database) -> bool:
    return bool(await waiting_on_a_lock(db))


async def test_a_worker_exits_while_one_of_its_runs_waits_on_a_row_lock(
    db: ps.Database, dsn: str
) -> None:
    storage = ps.PgWorkflowStorage(db, table_prefix="exiting_")
    engine = ps.WorkflowEngine(storage=storage, workflows=[gated])
    gates["exiting"], entered["exiting"] = anyio.Event(), anyio.Event()
    run = await engine.start(gated, None, workflow_id="exiting")
    step_row = "SELECT FROM pgstreams.exiting_steps WHERE workflow_id = 'exiting' FOR UPDATE"
    async with await psycopg.AsyncConnection.connect(dsn) as other:
        with anyio.fail_after(10):  # before the fix: the exit waits for the row
            async with engine.worker():
                await entered["exiting"].wait()
                await other.execute(step_row)
                gates["exiting"].set()
                await eventually(lambda: _has_waiter(db))
        assert await run.status() == "queued"  # handed back; its step's result not stored
        await other.rollback()
    async with engine.worker():
        with anyio.fail_after(10):
            assert await run.result() == "through"
    history = await storage.run_history("exiting")
    assert [(h.attempt, h.status) for h in history] == [(1, "running"), (2, "succeeded")]
    await storage.close()


# -- text of any kind ------------------------------------------------------------------------

AWKWARD = [
    'a "quoted" id',
    "back\\slash \\u0041 \\\\ \\",
    "control \x01\x1f\t\n\r characters \x7f",
    "non-ASCII: é ß 日本語 😀 \u2028\u2029",
    '{"i": 1, "n": ["json-like"]}',
]


def _failing(message: str) -> Callable[[], None]:
    def fail() -> None:
        raise ValueError(message)

    return fail


@pytest.fixture(params=["utf8", "sql_ascii"])
async def awkward_db(request: pytest.FixtureRequest, pg_admin_dsn: str) -> AsyncIterator[Any]:
    """A database in UTF8, and one in SQL_ASCII (bytes stored as they come: the driver's
    parameters get there, ``\\u`` escapes above ASCII in JSON text do not)."""
    name = f"pgs_awkward_{request.param}_{uuid.uuid4().hex[:8]}"
    encoding = (
        "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'" if request.param == "sql_ascii" else ""
    )
    with admin_connect(pg_admin_dsn) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0 " + encoding).format(
                sql.Identifier(name)
            )
        )
    params = conninfo_to_dict(pg_admin_dsn)
    params.update(dbname=name, client_encoding="utf8")
    try:
        async with ps.connect(make_conninfo("", **params), max_size=4) as db:
            await db.migrate()
            yield db
    finally:
        with admin_connect(pg_admin_dsn) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def test_ids_names_and_errors_of_any_text_are_stored_as_given(
    awkward_db: ps.Database,
) -> None:
    storage = ps.PgWorkflowStorage(awkward_db)
    for n, text in enumerate(AWKWARD):
        workflow = ps.Workflow[None, str](f"wf {n}: {text}")

        @workflow.run
        async def _run(ctx: ps.WorkflowContext, input: None, text: str = text) -> str:
            await ctx.step(f"ok: {text}", _plus_one, 1)
            try:
                await ctx.step(f"bad: {text}", _failing(f"failed: {text}"))
            except ps.StepFailedError as exc:
                return f"{exc.error['message']} | {ctx.input}"
            raise AssertionError("the step did not fail")

        engine = ps.WorkflowEngine(storage=storage, workflows=[workflow])
        workflow_id = f"id {n}: {text}"
        run = await engine.start(workflow, None, workflow_id=workflow_id)
        assert run.created
        async with engine.worker():
            with anyio.fail_after(10):
                assert await run.result() == f"failed: {text} | None"
        record = await storage.get_run(workflow_id)
        assert record is not None
        assert (record.workflow_id, record.workflow) == (workflow_id, workflow.name)
        history = await storage.run_history(workflow_id)
        assert [(h.step, h.status) for h in history] == [
            (f"ok: {text}", "succeeded"),
            (f"bad: {text}", "failed"),
        ]
        assert history[1].error == {"type": "ValueError", "message": f"failed: {text}"}
        again, created = await storage.create_run(workflow_id, workflow.name, None)
        assert not created and again.workflow_id == workflow_id
    await storage.close()


async def test_text_postgresql_cannot_store_is_refused_before_anything_is_written(
    db: ps.Database,
) -> None:
    storage = ps.PgWorkflowStorage(db, table_prefix="unstorable_")
    # A surrogate pair as two code points: written as JSON \\u escapes, the server would
    # read one character (and store another id than the one given).
    for bad in ["pair \ud83d\ude00", "lone \udcff"]:
        with pytest.raises(ps.InvalidArgumentError, match="not valid Unicode"):
            await storage.create_run(bad, "wf", None)
        with pytest.raises(ps.InvalidArgumentError, match="not valid Unicode"):
            await storage.create_run("fine", bad, None)
    await storage.create_run("fine-2", "wf", None)
    with pytest.raises(ps.InvalidArgumentError, match="not valid Unicode"):
        await storage.create_attempt("fine-2", "pair \ud83d\ude00")
    with pytest.raises(ps.InvalidArgumentError, match="not valid Unicode"):
        await storage.mark_step("fine-2", "pair \ud83d\ude00", "succeeded", output=1)
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM pgstreams.unstorable_runs),"
            " (SELECT count(*) FROM pgstreams.unstorable_steps)"
        )
        assert await cur.fetchone() == (1, 0)  # fine-2 alone
    await storage.close()
