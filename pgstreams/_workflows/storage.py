"""What a workflow engine stores, and the protocol every storage backend implements.

Values (inputs, outputs, step results) are JSON values; errors are ``{"type", "message"}``
objects. A run is claimed with a lease (``owner`` until ``lease_until``) that its worker
renews; a run whose lease ran out is orphaned and may be claimed again. The run lock is a
second, independent guard: one process executes a given run at a time, even if a lease
lapses while its worker still runs.

Waiters -- idle workers, and callers of ``result()`` -- sleep on a :class:`Wakeup` the
storage fires when something they wait for may have happened, and poll as the safety net:
a wake-up may be spurious or lost (a dropped connection), never the only news.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, TypedDict, Unpack, runtime_checkable

import anyio

__all__ = [
    "LocalWakeup",
    "RunChange",
    "RunRecord",
    "RunStatus",
    "StepAttempt",
    "StepChange",
    "StepRecord",
    "StepStatus",
    "Wakeup",
    "WorkflowStorage",
    "local_wakeups",
]

RunStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
StepStatus = Literal["scheduled", "running", "succeeded", "failed"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class _Outcome(TypedDict, total=False):
    output: Any
    error: dict[str, Any] | None


class RunChange(_Outcome, total=False):
    """What ``update_run`` sets besides the status; ``owner`` makes it conditional."""

    owner: str | None


class StepChange(_Outcome, total=False):
    """What ``mark_step`` sets besides the status; ``attempt`` names a history entry."""

    attempt: int | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run of a workflow, as stored."""

    workflow_id: str
    workflow: str
    """The registered workflow's name."""
    status: RunStatus
    input: Any = None
    """What ``start()`` was given (JSON)."""
    output: Any = None
    error: dict[str, Any] | None = None
    executions: int = 0
    """How many times a worker has started (or resumed) the run."""
    cancel_requested: bool = False
    owner: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step of a run, as stored (its latest attempt's outcome)."""

    workflow_id: str
    name: str
    status: StepStatus
    """The latest attempt's."""
    attempts: int = 0
    """Attempts started so far."""
    output: Any = None
    error: dict[str, Any] | None = None
    retried_attempts: int = 0
    """Attempts made before the run's last manual retry: they no longer count against
    the step's ``retries``."""


@dataclass(frozen=True, slots=True)
class StepAttempt:
    """One attempt at one step, as recorded in the run's history."""

    workflow_id: str
    step: str
    attempt: int
    """1 for the first try."""
    status: StepStatus
    output: Any = None
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Wakeup(Protocol):
    """A waiter's wake-up flag: ``arm()`` before looking, ``wait()`` after finding nothing.

    Something that happens in between leaves the flag set, so ``wait()`` returns at once:
    a wake-up is never missed between the look and the sleep.
    """

    def arm(self) -> bool:
        """Clear the flag; True if it was set."""
        ...

    async def wait(self, seconds: float) -> bool:
        """Sleep until fired or ``seconds`` pass; True if fired."""
        ...

    def fire(self) -> None:
        """Set the flag (from the waiter's own event loop)."""
        ...


class LocalWakeup:
    """A :class:`Wakeup` only this process fires: what a storage without notifications
    hands out (its waiters then poll)."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def arm(self) -> bool:
        if self._event.is_set():
            self._event = anyio.Event()
            return True
        return False

    async def wait(self, seconds: float) -> bool:
        with anyio.move_on_after(seconds):
            await self._event.wait()
            return True
        return False

    def fire(self) -> None:
        self._event.set()


@asynccontextmanager
async def local_wakeups() -> AsyncIterator[Wakeup]:
    """Wake-ups that only this process fires (the polling default)."""
    yield LocalWakeup()


@runtime_checkable
class WorkflowStorage(Protocol):
    """Where runs, steps and their history live (PostgreSQL or Redis)."""

    async def create_run(
        self, workflow_id: str, workflow: str, input: Any
    ) -> tuple[RunRecord, bool]:
        """Create a queued run, atomically: if ``workflow_id`` exists, return it and False.
        Input that is not JSON raises ``PayloadError`` before anything is written."""
        ...

    async def get_run(self, workflow_id: str) -> RunRecord | None: ...

    async def claim_run(
        self, workflows: Sequence[str], owner: str, lease: float
    ) -> RunRecord | None:
        """Lease the oldest queued or orphaned run of one of ``workflows`` to ``owner``."""
        ...

    async def renew_run(self, workflow_id: str, owner: str, lease: float) -> bool:
        """Extend ``owner``'s lease; False if the run is no longer theirs or not running."""
        ...

    async def update_run(
        self, workflow_id: str, status: RunStatus, **change: Unpack[RunChange]
    ) -> bool:
        """Set the status (and output or error); with ``owner``, only if they hold it."""
        ...

    async def request_cancel(self, workflow_id: str) -> RunRecord | None:
        """Cancel a queued run at once; flag a running one for its worker. None if unknown."""
        ...

    async def retry_run(self, workflow_id: str) -> RunRecord | None:
        """Queue a failed or cancelled run again, its unfinished steps with a fresh attempt
        budget (finished steps keep their results). None unless the run had failed or
        been cancelled."""
        ...

    async def run_history(self, workflow_id: str) -> list[StepAttempt]:
        """Every step attempt of the run, in the order they started."""
        ...

    async def insert_step(self, workflow_id: str, name: str) -> StepRecord:
        """Record the step as scheduled (no-op if it exists); returns its state."""
        ...

    async def get_step(self, workflow_id: str, name: str) -> StepRecord | None: ...

    async def create_attempt(self, workflow_id: str, name: str) -> int:
        """Start the step's next attempt (scheduling it if needed): the step is running,
        the history gains a running attempt; returns its number (1, 2, ...)."""
        ...

    async def mark_step(
        self, workflow_id: str, name: str, status: StepStatus, **change: Unpack[StepChange]
    ) -> None:
        """Set the step's status; with ``attempt``, finish that history entry too."""
        ...

    async def lock_run(self, workflow_id: str, owner: str, ttl: float) -> bool:
        """Take the run lock (True) unless another owner holds it."""
        ...

    async def extend_lock(self, workflow_id: str, owner: str, ttl: float) -> bool: ...

    async def unlock_run(self, workflow_id: str, owner: str) -> None:
        """Release the run lock if ``owner`` holds it."""
        ...

    # -- waiting -------------------------------------------------------------------------

    def work_wakeups(self) -> AbstractAsyncContextManager[Wakeup]:
        """For a worker: fired when a run may have become claimable (started, or handed
        back) by any process. ``local_wakeups()`` is the polling default."""
        ...

    def end_wakeups(self, workflow_id: str) -> AbstractAsyncContextManager[Wakeup]:
        """For ``result()``: fired when the run may have ended (completed, failed or
        cancelled) in any process. ``local_wakeups()`` is the polling default."""
        ...

    def serving(self) -> AbstractAsyncContextManager[None]:
        """Held by each worker block while it runs: what the storage keeps for its workers
        (PostgreSQL: the run session) lives as long as one block does."""
        ...

    # -- retention -----------------------------------------------------------------------

    async def prune(self, older_than: float, *, exclusive: bool = False) -> int:
        """Delete the runs that ended (completed, failed or cancelled) more than
        ``older_than`` seconds ago by the storage's clock, with their steps and history;
        returns how many. Queued and running runs are never touched. With ``exclusive``,
        one process prunes at a time: give way (returning what this call deleted, if
        anything) when another is pruning."""
        ...

    async def close(self) -> None: ...
