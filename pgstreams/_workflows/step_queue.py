"""PgStepQueue: workflow steps as tasks in named queues, claimed by workers with a
fairness policy. ``namespace`` isolates one set of queues from another in the same table.

* ``strict-priority``: highest ``priority`` first across the given queues, oldest first
  within a priority.
* ``round-robin``: one task from each queue in turn (in the order the queues are given),
  each queue's tasks by priority then age.
* ``weighted``: like round-robin, but a queue of weight ``w`` gets ``w`` turns for every
  one of a weight-1 queue (``claim({"a": 2, "b": 1}, ...)``).

Turns carry over from one claim to the next of the same PgStepQueue object (it counts
what each queue has been served), so ``claim(queues, 1)`` in a loop alternates too.
Candidates are locked per queue (up to ``limit`` each) while a claim runs, so a
concurrent claim may skip tasks this one will not take.

Claims lock candidates with ``FOR UPDATE SKIP LOCKED``, so concurrent workers never get
the same task.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from psycopg import sql

from .._core.errors import InvalidArgumentError
from .._core.validate import check_positive_int, check_seconds, to_json
from .._pg import queries
from .._pg.calls import fetchall
from .._pg.database import Database

__all__ = ["Fairness", "PgStepQueue", "StepTask"]

Fairness = Literal["strict-priority", "round-robin", "weighted"]
FAIRNESS: tuple[Fairness, ...] = ("strict-priority", "round-robin", "weighted")


@dataclass(frozen=True, slots=True)
class StepTask:
    id: int
    queue: str
    workflow_id: str
    step_name: str
    input: Any
    prev_results: dict[str, Any]
    priority: int
    status: str
    claimed_by: str | None
    claims: int
    created_at: datetime


class PgStepQueue:
    """Step tasks in named queues (see module docstring)."""

    def __init__(self, db: Database, *, worker_id: str, namespace: str = "default") -> None:
        _check_text("worker_id", worker_id)
        _check_text("namespace", namespace)
        self._db = db
        self.worker_id = worker_id
        self.namespace = namespace
        self._names = {"tasks": sql.Identifier(db.schema, "step_tasks")}
        self._turns: dict[str, float] = {}  # per queue: tasks claimed / weight
        self._sql = queries.render(queries.load(__package__, "step_queue.sql"), self._names)

    async def enqueue(
        self,
        workflow_id: str,
        step_name: str,
        queue: str,
        input: Any,
        *,
        prev_results: Mapping[str, Any] | None = None,
        priority: int = 0,
    ) -> int:
        """Add a task; returns its id."""
        for what, value in (("workflow_id", workflow_id), ("step_name", step_name)):
            _check_text(what, value)
        _check_queue(queue)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidArgumentError(f"priority must be an int, got {priority!r}")
        if not -(2**31) <= priority < 2**31:
            raise InvalidArgumentError(f"priority must fit in 32 bits, got {priority!r}")
        if prev_results is not None and not isinstance(prev_results, Mapping):
            raise InvalidArgumentError("prev_results must be a mapping")
        params = {
            "ns": self.namespace,
            "queue": queue,
            "workflow_id": workflow_id,
            "step": step_name,
            "input": to_json("input", input),
            "prev": to_json("prev_results", dict(prev_results or {})),
            "priority": priority,
        }
        await self._db.ensure_migrated()
        rows = await fetchall(self._db, self._sql["enqueue"], params)
        return int(rows[0][0])

    async def claim(
        self,
        queues: Sequence[str] | Mapping[str, float],
        limit: int = 1,
        *,
        fairness: Fairness = "strict-priority",
    ) -> builtins.list[StepTask]:
        """Claim up to ``limit`` pending tasks from ``queues``, in the fairness order."""
        if fairness not in FAIRNESS:
            raise InvalidArgumentError(f"fairness must be one of {FAIRNESS}, got {fairness!r}")
        check_positive_int("limit", limit)
        if isinstance(queues, str):
            raise InvalidArgumentError("queues must be a list of queue names, not one str")
        weights = dict(queues) if isinstance(queues, Mapping) else {q: 1.0 for q in queues}
        if not weights:
            raise InvalidArgumentError("claim needs at least one queue")
        for name, weight in weights.items():
            _check_queue(name)
            if check_seconds(f"the weight of queue {name!r}", weight) <= 0:
                raise InvalidArgumentError(f"the weight of queue {name!r} must be positive")
        # Each queue's turns so far (tasks claimed / weight), relative to the least served;
        # a queue met for the first time starts level with the least served.
        known = [self._turns[q] for q in weights if q in self._turns]
        for q in weights:
            self._turns.setdefault(q, min(known, default=0.0))
        base = min(self._turns[q] for q in weights)
        params = {
            "ns": self.namespace,
            "queues": list(weights),
            "weights": [float(w) for w in weights.values()],
            "turns": [self._turns[q] - base for q in weights],
            "limit": limit,
            "worker": self.worker_id,
        }
        await self._db.ensure_migrated()
        by_turns = fairness != "strict-priority"
        claim = self._sql["claim_by_turns" if by_turns else "claim_by_priority"]
        rows = await fetchall(self._db, claim, params)
        tasks = [StepTask(*r[2:]) for r in sorted(rows, key=lambda r: r[0])]
        if by_turns:
            self._take_turns(weights, base, tasks, rows[0][1] if rows else [])
        return tasks

    def _take_turns(
        self,
        weights: Mapping[str, float],
        base: float,
        tasks: builtins.list[StepTask],
        nonempty: builtins.list[int],
    ) -> None:
        """Count the turns these tasks took. A queue that had nothing to give is kept level
        with the least served queue that had: idle time earns no credit."""
        queues = builtins.list(weights)
        for q in queues:
            self._turns[q] -= base
        for task in tasks:
            self._turns[task.queue] += 1 / weights[task.queue]
        busy = [queues[pos - 1] for pos in nonempty]
        if busy:
            level = min(self._turns[q] for q in busy)
            for q in queues:
                if q not in busy:
                    self._turns[q] = max(self._turns[q], level)

    async def complete(self, task_id: int, result: Any, duration_ms: float) -> bool:
        """Mark a task this worker holds completed; False if it no longer holds it."""
        return await self._finish(task_id, "completed", result, None, duration_ms)

    async def fail(self, task_id: int, error: Any, duration_ms: float) -> bool:
        """Mark a task this worker holds failed; False if it no longer holds it."""
        return await self._finish(task_id, "failed", None, error, duration_ms)

    async def _finish(
        self, task_id: int, status: str, result: Any, error: Any, duration_ms: float
    ) -> bool:
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 < task_id < 2**63:
            raise InvalidArgumentError(f"task_id must be a task's id, got {task_id!r}")
        params = {
            "id": task_id,
            "ns": self.namespace,
            "worker": self.worker_id,
            "status": status,
            "result": None if result is None else to_json("result", result),
            "error": None if error is None else to_json("error", error),
            "duration": check_seconds("duration_ms", duration_ms),
        }
        await self._db.ensure_migrated()
        return bool(await fetchall(self._db, self._sql["finish"], params))

    async def requeue_stuck(
        self, *, stale_after: float | None = None, claimed_by: str | None = None
    ) -> int:
        """Put running tasks back: those claimed more than ``stale_after`` seconds ago, or
        those of worker ``claimed_by`` (give exactly one). Returns how many."""
        if (stale_after is None) == (claimed_by is None):
            raise InvalidArgumentError("give exactly one of stale_after= or claimed_by=")
        if claimed_by is not None:
            _check_text("claimed_by", claimed_by)
        stale = None if stale_after is None else check_seconds("stale_after", stale_after)
        params = {"ns": self.namespace, "stale": stale, "by": claimed_by}
        await self._db.ensure_migrated()
        return len(await fetchall(self._db, self._sql["requeue"], params))

    async def metrics(self) -> dict[str, dict[str, int]]:
        """Per queue of this namespace: pending, running, completed, failed counts."""
        await self._db.ensure_migrated()
        rows = await fetchall(self._db, self._sql["metrics"], {"ns": self.namespace})
        found: dict[str, dict[str, int]] = {}
        for queue, status, count in rows:
            counts = found.setdefault(
                queue, {"pending": 0, "running": 0, "completed": 0, "failed": 0}
            )
            counts[status] = int(count)
        return found

    def __repr__(self) -> str:
        return f"PgStepQueue(namespace={self.namespace!r}, worker_id={self.worker_id!r})"


def _check_queue(name: object) -> str:
    return _check_text("queue name", name)


def _check_text(what: str, value: object) -> str:
    """A 1-200 character str without NUL (PostgreSQL text cannot hold one)."""
    if not isinstance(value, str) or not value or len(value) > 200 or "\x00" in value:
        raise InvalidArgumentError(f"{what} must be a 1-200 character str without NUL: {value!r}")
    return value
