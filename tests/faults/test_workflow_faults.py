"""PgWorkflowStorage under faults: a statement that waited on a row lock away from the run
session still writes nothing once the run's lock is gone; the session's lock wait limit
stays with the session."""

from __future__ import annotations

import anyio
import psycopg

import pgstreams as ps

from ..integration.test_workflow_storage import calls, entered, gated, gates, waiting_on_a_lock
from ..pgserver import terminate_backends


async def test_a_write_that_waited_away_from_the_session_is_undone_if_the_lock_went(
    db: ps.Database, dsn: str
) -> None:
    storage = ps.PgWorkflowStorage(db, table_prefix="fenced_wait_")
    engine = ps.WorkflowEngine(storage=storage, workflows=[gated], lease=1.5)
    gates["f"], entered["f"] = anyio.Event(), anyio.Event()
    calls.pop("f", None)
    run = await engine.start(gated, None, workflow_id="f")
    step_row = "SELECT FROM pgstreams.fenced_wait_steps WHERE workflow_id = 'f' FOR UPDATE"
    async with engine.worker():
        with anyio.fail_after(10):
            await entered["f"].wait()
        session = storage._session.backend_pid
        assert session is not None
        async with await psycopg.AsyncConnection.connect(dsn) as other:
            await other.execute(step_row)
            gates["f"].set()  # the step's result now waits for the row, off the session
            with anyio.fail_after(10):
                while not [pid for pid in await waiting_on_a_lock(db) if pid != session]:  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # the server has no event to await
            entered["f"] = anyio.Event()
            terminate_backends(dsn, pid=session)  # the run's lock goes with it
            await other.rollback()  # the waiting write gets its row, then finds no lock
        with anyio.fail_after(20):
            assert await run.result() == "through"
    history = await storage.run_history("f")
    assert [(h.attempt, h.status) for h in history] == [(1, "running"), (2, "succeeded")]
    assert calls["f"] == 2  # the first result was never stored: the step ran again
    record = await storage.get_run("f")
    assert record is not None and record.executions == 2
    await storage.close()


async def test_the_session_s_lock_wait_limit_does_not_go_back_to_the_pool(dsn: str) -> None:
    async with ps.connect(dsn, min_size=2, max_size=2) as db:
        await db.migrate()
        async with db.connection() as conn:
            cur = await conn.execute("SHOW lock_timeout")
            default = (await cur.fetchall())[0][0]
        storage = ps.PgWorkflowStorage(db, table_prefix="wait_limit_")
        await storage.create_run("w", "wf", None)
        assert await storage.claim_run(["wf"], "me", 30) is not None  # opens the session
        session = storage._session.backend_pid
        assert session is not None
        await storage.close()  # the session's connection goes back
        shown = {}
        async with db.connection() as a, db.connection() as b:  # every connection there is
            for conn in (a, b):
                cur = await conn.execute("SHOW lock_timeout")
                shown[conn.info.backend_pid] = (await cur.fetchall())[0][0]
        assert session in shown
        assert list(shown.values()) == [default, default]
