"""Workflows: one storage suite run on PostgreSQL and Redis, the engine, trigger().

Redis tests need a server at $PGSTREAMS_TEST_REDIS_URL (default redis://127.0.0.1:6379/0)
and skip, saying so, when none answers.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pgstreams as ps

from .. import _workflow_worker as child
from .._killed_consumer import kill_when_ready
from ..pgserver import terminate_backends

REDIS_URL = os.environ.get("PGSTREAMS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def redis_client() -> Any:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        with anyio.fail_after(2):
            await client.ping()
    except Exception as exc:
        await client.aclose()
        pytest.skip(
            f"no Redis answers at {REDIS_URL} ({type(exc).__name__}); set PGSTREAMS_TEST_REDIS_URL"
        )
    return client


@pytest.fixture(params=["postgres", "redis"])
async def storage(
    request: pytest.FixtureRequest, db: ps.Database
) -> AsyncIterator[ps.WorkflowStorage]:
    tag = uuid.uuid4().hex[:8]
    calls.clear()  # step functions count their calls by workflow id
    flaky_calls.clear()
    if request.param == "postgres":
        pg = ps.PgWorkflowStorage(db, table_prefix=f"t{tag}_")
        yield pg
        await pg.close()
        return
    client = await redis_client()
    store = ps.RedisWorkflowStorage(client, key_prefix=f"pgstreams-test:{tag}:")
    try:
        yield store
    finally:
        await store.close()
        assert await client.ping()  # a client the caller owns stays open
        keys = [k async for k in client.scan_iter(match=f"pgstreams-test:{tag}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    with anyio.fail_after(10):
        while not await check():  # noqa: ASYNC110 - storage has no event to await
            await anyio.sleep(0.01)


# -- the storage suite ---------------------------------------------------------------------


async def test_create_run_is_atomic_and_idempotent(storage: ps.WorkflowStorage) -> None:
    run, created = await storage.create_run("w1", "onboard", {"user": 1})
    assert created and (run.status, run.input, run.workflow) == ("queued", {"user": 1}, "onboard")
    again, created = await storage.create_run("w1", "onboard", {"user": 2})
    assert not created and again.input == {"user": 1}
    races = await _gather([lambda: storage.create_run("w2", "onboard", 0)] * 10)
    assert sum(created for _, created in races) == 1
    assert await storage.get_run("missing") is None


async def test_claim_lease_and_orphans(storage: ps.WorkflowStorage) -> None:
    await storage.create_run("a", "wf", 1)
    await anyio.sleep(0.002)
    await storage.create_run("b", "wf", 2)
    await storage.create_run("c", "other", 3)
    first = await storage.claim_run(["wf"], "w1", 0.3)
    assert first is not None and (first.workflow_id, first.status, first.executions) == (
        "a",
        "running",
        1,
    )
    second = await storage.claim_run(["wf"], "w2", 30)
    assert second is not None and second.workflow_id == "b"
    assert await storage.claim_run(["wf"], "w2", 30) is None  # "c" is another workflow's
    assert await storage.renew_run("a", "w1", 0.3)
    assert not await storage.renew_run("a", "w2", 0.3)  # not theirs
    await anyio.sleep(0.4)  # w1 stops renewing: "a" is orphaned
    orphan = await storage.claim_run(["wf"], "w3", 30)
    assert orphan is not None and (orphan.workflow_id, orphan.executions, orphan.owner) == (
        "a",
        2,
        "w3",
    )
    assert not await storage.renew_run("a", "w1", 30)


async def test_update_run_is_owner_checked(storage: ps.WorkflowStorage) -> None:
    await storage.create_run("r", "wf", None)
    await storage.claim_run(["wf"], "me", 30)
    assert not await storage.update_run("r", "completed", owner="someone else", output=1)
    assert await storage.update_run("r", "queued", owner="me")  # handed back
    again = await storage.claim_run(["wf"], "you", 30)
    assert again is not None and again.workflow_id == "r"
    assert await storage.update_run("r", "completed", owner="you", output={"ok": True})
    assert not await storage.update_run(
        "r", "failed", owner="you", error={"type": "X", "message": ""}
    )
    done = await storage.get_run("r")
    assert done is not None and (done.status, done.output) == ("completed", {"ok": True})
    assert await storage.claim_run(["wf"], "me", 30) is None


async def test_cancel_queued_at_once_running_by_flag(storage: ps.WorkflowStorage) -> None:
    await storage.create_run("q", "wf", None)
    cancelled = await storage.request_cancel("q")
    assert cancelled is not None and cancelled.status == "cancelled"
    assert await storage.claim_run(["wf"], "me", 30) is None
    await storage.create_run("r", "wf", None)
    await storage.claim_run(["wf"], "me", 30)
    flagged = await storage.request_cancel("r")
    assert flagged is not None and (flagged.status, flagged.cancel_requested) == ("running", True)
    assert await storage.request_cancel("unknown") is None


async def test_steps_attempts_and_history(storage: ps.WorkflowStorage) -> None:
    await storage.create_run("r", "wf", None)
    scheduled = await storage.insert_step("r", "fetch")
    assert (scheduled.status, scheduled.attempts) == ("scheduled", 0)
    assert (await storage.insert_step("r", "fetch")).status == "scheduled"
    assert await storage.create_attempt("r", "fetch") == 1
    await storage.mark_step(
        "r", "fetch", "failed", attempt=1, error={"type": "E", "message": "boom"}
    )
    assert await storage.create_attempt("r", "fetch") == 2
    await storage.mark_step("r", "fetch", "succeeded", attempt=2, output={"n": 1})
    assert await storage.create_attempt("r", "save") == 1
    step = await storage.get_step("r", "fetch")
    assert step is not None and (step.status, step.attempts, step.output) == (
        "succeeded",
        2,
        {"n": 1},
    )
    assert await storage.get_step("r", "nope") is None
    history = await storage.run_history("r")
    assert [(h.step, h.attempt, h.status) for h in history] == [
        ("fetch", 1, "failed"),
        ("fetch", 2, "succeeded"),
        ("save", 1, "running"),
    ]
    assert history[0].error == {"type": "E", "message": "boom"} and history[1].output == {"n": 1}
    assert history[1].finished_at is not None and history[2].finished_at is None


async def test_run_lock_is_owner_checked(storage: ps.WorkflowStorage) -> None:
    assert await storage.lock_run("r", "a", 5)
    assert not await storage.lock_run("r", "b", 5)
    assert await storage.extend_lock("r", "a", 5)
    assert not await storage.extend_lock("r", "b", 5)
    await storage.unlock_run("r", "b")  # not theirs: nothing happens
    assert not await storage.lock_run("r", "b", 5)
    await storage.unlock_run("r", "a")
    assert await storage.lock_run("r", "b", 5)
    await storage.unlock_run("r", "b")


async def items(values: list[Any]) -> AsyncIterator[Any]:
    for value in values:
        yield value


async def _gather(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        results[i] = await calls[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    return results


# -- the engine --------------------------------------------------------------------------

calls: dict[str, int] = {}


def counted(name: str) -> Callable[..., Any]:
    def fn(*args: Any) -> Any:
        calls[name] = calls.get(name, 0) + 1
        return {"step": name, "args": list(args)}

    return fn


three = ps.Workflow[dict[str, Any], dict[str, Any]]("three-steps")


@three.run
async def _three(ctx: ps.WorkflowContext, input: dict[str, Any]) -> dict[str, Any]:
    a = await ctx.step("one", counted(f"{ctx.workflow_id}:one"), input["n"])
    if "gate" in input:
        await gates[input["gate"]].wait()
    b = await ctx.step("two", counted(f"{ctx.workflow_id}:two"), a["args"])
    c = await ctx.step("three", counted(f"{ctx.workflow_id}:three"))
    return {"a": a, "b": b["args"], "c": c["step"]}


gates: dict[str, anyio.Event] = {}


async def test_a_three_step_run_completes_and_records_each_step(
    storage: ps.WorkflowStorage,
) -> None:
    engine = ps.WorkflowEngine(storage=storage)
    run = await engine.start(three, {"n": 7}, workflow_id="run-1")
    assert run.created and await run.status() == "queued"
    async with engine.worker(concurrency=2):
        with anyio.fail_after(10):
            out = await run.result()
    assert out == {"a": {"step": "run-1:one", "args": [7]}, "b": [[7]], "c": "run-1:three"}
    assert await run.status() == "completed"
    history = await storage.run_history("run-1")
    assert [(h.step, h.attempt, h.status) for h in history] == [
        ("one", 1, "succeeded"),
        ("two", 1, "succeeded"),
        ("three", 1, "succeeded"),
    ]


async def test_a_stopped_worker_s_run_resumes_elsewhere_without_redoing_steps(
    storage: ps.WorkflowStorage,
) -> None:
    gates["stop"] = anyio.Event()
    engine = ps.WorkflowEngine(storage=storage, lease=0.5)
    run = await engine.start(three, {"n": 1, "gate": "stop"}, workflow_id="resume-1")
    async with engine.worker():

        async def step_one_done() -> bool:
            return calls.get("resume-1:one") == 1

        await eventually(step_one_done, "step one")
    # The worker stopped between steps one and two; another one resumes the run.
    gates["stop"].set()
    other = ps.WorkflowEngine(storage=storage, workflows=[three], lease=0.5)
    async with other.worker():
        with anyio.fail_after(10):
            await run.result()
    assert [calls[f"resume-1:{s}"] for s in ("one", "two", "three")] == [1, 1, 1]
    assert (await storage.get_run("resume-1")).executions == 2  # type: ignore[union-attr]


async def test_ten_concurrent_starts_of_one_id_make_one_run(storage: ps.WorkflowStorage) -> None:
    engine = ps.WorkflowEngine(storage=storage)
    await engine.start(three, {"n": 0}, workflow_id="warm")  # tables made, statements ready
    # Another start goes first, so that (on PostgreSQL) the ten share the next statement.
    starts: list[Callable[[], Awaitable[Any]]] = [
        lambda: engine.start(three, {"n": 0}, workflow_id="first")
    ]
    starts += [lambda: engine.start(three, {"n": 3}, workflow_id="once") for _ in range(10)]
    handles = (await _gather(starts))[1:]
    assert sum(h.created for h in handles) == 1
    async with engine.worker(concurrency=4):
        with anyio.fail_after(10):
            await handles[0].result()
    assert calls["once:one"] == 1


flaky_calls: dict[str, int] = {}


def flaky(key: str, failures: int) -> Any:
    flaky_calls[key] = flaky_calls.get(key, 0) + 1
    if flaky_calls[key] <= failures:
        raise ConnectionError(f"attempt {flaky_calls[key]} failed")
    return flaky_calls[key]


retrying = ps.Workflow[dict[str, Any], Any]("retrying")


@retrying.run
async def _retrying(ctx: ps.WorkflowContext, input: dict[str, Any]) -> Any:
    return await ctx.step(
        "flaky", flaky, ctx.workflow_id, input["failures"], retries=2, backoff=0.01
    )


async def test_retries_back_off_and_every_attempt_is_recorded(storage: ps.WorkflowStorage) -> None:
    engine = ps.WorkflowEngine(storage=storage)
    ok = await engine.start(retrying, {"failures": 2}, workflow_id="retry-ok")
    bad = await engine.start(retrying, {"failures": 5}, workflow_id="retry-bad")
    async with engine.worker(concurrency=2):
        with anyio.fail_after(10):
            assert await ok.result() == 3
            with pytest.raises(ps.WorkflowFailedError, match="failed after 3 attempt"):
                await bad.result()
    history = await storage.run_history("retry-ok")
    assert [(h.attempt, h.status) for h in history] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert history[0].error == {"type": "ConnectionError", "message": "attempt 1 failed"}
    assert [h.status for h in await storage.run_history("retry-bad")] == ["failed"] * 3
    assert flaky_calls["retry-bad"] == 3


retried = ps.Workflow[dict[str, Any], Any]("retried")


@retried.run
async def _retried(ctx: ps.WorkflowContext, input: dict[str, Any]) -> Any:
    await ctx.step("first", counted(f"{ctx.workflow_id}:first"))
    return await ctx.step(
        "flaky", flaky, ctx.workflow_id, input["failures"], retries=1, backoff=0.01
    )


async def test_a_retried_run_keeps_finished_steps_and_gets_a_fresh_budget(
    storage: ps.WorkflowStorage,
) -> None:
    engine = ps.WorkflowEngine(storage=storage, workflows=[retried])
    run = await engine.start(retried, {"failures": 3}, workflow_id="again-1")
    with pytest.raises(ps.InvalidArgumentError, match="is queued"):
        await run.retry()
    async with engine.worker():
        with anyio.fail_after(10), pytest.raises(ps.WorkflowFailedError):
            await run.result()
        assert flaky_calls["again-1"] == 2  # its budget: one try and one retry
        await run.retry()
        # Attempts 3 and 4: a budget counted from the first attempt would end at 3.
        with anyio.fail_after(10):
            assert await run.result() == 4
    assert calls["again-1:first"] == 1  # the finished step kept its result
    history = [(h.step, h.attempt, h.status) for h in await storage.run_history("again-1")]
    assert history == [
        ("first", 1, "succeeded"),
        *[("flaky", n, "failed") for n in (1, 2, 3)],
        ("flaky", 4, "succeeded"),
    ]
    record = await storage.get_run("again-1")
    assert record is not None and record.error is None and record.output == 4
    with pytest.raises(ps.InvalidArgumentError, match="is completed"):
        await engine.retry("again-1")
    with pytest.raises(ps.InvalidArgumentError, match="no workflow run"):
        await engine.retry("again-nope")
    cancelled = await engine.start(retried, {"failures": 0}, workflow_id="again-2")
    assert await cancelled.cancel()
    await engine.retry("again-2")
    async with engine.worker():
        with anyio.fail_after(10):
            assert await cancelled.result() == 1


blocked = ps.Workflow[None, None]("blocked")


@blocked.run
async def _blocked(ctx: ps.WorkflowContext, input: None) -> None:
    await ctx.step("forever", anyio.sleep_forever)


async def test_cancel_a_queued_and_a_running_run(storage: ps.WorkflowStorage) -> None:
    engine = ps.WorkflowEngine(storage=storage, workflows=[blocked], lease=0.3)
    queued = await engine.start(blocked, workflow_id="cancel-queued")
    assert await queued.cancel()
    with pytest.raises(ps.WorkflowCancelledError):
        await queued.result()
    running = await engine.start(blocked, workflow_id="cancel-running")
    async with engine.worker():

        async def started() -> bool:
            return await running.status() == "running"

        await eventually(started, "the run to start")
        assert await running.cancel()
        with anyio.fail_after(10), pytest.raises(ps.WorkflowCancelledError):
            await running.result()
    done = ps.WorkflowEngine(storage=storage, workflows=[three])
    finished = await done.start(three, {"n": 0}, workflow_id="cancel-done")
    async with done.worker():
        await finished.result()
    assert not await finished.cancel()


twice = ps.Workflow[None, None]("twice")


@twice.run
async def _twice(ctx: ps.WorkflowContext, input: None) -> None:
    await ctx.step("same", counted("twice"))
    await ctx.step("same", counted("twice"))


async def test_bad_input_is_refused_with_a_clear_error(storage: ps.WorkflowStorage) -> None:
    engine = ps.WorkflowEngine(storage=storage)
    with pytest.raises(ps.InvalidArgumentError, match="unknown workflow"):
        await engine.start("no-such-workflow", {})
    with pytest.raises(ps.InvalidArgumentError, match="no @run"):
        await engine.start(ps.Workflow("empty"), {})
    with pytest.raises(ps.PayloadError, match="JSON"):
        await engine.start(three, {"n": object()}, workflow_id="not-json")
    assert await storage.get_run("not-json") is None
    with pytest.raises(ps.InvalidArgumentError, match="workflow_id"):
        await engine.start(three, {"n": 1}, workflow_id="")
    run = await engine.start(twice, None, workflow_id="dup-steps")
    async with engine.worker():
        with anyio.fail_after(10), pytest.raises(ps.WorkflowFailedError, match="used twice"):
            await run.result()
    with pytest.raises(ps.InvalidArgumentError):
        ps.WorkflowEngine()


# -- trigger(): streams into workflows ---------------------------------------------------

greet = ps.Workflow[dict[str, Any], str]("greet")


@greet.run
async def _greet(ctx: ps.WorkflowContext, input: dict[str, Any]) -> str:
    return await ctx.step("greet", lambda: f"hello {input['name']}")


async def test_trigger_starts_runs_idempotently(db: ps.Database) -> None:
    engine = ps.WorkflowEngine(db)
    names: list[dict[str, Any]] = [
        {"id": 1, "name": "ada"},
        {"id": 2, "name": "bob"},
        {"id": 1, "name": "ada"},
    ]

    def user_id(user: dict[str, Any]) -> str:
        return f"greet-{user['id']}"

    op = ps.trigger(workflow=greet, engine=engine, to_workflow_id=user_id, wait=True)
    async with engine.worker(concurrency=2):
        results = await ps.Stream(items(names)).through(op).collect()
    assert [(r.workflow_id, r.started, r.duplicate, r.result) for r in results] == [
        ("greet-1", True, False, "hello ada"),
        ("greet-2", True, False, "hello bob"),
        ("greet-1", False, True, "hello ada"),
    ]
    strict = ps.trigger(workflow=greet, engine=engine, to_workflow_id=user_id, on_duplicate="fail")
    with pytest.raises(ps.DuplicateWorkflowError):
        await ps.Stream(items(names[:1])).through(strict).drain()
    with pytest.raises(ps.InvalidArgumentError):
        ps.trigger(workflow=greet, engine=engine, on_duplicate="sometimes")  # type: ignore[arg-type]


def new_row(change: ps.Change[dict[str, Any]]) -> dict[str, Any] | None:
    return change.new


async def test_a_table_change_runs_a_workflow(db: ps.Database) -> None:
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE signups (id int PRIMARY KEY, name text)")
    signups: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(db, "signups")
    await signups.install_trigger()
    engine = ps.WorkflowEngine(db)

    def signup_id(change: ps.Change[dict[str, Any]]) -> str:
        assert change.new is not None
        return f"signup-{change.new['id']}"

    op = ps.trigger(
        workflow=greet, engine=engine, to_input=new_row, to_workflow_id=signup_id, wait=True
    )
    async with engine.worker(), anyio.create_task_group() as tg:
        results: list[ps.TriggerResult[Any]] = []

        async def follow() -> None:
            async for result in signups.subscribe().through(op).take(1):
                results.append(result)

        tg.start_soon(follow)
        await anyio.sleep(0.2)  # the subscription starts "from now"
        async with db.connection() as conn:
            await conn.execute("INSERT INTO signups VALUES (42, 'ada')")
    assert [(r.workflow_id, r.result) for r in results] == [("signup-42", "hello ada")]


async def test_a_scheduler_tick_runs_a_workflow(db: ps.Database) -> None:
    sched = ps.Scheduler(db, clock=ps.ManualClock())
    await sched.register("nightly", interval=3600, metadata={"name": "nightly"})
    engine = ps.WorkflowEngine(db)

    def tick_id(tick: ps.ScheduleTick) -> str:
        return f"tick-{tick.schedule_id}-{tick.scheduled_at:%Y%m%d%H%M}"

    def tick_input(tick: ps.ScheduleTick) -> dict[str, Any]:
        return tick.metadata

    op = ps.trigger(
        workflow=greet, engine=engine, to_input=tick_input, to_workflow_id=tick_id, wait=True
    )
    async with sched.running(), engine.worker():
        await sched.trigger_now("nightly")
        with anyio.fail_after(10):
            result = await sched.stream("nightly").through(op).first()
    assert (result.workflow_id, result.result) == ("tick-nightly-202601010000", "hello nightly")


# -- a worker process killed mid-run -----------------------------------------------------


async def test_a_killed_worker_s_run_resumes_and_step_one_ran_once(
    db: ps.Database, dsn: str
) -> None:
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS effects (run text, step text)")
    storage = ps.PgWorkflowStorage(db, table_prefix="killed_")
    engine = ps.WorkflowEngine(storage=storage)
    run = await engine.start(child.effects, {"dsn": dsn}, workflow_id="killed-1")
    await kill_when_ready(Path(child.__file__), dsn)  # dies inside step two
    resumed = ps.WorkflowEngine(storage=storage, workflows=[child.effects], lease=1.0)
    async with resumed.worker():
        with anyio.fail_after(20):
            assert await run.result() == 3
    async with db.connection() as conn:
        cur = await conn.execute("SELECT step, count(*) FROM effects GROUP BY step ORDER BY step")
        assert await cur.fetchall() == [("one", 1), ("three", 1), ("two", 2)]
    assert [(h.step, h.attempt, h.status) for h in await storage.run_history("killed-1")] == [
        ("one", 1, "succeeded"),
        ("two", 1, "running"),
        ("two", 2, "succeeded"),
        ("three", 1, "succeeded"),
    ]


# -- found in review -----------------------------------------------------------------------


async def test_step_keys_of_different_runs_never_collide(storage: ps.WorkflowStorage) -> None:
    await storage.create_attempt("order:7", "charge")
    await storage.mark_step("order:7", "charge", "succeeded", attempt=1, output="order:7")
    assert await storage.get_step("order", "7:charge") is None


slow_calls: list[str] = []
slow = ps.Workflow[None, str]("slow-sync-step")


def blocking_step() -> str:
    import time

    slow_calls.append("called")
    time.sleep(1.5)  # a blocking call, three leases long
    return "done"


@slow.run
async def _slow(ctx: ps.WorkflowContext, input: None) -> str:
    return await ctx.step("slow", blocking_step)


async def test_a_blocking_step_keeps_its_lease_and_runs_once(storage: ps.WorkflowStorage) -> None:
    slow_calls.clear()
    one = ps.WorkflowEngine(storage=storage, workflows=[slow], lease=0.5)
    two = ps.WorkflowEngine(storage=storage, workflows=[slow], lease=0.5)
    run = await one.start(slow, workflow_id="slow-1")
    ticks = 0
    async with one.worker():

        async def started() -> bool:
            return bool(slow_calls)

        await eventually(started, "the step to start")
        async with two.worker():
            with anyio.fail_after(10):
                while await run.status() != "completed":
                    ticks += 1  # the event loop runs on while the step blocks its thread
                    await anyio.sleep(0.01)
    assert ticks >= 20, "the blocking step stalled the event loop (and the lease renewal)"
    assert slow_calls == ["called"]
    assert await run.result() == "done"


async def test_runs_executing_side_by_side_share_one_connection(dsn: str) -> None:
    async with ps.connect(dsn, min_size=1, max_size=1) as tiny:
        engine = ps.WorkflowEngine(tiny, workflows=[three])
        with pytest.raises(ps.InvalidArgumentError, match="pool of at least 2"):
            async with engine.worker():
                pass
    async with ps.connect(dsn, max_size=2) as small:
        engine = ps.WorkflowEngine(small, workflows=[three])
        gates["pool"] = anyio.Event()
        runs = [
            await engine.start(three, {"n": i, "gate": "pool"}, workflow_id=f"pool-{i}")
            for i in range(6)
        ]
        async with engine.worker(concurrency=6):
            # Six runs wait at the gate at once, past their first step, on a pool of two.
            await eventually(lambda: _count_steps(small, "succeeded", 6), "six first steps done")
            assert [await run.status() for run in runs] == ["running"] * 6
            gates["pool"].set()
            with anyio.fail_after(10):
                for i, run in enumerate(runs):
                    assert (await run.result())["a"]["args"] == [i]


async def _count_steps(db: ps.Database, status: str, n: int) -> bool:
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgstreams.wf_steps"
            " WHERE status = %s AND workflow_id LIKE 'pool-%%'",
            [status],
        )
        row = await cur.fetchone()
        return row is not None and row[0] == n


async def test_a_database_on_one_connection_runs_workflows(dsn: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn, ps.connect(conn) as single:
        engine = ps.WorkflowEngine(single, workflows=[three])
        run = await engine.start(three, {"n": 5}, workflow_id="single-1")
        async with engine.worker():
            with anyio.fail_after(10):
                assert (await run.result())["c"] == "single-1:three"


async def test_workflows_started_after_the_worker_are_run(storage: ps.WorkflowStorage) -> None:
    engine = ps.WorkflowEngine(storage=storage, workflows=[three])
    first = await engine.start(three, {"n": 1}, workflow_id="early-1")
    async with engine.worker():
        with anyio.fail_after(10):
            await first.result()  # the worker is up and has claimed before
        late = await engine.start(greet, {"name": "late"}, workflow_id="late-1")
        with anyio.fail_after(10):
            assert await late.result() == "hello late"


class FlakyStorage(ps.PgWorkflowStorage):
    """Fails the first attempt it is asked to start, as a dropped connection would."""

    failed = False

    async def create_attempt(self, workflow_id: str, name: str) -> int:
        if not self.failed:
            self.failed = True
            raise ps.DatabaseError("server closed the connection unexpectedly", transient=True)
        return await super().create_attempt(workflow_id, name)


async def test_a_storage_outage_inside_a_step_leaves_the_run_to_resume(db: ps.Database) -> None:
    storage = FlakyStorage(db, table_prefix="flaky_")
    engine = ps.WorkflowEngine(storage=storage, workflows=[three], lease=0.5)
    run = await engine.start(three, {"n": 1}, workflow_id="flaky-1")
    async with engine.worker():
        with anyio.fail_after(10):
            assert (await run.result())["c"] == "flaky-1:three"
    assert (await storage.get_run("flaky-1")).executions == 2  # type: ignore[union-attr]


async def test_an_unreachable_redis_is_a_transient_error_a_worker_rides_out() -> None:
    storage = ps.RedisWorkflowStorage("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(ps.DatabaseError) as caught:
            await storage.claim_run(["wf"], "me", 1)
        assert caught.value.transient
        engine = ps.WorkflowEngine(storage=storage, workflows=[three])
        async with engine.worker():
            await anyio.sleep(0.3)  # claims keep failing; the worker keeps going
    finally:
        await storage.close()


failing = ps.Workflow[None, None]("always-fails")


@failing.run
async def _failing(ctx: ps.WorkflowContext, input: None) -> None:
    raise RuntimeError("no")


async def test_trigger_wait_reports_a_failed_run_and_goes_on(db: ps.Database) -> None:
    engine = ps.WorkflowEngine(db)
    op: Callable[[ps.Stream[None]], AsyncIterator[ps.TriggerResult[None]]]
    op = ps.trigger(workflow=failing, engine=engine, wait=True)
    nothing: ps.Stream[None] = ps.Stream(items([None, None]))
    async with engine.worker():
        results = await nothing.through(op).collect()
    assert [type(r.error) for r in results] == [ps.WorkflowFailedError] * 2


paced = ps.Workflow[None, int]("paced")


@paced.run
async def _paced(ctx: ps.WorkflowContext, input: None) -> int:
    for i in range(3):
        await ctx.step(f"nap-{i}", anyio.sleep, 0.3)
    return 3


async def test_cancelled_callers_elsewhere_do_not_break_an_executing_run(db: ps.Database) -> None:
    engine = ps.WorkflowEngine(db, workflows=[paced], lease=0.6)  # renewed every 0.2 s
    run = await engine.start(paced, workflow_id="paced-1")
    async with engine.worker():
        with anyio.fail_after(10):
            while await run.status() != "completed":
                for delay in (0, 0.0005, 0.001, 0.002):
                    with anyio.move_on_after(delay):  # cancels its statements mid-flight
                        await run.result()
    run_record = await engine.storage.get_run("paced-1")
    assert run_record is not None and run_record.executions == 1


class Unlucky(ps.PgWorkflowStorage):
    """Its first lock and first unlock fail."""

    lock_failed = unlock_failed = False

    async def lock_run(self, workflow_id: str, owner: str, ttl: float) -> bool:
        if not self.lock_failed:
            self.lock_failed = True
            raise ps.DatabaseError("too many connections for role")
        return await super().lock_run(workflow_id, owner, ttl)

    async def unlock_run(self, workflow_id: str, owner: str) -> None:
        await super().unlock_run(workflow_id, owner)
        if not self.unlock_failed:
            self.unlock_failed = True
            raise ps.DatabaseError("Redis: Connection reset by peer", transient=True)


async def test_lock_and_unlock_failures_do_not_stop_a_worker(db: ps.Database) -> None:
    storage = Unlucky(db, table_prefix="unlucky_")
    engine = ps.WorkflowEngine(storage=storage, workflows=[three], lease=0.5)
    runs = [await engine.start(three, {"n": i}, workflow_id=f"unlucky-{i}") for i in range(2)]
    async with engine.worker():
        with anyio.fail_after(10):
            for run in runs:
                await run.result()
    assert storage.lock_failed and storage.unlock_failed


async def test_redis_failover_states_are_transient() -> None:
    from redis.exceptions import ReadOnlyError

    from pgstreams._workflows.redis import _translated

    @_translated
    async def on_a_replica() -> None:
        raise ReadOnlyError("You can't write against a read only replica.")

    with pytest.raises(ps.DatabaseError) as caught:
        await on_a_replica()
    assert caught.value.transient


async def test_pg_storage_in_its_own_schema_with_a_prefix(db: ps.Database) -> None:
    storage = ps.PgWorkflowStorage(db, schema="wf_custom", table_prefix="app_")
    engine = ps.WorkflowEngine(storage=storage, workflows=[three])
    run = await engine.start(three, {"n": 2}, workflow_id="custom-1")
    async with engine.worker():
        with anyio.fail_after(10):
            await run.result()
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'wf_custom'"
            " ORDER BY table_name"
        )
        assert [r[0] for r in await cur.fetchall()] == [
            "app_attempts",
            "app_runs",
            "app_steps",
            "instance_version",
        ]
    with pytest.raises(ps.InvalidArgumentError):
        ps.PgWorkflowStorage(db, schema="Bad Schema")


async def test_a_worker_rides_out_its_connections_being_killed(db: ps.Database, dsn: str) -> None:
    engine = ps.WorkflowEngine(db, workflows=[three])
    first = await engine.start(three, {"n": 1}, workflow_id="killed-conns-1")
    async with engine.worker():
        with anyio.fail_after(10):
            await first.result()
        terminate_backends(dsn)  # every connection of the pool, the idle worker's included
        for _ in range(5):  # our own call may meet a dead pooled connection too
            try:
                second = await engine.start(three, {"n": 2}, workflow_id="killed-conns-2")
                break
            except ps.DatabaseError as exc:
                if not exc.transient:
                    raise
        with anyio.fail_after(20):
            await second.result()


async def test_a_fresh_claim_of_a_run_this_process_still_executes_lets_its_lock_go(
    db: ps.Database, dsn: str
) -> None:
    storage = ps.PgWorkflowStorage(db, table_prefix="relock_")
    await storage.create_run("r", "wf", None)
    assert await storage.claim_run(["wf"], "me", 0.2) is not None
    assert await storage.lock_run("r", "me", 0.2)
    # The run's connection dies (and its lock with it); its lease runs out meanwhile.
    terminate_backends(dsn, pid=storage._session.backend_pid)
    await anyio.sleep(0.3)
    again = await storage.claim_run(["wf"], "me", 30)  # takes the lock on a new connection
    assert again is not None and again.workflow_id == "r"
    assert not await storage.lock_run("r", "me", 30)  # still executing here: not twice
    await storage.unlock_run("r", "me")
    async with db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert await cur.fetchone() == (0,)
    await storage.close()  # its session's connection goes back
    assert db.connections_in_use == 0


async def test_a_run_whose_lock_went_with_its_connection_writes_nothing_more(
    db: ps.Database, dsn: str
) -> None:
    storage = ps.PgWorkflowStorage(db, table_prefix="fenced_")
    engine = ps.WorkflowEngine(storage=storage, workflows=[three], lease=2.0)
    gates["fenced"] = anyio.Event()
    run = await engine.start(three, {"n": 1, "gate": "fenced"}, workflow_id="fenced-1")
    async with engine.worker():
        await eventually(lambda: _has_step(storage, "fenced-1", "one"), "the first step stored")
        pid = storage._session.backend_pid
        assert pid is not None
        terminate_backends(dsn, pid=pid)  # the run's lock goes with it
        # Another call meets the dead connection first, and opens a new one.
        assert await storage.claim_run(["no-such-workflow"], "probe", 1) is None
        assert storage._session.backend_pid not in (None, pid)
        gates["fenced"].set()  # at once: the run goes on before its lease renewal notices
        with anyio.fail_after(20):
            out = await run.result()
    assert out["b"] == [[1]]
    record = await storage.get_run("fenced-1")
    assert record is not None and record.executions == 2  # it stopped, and resumed
    history = await storage.run_history("fenced-1")
    assert [(h.step, h.attempt, h.status) for h in history] == [
        ("one", 1, "succeeded"),
        ("two", 1, "succeeded"),  # the first execution never recorded an attempt at two
        ("three", 1, "succeeded"),
    ]
    assert calls["fenced-1:one"] == 1 and calls["fenced-1:two"] == 1
    await storage.close()


async def _has_step(storage: ps.PgWorkflowStorage, workflow_id: str, name: str) -> bool:
    step = await storage.get_step(workflow_id, name)
    return step is not None and step.status == "succeeded"


async def test_claims_made_together_share_out_distinct_runs(db: ps.Database) -> None:
    storage = ps.PgWorkflowStorage(db, table_prefix="together_")
    for i in range(12):
        await storage.create_run(f"t-{i}", "wf", i)
    claimed: list[str | None] = []

    async def claim() -> None:
        run = await storage.claim_run(["wf"], "me", 30)
        claimed.append(None if run is None else run.workflow_id)

    async with anyio.create_task_group() as tg:
        for _ in range(16):
            tg.start_soon(claim)
    ids = [c for c in claimed if c is not None]
    assert sorted(ids) == sorted(f"t-{i}" for i in range(12)) and claimed.count(None) == 4
    for workflow_id in ids:
        assert await storage.lock_run(workflow_id, "me", 30)
    async with db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert await cur.fetchone() == (12,)
    await storage.close()
    async with db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert await cur.fetchone() == (0,)


async def test_an_unlock_that_lost_its_race_with_a_reconnect_leaves_other_locks_alone(
    db: ps.Database, dsn: str
) -> None:
    from pgstreams._workflows.pg import _executing

    storage = ps.PgWorkflowStorage(db, table_prefix="relocked_")
    for i in range(4):
        await storage.create_run(f"r{i}", "wf", i)
    assert await storage.claim_run(["wf"], "A", 30) is not None
    assert await storage.lock_run("r0", "A", 30)
    old = storage._session.backend_pid
    assert old is not None
    terminate_backends(dsn, pid=old)  # r0's lock goes with it
    opener = storage._session._open_conn

    async def slow_open(stack: Any) -> Any:
        await anyio.sleep(0.2)  # the reconnect takes a while, as under load
        return await opener(stack)

    storage._session._open_conn = slow_open
    claimed: dict[str, str | None] = {}

    async def claim(owner: str) -> None:
        run = await storage.claim_run(["wf"], owner, 30)
        claimed[owner] = None if run is None else run.workflow_id

    async def end_r0() -> None:
        _executing.set("r0")
        await storage.unlock_run("r0", "A")  # its run ended after its lock was lost

    async with anyio.create_task_group() as tg:
        tg.start_soon(claim, "L")  # meets the dead connection and opens a new one
        await anyio.lowlevel.checkpoint()  # L is sending; the dead connection is not noticed yet
        tg.start_soon(claim, "B")
        tg.start_soon(end_r0)  # its unlock is queued for the connection that died
        tg.start_soon(claim, "C")
    assert sorted(v for v in claimed.values() if v) == ["r1", "r2", "r3"]
    session = storage._session.backend_pid
    async with db.connection() as conn:
        cur = await conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory'")
        holders = [r[0] for r in await cur.fetchall()]
    assert holders == [session] * 3  # the three claims' locks, all on the session
    for owner, workflow_id in claimed.items():
        assert workflow_id is not None and await storage.lock_run(workflow_id, owner, 30)
    await storage.close()


async def test_one_bad_item_fails_alone_in_a_shared_statement(db: ps.Database) -> None:
    storage = ps.PgWorkflowStorage(db, table_prefix="alone_")
    await storage.create_run("warm", "wf", None)
    results: dict[str, Any] = {}
    shared: list[int] = []  # how many calls each statement carried
    run_statement = storage._starts._run

    async def counting(conn: Any, kind: str, group: Any, calls: list[Any], **kw: Any) -> None:
        shared.append(len(calls))
        await run_statement(conn, kind, group, calls, **kw)

    storage._starts._run = counting  # type: ignore[method-assign]

    async def create(workflow_id: str) -> None:
        try:
            results[workflow_id] = (await storage.create_run(workflow_id, "wf", 1))[1]
        except ps.DatabaseError as exc:
            results[workflow_id] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(create, "first")  # goes alone; the next three share a statement
        tg.start_soon(create, "good-1")
        tg.start_soon(create, "bad\x00id")  # jsonb refuses it
        tg.start_soon(create, "good-2")
    assert results["first"] is True and results["good-1"] is True and results["good-2"] is True
    assert isinstance(results["bad\x00id"], ps.DatabaseError)
    assert shared[:2] == [1, 3]  # "first" alone, then the three in one statement
    warm = await storage.get_run("warm")
    assert warm is not None and warm.input is None
    async with db.connection() as conn:  # None is stored as JSON null, not SQL NULL
        cur = await conn.execute(
            "SELECT input IS NULL FROM pgstreams.alone_runs WHERE workflow_id = 'warm'"
        )
        assert await cur.fetchone() == (False,)
    await storage.close()


def _undecodable(*args: Any) -> None:
    raise OSError(os.fsdecode(b"no such file: \xff"))  # a lone surrogate in the message


undecodable = ps.Workflow[None, None]("undecodable")


@undecodable.run
async def _undecodable_run(ctx: ps.WorkflowContext, input: None) -> None:
    await ctx.step("open", _undecodable)


async def test_an_error_message_that_is_not_valid_unicode_is_stored(
    storage: ps.WorkflowStorage,
) -> None:
    engine = ps.WorkflowEngine(storage=storage, workflows=[undecodable])
    run = await engine.start(undecodable, None, workflow_id="undecodable-1")
    async with engine.worker():
        with anyio.fail_after(10), pytest.raises(ps.WorkflowFailedError) as failed:
            await run.result()
    assert "\\udcff" in failed.value.error["message"]
    history = await storage.run_history("undecodable-1")
    assert [(h.step, h.status) for h in history] == [("open", "failed")]


async def test_a_leader_interrupted_by_a_base_exception_strands_no_one() -> None:
    from contextlib import AsyncExitStack

    from pgstreams._workflows.run_session import RunSession

    class Interrupted(BaseException):
        pass

    async def opener(stack: AsyncExitStack) -> Any:
        await anyio.sleep(0.05)
        raise Interrupted

    session = RunSession(opener, {}, {})
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await session.call("GET", {})
        except Interrupted:
            outcomes.append("interrupted")
        except ps.DatabaseError:
            outcomes.append("error")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
    # The first call leads alone; the second leads the next batch, with the third in it,
    # which its interruption must not strand.
    assert sorted(outcomes) == ["error", "interrupted", "interrupted"]


async def _nap(span: float) -> None:
    naps["now"] = naps.get("now", 0) + 1
    naps["peak"] = max(naps.get("peak", 0), naps["now"])
    try:
        await anyio.sleep(span)
    finally:
        naps["now"] -= 1


naps: dict[str, int] = {}
napping = ps.Workflow[None, str]("napping")


@napping.run
async def _napping(ctx: ps.WorkflowContext, input: None) -> str:
    await ctx.step("nap", _nap, 3.0)
    return "rested"


@pytest.mark.parametrize(("lease", "stall"), [(1.5, 0.0), (0.6, 0.5)])
async def test_a_run_that_lost_its_lock_stops_mid_step_before_another_resumes_it(
    db: ps.Database, dsn: str, lease: float, stall: float
) -> None:
    naps.clear()
    prefix = f"napping{int(stall * 10)}_"
    first = ps.PgWorkflowStorage(db, table_prefix=prefix)
    second = ps.PgWorkflowStorage(db, table_prefix=prefix)  # another process, in effect
    a = ps.WorkflowEngine(storage=first, workflows=[napping], lease=lease)
    b = ps.WorkflowEngine(storage=second, workflows=[napping], lease=lease)
    run = await a.start(napping, None, workflow_id="nap-1")
    async with a.worker():
        await eventually(lambda: _naps_now(1), "the nap begun")
        pid = first._session.backend_pid
        assert pid is not None
        terminate_backends(dsn, pid=pid)  # the run's lock goes; its step has no call to fail
        # A stalled event loop (a loaded machine): the lease renewal that finds the lock
        # gone comes late, when the lease has nearly run out, and must stop the run then.
        time.sleep(stall)  # noqa: ASYNC251 - stalls the loop on purpose
        assert await first.claim_run(["nothing"], "probe", 1) is None  # reconnects
        async with b.worker():
            with anyio.fail_after(15):
                assert await run.result() == "rested"
    assert naps["peak"] == 1  # the first nap was stopped before the run resumed elsewhere
    history = await first.run_history("nap-1")
    assert [(h.attempt, h.status) for h in history] == [(1, "running"), (2, "succeeded")]
    await first.close()
    await second.close()


async def _naps_now(n: int) -> bool:
    return naps.get("now", 0) == n


async def test_a_claim_that_fails_halfway_leaves_no_lock_behind(db: ps.Database) -> None:
    storage = ps.PgWorkflowStorage(db, table_prefix="halfway_")
    await storage.create_run("a-good", "wf", 1)
    await storage.create_run("b-bad", "wf", 2)
    async with db.connection() as conn:  # its claim overflows executions: the UPDATE fails
        await conn.execute(
            "UPDATE pgstreams.halfway_runs SET executions = 2147483647 WHERE workflow_id = 'b-bad'"
        )
    outcomes: dict[str, Any] = {}

    async def claim(tag: str, workflows: list[str]) -> None:
        try:
            run = await storage.claim_run(workflows, "me", 30)
            outcomes[tag] = None if run is None else run.workflow_id
        except ps.DatabaseError as exc:
            outcomes[tag] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(claim, "first", ["other"])  # goes alone; the next two share a statement
        await anyio.lowlevel.checkpoint()
        tg.start_soon(claim, "one", ["wf"])
        tg.start_soon(claim, "two", ["wf"])
    assert isinstance(outcomes["one"], ps.DatabaseError)
    assert isinstance(outcomes["two"], ps.DatabaseError)
    async with db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert await cur.fetchone() == (0,)  # the failed statement took no lock
        await conn.execute(
            "UPDATE pgstreams.halfway_runs SET executions = 0 WHERE workflow_id = 'b-bad'"
        )
    claimed = {await storage.claim_run(["wf"], "me", 30) for _ in range(2)}
    assert {run.workflow_id for run in claimed if run is not None} == {"a-good", "b-bad"}
    await storage.close()
