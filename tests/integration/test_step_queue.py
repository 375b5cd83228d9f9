"""PgStepQueue: enqueue, fairness policies in claim order, complete/fail, requeue, metrics."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import pgstreams as ps


@pytest.fixture
async def queue(db: ps.Database) -> ps.PgStepQueue:
    await db.migrate()
    async with db.connection() as conn:
        await conn.execute("DELETE FROM pgstreams.step_tasks")
    return ps.PgStepQueue(db, worker_id="w1", namespace="test")


async def fill(q: ps.PgStepQueue, plan: list[tuple[str, int]]) -> None:
    for n, (queue, priority) in enumerate(plan):
        await q.enqueue(f"wf-{n}", f"{queue}-{n}", queue, {"n": n}, priority=priority)


async def test_fairness_policies_are_observable_in_claim_order(
    db: ps.Database, queue: ps.PgStepQueue
) -> None:
    plan = [("fast", 0)] * 4 + [("slow", 5)] * 2 + [("fast", 9)]
    await fill(queue, plan)
    strict = await queue.claim(["fast", "slow"], 10, fairness="strict-priority")
    assert [(t.queue, t.priority) for t in strict] == [
        ("fast", 9),
        ("slow", 5),
        ("slow", 5),
        ("fast", 0),
        ("fast", 0),
        ("fast", 0),
        ("fast", 0),
    ]
    assert await queue.requeue_stuck(claimed_by="w1") == 7
    robin = await queue.claim(["fast", "slow"], 5, fairness="round-robin")
    assert [t.queue for t in robin] == ["fast", "slow", "fast", "slow", "fast"]
    assert await queue.requeue_stuck(claimed_by="w1") == 5
    fresh = ps.PgStepQueue(db, worker_id="w1", namespace="test")  # no turns taken yet
    weighted = await fresh.claim({"fast": 2, "slow": 1}, 6, fairness="weighted")
    assert [t.queue for t in weighted] == ["fast", "fast", "slow", "fast", "fast", "slow"]


async def test_concurrent_claims_never_share_a_task(db: ps.Database, queue: ps.PgStepQueue) -> None:
    await fill(queue, [("q", 0)] * 60)
    got: list[int] = []

    async def worker(i: int) -> None:
        mine = ps.PgStepQueue(db, worker_id=f"w{i}", namespace="test")
        while tasks := await mine.claim(["q"], 3, fairness="round-robin"):
            got.extend(t.id for t in tasks)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(worker, i)
    assert len(got) == 60 and len(set(got)) == 60


async def test_complete_fail_requeue_and_metrics(db: ps.Database, queue: ps.PgStepQueue) -> None:
    a = await queue.enqueue("wf", "fetch", "io", {"url": "x"}, prev_results={"auth": "ok"})
    b = await queue.enqueue("wf", "parse", "cpu", None)
    c = await queue.enqueue("wf", "save", "io", None)
    claimed = await queue.claim(["io", "cpu"], 3)
    assert {t.id for t in claimed} == {a, b, c}
    first = next(t for t in claimed if t.id == a)
    assert (first.input, first.prev_results, first.workflow_id) == (
        {"url": "x"},
        {"auth": "ok"},
        "wf",
    )
    other = ps.PgStepQueue(db, worker_id="w2", namespace="test")
    assert not await other.complete(a, {"body": 1}, 5.0)  # not its task
    assert await queue.complete(a, {"body": 1}, 5.0)
    assert await queue.fail(b, {"type": "ValueError", "message": "bad"}, 1.5)
    assert not await queue.complete(a, {}, 1.0)  # already done
    assert await queue.requeue_stuck(stale_after=3600) == 0
    await anyio.sleep(0.05)
    assert await queue.requeue_stuck(stale_after=0.01) == 1  # c
    assert await queue.metrics() == {
        "io": {"pending": 1, "running": 0, "completed": 1, "failed": 0},
        "cpu": {"pending": 0, "running": 0, "completed": 0, "failed": 1},
    }
    elsewhere = ps.PgStepQueue(db, worker_id="w1", namespace="other")
    assert await elsewhere.metrics() == {} and await elsewhere.claim(["io"], 5) == []


@pytest.mark.parametrize(
    ("call", "kwargs"),
    [
        ("enqueue", {"workflow_id": "", "step_name": "s", "queue": "q", "input": None}),
        ("enqueue", {"workflow_id": "w", "step_name": "s", "queue": "q", "input": object()}),
        ("enqueue", {"workflow_id": "w", "step_name": "s", "queue": "", "input": None}),
        ("claim", {"queues": ["q"], "limit": 0}),
        ("claim", {"queues": ["q"], "fairness": "lottery"}),
        ("claim", {"queues": "q"}),
        ("claim", {"queues": {"q": 0}}),
        ("requeue_stuck", {}),
        ("requeue_stuck", {"stale_after": 1, "claimed_by": "w"}),
        ("requeue_stuck", {"claimed_by": 5}),
        (
            "enqueue",
            {"workflow_id": "w", "step_name": "s", "queue": "q", "input": 1, "priority": 2**31},
        ),
        ("enqueue", {"workflow_id": "w", "step_name": "s", "queue": "q\x00", "input": 1}),
        ("complete", {"task_id": 2**63, "result": None, "duration_ms": 1}),
    ],
)
async def test_bad_input_is_refused(
    queue: ps.PgStepQueue, call: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises((ps.InvalidArgumentError, ps.PayloadError)):
        await getattr(queue, call)(**kwargs)
    assert await queue.metrics() == {}


async def test_turns_carry_over_from_one_claim_to_the_next(queue: ps.PgStepQueue) -> None:
    await fill(queue, [("a", 0)] * 6 + [("b", 0)] * 6)
    robin = [(await queue.claim(["a", "b"], 1, fairness="round-robin"))[0].queue for _ in range(4)]
    assert robin == ["a", "b", "a", "b"]
    weighted = [
        (await queue.claim({"a": 2, "b": 1}, 1, fairness="weighted"))[0].queue for _ in range(6)
    ]
    assert weighted == ["a", "a", "b", "a", "a", "b"]


async def test_an_idle_queue_earns_no_credit(queue: ps.PgStepQueue) -> None:
    await fill(queue, [("b", 0)] * 20)
    for _ in range(20):  # "a" has nothing meanwhile
        assert (await queue.claim(["a", "b"], 1, fairness="round-robin"))[0].queue == "b"
    await fill(queue, [("a", 0)] * 4 + [("b", 0)] * 4)
    served = [(await queue.claim(["a", "b"], 1, fairness="round-robin"))[0].queue for _ in range(6)]
    assert served == ["a", "b", "a", "b", "a", "b"]
    newcomer = [(await queue.claim(["a", "b", "c"], 1, fairness="round-robin")) for _ in range(2)]
    assert [t[0].queue for t in newcomer] == ["a", "b"]  # "c" is empty: no credit either
