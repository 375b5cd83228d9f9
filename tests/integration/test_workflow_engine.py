"""The workflow engine's wake-ups, retention and late registration, on PostgreSQL and Redis.

Wake-up tests run their engines with a 30 s poll interval inside a 10 s deadline: only a
wake-up (NOTIFY, or Redis pub/sub) can make them pass. Each engine that stands for
another process gets a storage object of its own on the same tables or keys.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
import pytest
from psycopg import sql

import pgstreams as ps
from pgstreams._pg.locks import advisory_key

from . import test_workflows as suite
from .test_workflows import eventually

storage = suite.storage  # the storage fixture: each test runs on PostgreSQL and on Redis

SLOW_POLL = 30.0

gates: dict[str, anyio.Event] = {}
gated = ps.Workflow[str, str]("gated")


async def _pass(gate: str) -> str:
    await gates[gate].wait()
    return gate


@gated.run
async def _gated(ctx: ps.WorkflowContext, gate: str) -> str:
    return await ctx.step("gate", _pass, gate)


echo = ps.Workflow[str, str]("echo")


async def _echo(value: str) -> str:
    return value


@echo.run
async def _echo_run(ctx: ps.WorkflowContext, value: str) -> str:
    return await ctx.step("echo", _echo, value)


def twin(storage: ps.WorkflowStorage) -> ps.WorkflowStorage:
    """Another storage object on the same tables or keys, as another process has."""
    if isinstance(storage, ps.PgWorkflowStorage):
        return ps.PgWorkflowStorage(storage._db, table_prefix=storage.table_prefix)
    assert isinstance(storage, ps.RedisWorkflowStorage)
    return ps.RedisWorkflowStorage(storage._redis, key_prefix=storage.key_prefix)


def watch_idle(storage: ps.WorkflowStorage) -> anyio.Event:
    """Set once a claim on ``storage`` finds nothing: its worker then sleeps until woken
    (or polled, 30 s later)."""
    idle = anyio.Event()
    claim = storage.claim_run

    async def watched(workflows: Any, owner: str, lease: float) -> ps.RunRecord | None:
        run = await claim(workflows, owner, lease)
        if run is None:
            idle.set()
        return run

    storage.claim_run = watched  # type: ignore[method-assign]
    return idle


def watch_waiting(storage: ps.WorkflowStorage) -> anyio.Event:
    """Set once a ``result()`` on ``storage`` has subscribed to its run's end."""
    waiting = anyio.Event()
    ends = storage.end_wakeups

    @asynccontextmanager
    async def watched(workflow_id: str) -> AsyncIterator[Any]:
        async with ends(workflow_id) as wake:
            waiting.set()
            yield wake

    def opener(workflow_id: str) -> AbstractAsyncContextManager[Any]:
        return watched(workflow_id)

    storage.end_wakeups = opener  # type: ignore[method-assign]
    return waiting


async def age(storage: ps.WorkflowStorage, workflow_id: str, days: float) -> None:
    """Make the run look ``days`` older (its creation, last update and end)."""
    if isinstance(storage, ps.PgWorkflowStorage):
        async with storage._db.connection() as conn:
            await conn.execute(
                sql.SQL(
                    "UPDATE {} SET created_at = created_at - %(d)s * interval '1 day',"
                    " updated_at = updated_at - %(d)s * interval '1 day'"
                    " WHERE workflow_id = %(id)s"
                ).format(storage._names["runs"]),
                {"d": days, "id": workflow_id},
            )
        return
    assert isinstance(storage, ps.RedisWorkflowStorage)
    redis, ms = storage._redis, int(days * 86_400_000)
    key = f"{storage.key_prefix}run:{workflow_id}"
    for field in ("created_at", "updated_at"):
        await redis.hincrby(key, field, -ms)
    if await redis.zscore(f"{storage.key_prefix}ended", workflow_id) is not None:
        await redis.zincrby(f"{storage.key_prefix}ended", -ms, workflow_id)


async def run_to_end(engine: ps.WorkflowEngine, workflow_id: str, value: str) -> None:
    run = await engine.start(echo, value, workflow_id=workflow_id)
    async with engine.worker():
        with anyio.fail_after(10):
            assert await run.result() == value


# -- wake-ups (defect 4) ---------------------------------------------------------------


async def test_an_idle_worker_and_a_result_waiter_are_woken_not_polled(
    storage: ps.WorkflowStorage,
) -> None:
    gates["woken"] = anyio.Event()
    working = twin(storage)
    idle = watch_idle(working)
    waiting = watch_waiting(storage)
    worker = ps.WorkflowEngine(storage=working, workflows=[gated], poll_interval=SLOW_POLL)
    starter = ps.WorkflowEngine(storage=storage, poll_interval=SLOW_POLL)
    outcome: list[str] = []
    async with worker.worker():
        with anyio.fail_after(10):
            await idle.wait()  # the worker found nothing: a start must wake it
            run = await starter.start(gated, "woken", workflow_id="woken-1")

            async def wait_result() -> None:
                outcome.append(await run.result())

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_result)
                await waiting.wait()  # result() has looked and sleeps: the end must wake it
                gates["woken"].set()
    assert outcome == ["woken"]


async def test_a_run_handed_back_wakes_an_idle_worker(storage: ps.WorkflowStorage) -> None:
    gates["handed"] = anyio.Event()
    first = ps.WorkflowEngine(storage=storage, workflows=[gated], poll_interval=SLOW_POLL)
    other = twin(storage)
    idle = watch_idle(other)
    second = ps.WorkflowEngine(storage=other, workflows=[gated], poll_interval=SLOW_POLL)
    run = await first.start(gated, "handed", workflow_id="handed-1")
    stop_first = anyio.Event()

    async def first_worker() -> None:
        async with first.worker():
            await stop_first.wait()

    async def running() -> bool:
        return await run.status() == "running"

    async def resumed() -> bool:
        record = await storage.get_run("handed-1")
        return record is not None and record.executions == 2

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_worker)
        await eventually(running, "the first worker to run it")
        async with second.worker():
            with anyio.fail_after(10):
                await idle.wait()  # the second worker sleeps: only a wake-up brings it back
            stop_first.set()  # the first worker stops and hands the run back
            await eventually(resumed, "the second worker to claim it")
            gates["handed"].set()
            with anyio.fail_after(10):
                assert await run.result() == "handed"


async def test_a_stopping_worker_lets_its_run_finish_within_the_grace_period(
    storage: ps.WorkflowStorage,
) -> None:
    gates["grace"] = anyio.Event()
    engine = ps.WorkflowEngine(storage=storage, workflows=[gated, echo])
    run = await engine.start(gated, "grace", workflow_id="grace-1")

    async def running() -> bool:
        return await run.status() == "running"

    async def open_gate_later() -> None:
        await anyio.sleep(0.3)
        gates["grace"].set()

    async with anyio.create_task_group() as tg:
        async with engine.worker(concurrency=2, grace=10):
            await eventually(running, "the worker to run it")
            tg.start_soon(open_gate_later)  # the run finishes while the block is exiting
        # The block ended only once the run had finished; the idle slot claimed nothing.
        assert gates["grace"].is_set() and await run.status() == "completed"
    later = await engine.start(echo, "late", workflow_id="grace-2")
    assert await later.status() == "queued"


async def test_a_grace_period_that_runs_out_hands_the_run_back(
    storage: ps.WorkflowStorage,
) -> None:
    gates["short"] = anyio.Event()
    engine = ps.WorkflowEngine(storage=storage, workflows=[gated])
    run = await engine.start(gated, "short", workflow_id="short-1")

    async def running() -> bool:
        return await run.status() == "running"

    with anyio.fail_after(10):
        async with engine.worker(grace=0.2):
            await eventually(running, "the worker to run it")
    assert await run.status() == "queued"  # handed back when the grace period ran out
    gates["short"].set()
    async with engine.worker():
        with anyio.fail_after(10):
            assert await run.result() == "short"


# -- retention (defect 6) ----------------------------------------------------------------


async def test_prune_deletes_only_runs_that_ended_before_the_cutoff(
    storage: ps.WorkflowStorage,
) -> None:
    engine = ps.WorkflowEngine(storage=storage, workflows=[echo])
    await run_to_end(engine, "completed-old", "a")
    await run_to_end(engine, "completed-new", "b")
    await storage.create_run("failed-old", "echo", "c")
    assert await storage.claim_run(["echo"], "me", 30) is not None
    await storage.create_attempt("failed-old", "echo")
    await storage.mark_step(
        "failed-old", "echo", "failed", attempt=1, error={"type": "E", "message": "no"}
    )
    assert await storage.update_run("failed-old", "failed", owner="me", error={"type": "E"})
    await engine.start(echo, "d", workflow_id="cancelled-old")
    assert await engine.handle("cancelled-old").cancel()
    await storage.create_run("running-old", "echo", "e")
    assert await storage.claim_run(["echo"], "me", 30) is not None
    await storage.create_attempt("running-old", "echo")
    await storage.create_run("queued-old", "echo", "f")
    for workflow_id in ("completed-old", "failed-old", "cancelled-old"):
        await age(storage, workflow_id, 8)
    for workflow_id in ("running-old", "queued-old"):
        await age(storage, workflow_id, 30)  # however old, a run that has not ended stays

    assert await engine.prune(older_than=timedelta(days=7)) == 3
    for workflow_id in ("completed-old", "failed-old", "cancelled-old"):
        assert await storage.get_run(workflow_id) is None
        assert await storage.run_history(workflow_id) == []
        assert await storage.get_step(workflow_id, "echo") is None
    kept = {w: await storage.get_run(w) for w in ("completed-new", "running-old", "queued-old")}
    assert {w: r.status for w, r in kept.items() if r is not None} == {
        "completed-new": "completed",
        "running-old": "running",
        "queued-old": "queued",
    }
    assert [h.status for h in await storage.run_history("completed-new")] == ["succeeded"]
    assert [h.status for h in await storage.run_history("running-old")] == ["running"]
    assert await engine.prune(older_than=7 * 86_400) == 0  # seconds work too; nothing left
    again = await engine.start(echo, "again", workflow_id="completed-old")
    assert again.created  # a pruned id is free again
    with pytest.raises(ps.InvalidArgumentError):
        await engine.prune(older_than=-1)
    with pytest.raises(ps.InvalidArgumentError):
        await engine.prune(older_than="7 days")  # type: ignore[arg-type]


async def test_a_worker_with_retention_prunes_ended_runs(storage: ps.WorkflowStorage) -> None:
    engine = ps.WorkflowEngine(storage=storage, workflows=[echo])
    await run_to_end(engine, "old-1", "a")
    await age(storage, "old-1", 8)
    await run_to_end(engine, "new-1", "b")
    await storage.create_run("running-1", "elsewhere", None)  # a workflow it does not run
    assert await storage.claim_run(["elsewhere"], "someone", 30) is not None
    await age(storage, "running-1", 30)
    with pytest.raises(ps.InvalidArgumentError):
        async with engine.worker(retention=-1):
            pass
    async with engine.worker(retention=timedelta(days=7)):

        async def pruned() -> bool:
            return await storage.get_run("old-1") is None

        await eventually(pruned, "the ended run pruned")
    assert await storage.get_run("new-1") is not None
    running = await storage.get_run("running-1")
    assert running is not None and running.status == "running"


async def test_exclusive_pruning_gives_way_to_another_process(
    storage: ps.WorkflowStorage,
) -> None:
    engine = ps.WorkflowEngine(storage=storage, workflows=[echo])
    await run_to_end(engine, "ended-1", "a")
    await age(storage, "ended-1", 1)
    async with _held_prune_lock(storage):
        assert await storage.prune(3600, exclusive=True) == 0
        assert await storage.get_run("ended-1") is not None
    assert await storage.prune(3600, exclusive=True) == 1
    assert await storage.get_run("ended-1") is None


@asynccontextmanager
async def _held_prune_lock(storage: ps.WorkflowStorage) -> AsyncIterator[None]:
    """Hold the storage's prune lock, as another process pruning would."""
    if isinstance(storage, ps.PgWorkflowStorage):
        key = advisory_key("prune", storage.schema, storage.table_prefix)
        async with storage._db.connection() as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", [key])
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", [key])
        return
    assert isinstance(storage, ps.RedisWorkflowStorage)
    lock = f"{storage.key_prefix}prune-lock"
    await storage._redis.set(lock, "another-process", px=60_000)
    try:
        yield
    finally:
        await storage._redis.delete(lock)


# -- late registration (defect 7) ------------------------------------------------------


async def test_a_worker_starts_before_any_workflow_is_registered(
    storage: ps.WorkflowStorage,
) -> None:
    starter = ps.WorkflowEngine(storage=storage, poll_interval=SLOW_POLL)
    queued = await starter.start(echo, "early", workflow_id="early-1")
    engine = ps.WorkflowEngine(storage=twin(storage), poll_interval=SLOW_POLL)
    async with engine.worker(concurrency=2):  # it runs, with nothing to claim
        assert await queued.status() == "queued"
        engine.register(echo)  # wakes it: the queued run is claimed at once
        with anyio.fail_after(10):
            assert await queued.result() == "early"
        late = await engine.start(gated, "late", workflow_id="late-1")  # registers it too
        gates["late"] = anyio.Event()
        gates["late"].set()
        with anyio.fail_after(10):
            assert await late.result() == "late"
