"""WorkflowEngine: start runs idempotently, and execute them in workers.

``start`` creates a run keyed by its workflow id in one atomic statement, so however many
callers race, one run exists. ``worker(concurrency=N)`` claims queued runs -- and runs
whose worker died, once their lease has run out -- takes the run lock, and executes them,
renewing the lease while they run. Runs spread across every process that shares the
storage.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Any

import anyio

from .._core.errors import DatabaseError, InvalidArgumentError
from .._core.validate import check_positive_int, check_seconds, to_json
from .._pg.database import Database
from .pg import PgWorkflowStorage
from .storage import RunRecord, RunStatus, WorkflowStorage
from .workflow import (
    Workflow,
    WorkflowCancelledError,
    WorkflowContext,
    WorkflowFailedError,
    describe,
)

__all__ = ["RunHandle", "WorkflowEngine"]

logger = logging.getLogger("pgstreams.workflows")

_IDLE_MIN, _IDLE_MAX = 0.005, 0.5
"""A worker with nothing to do polls again after this long, doubling up to the maximum."""


class RunHandle:
    """A run, by workflow id: ``status()``, ``result()``, ``cancel()``.

    ``created`` is False when ``start`` found the run already there (a duplicate).
    """

    def __init__(self, engine: WorkflowEngine, workflow_id: str, created: bool) -> None:
        self._engine = engine
        self.workflow_id = workflow_id
        self.created = created

    async def status(self) -> RunStatus:
        return (await self._record()).status

    async def result(self) -> Any:
        """Wait until the run ends; its output, or WorkflowFailedError /
        WorkflowCancelledError."""
        delay = _IDLE_MIN
        while True:
            run = await self._record()
            if run.status == "completed":
                return run.output
            if run.status == "failed":
                raise WorkflowFailedError(self.workflow_id, run.error)
            if run.status == "cancelled":
                raise WorkflowCancelledError(f"workflow {self.workflow_id!r} was cancelled")
            await anyio.sleep(delay)
            delay = min(delay * 2, _IDLE_MAX)

    async def cancel(self) -> bool:
        """Cancel the run: at once if queued, at its worker's next lease renewal if
        running. False if it had already ended."""
        run = await self._engine.storage.request_cancel(self.workflow_id)
        return run is not None and (
            run.status == "cancelled" or (run.status == "running" and run.cancel_requested)
        )

    async def _record(self) -> RunRecord:
        run = await self._engine.storage.get_run(self.workflow_id)
        if run is None:
            raise InvalidArgumentError(f"no workflow run {self.workflow_id!r}")
        return run

    def __repr__(self) -> str:
        return f"RunHandle({self.workflow_id!r}, created={self.created})"


class WorkflowEngine:
    """Starts and executes workflow runs on one storage (see module docstring).

    ``lease``: seconds a worker holds a run without renewing it; a run whose worker died
    is resumed elsewhere after that long.
    """

    def __init__(
        self,
        db: Database | None = None,
        *,
        storage: WorkflowStorage | None = None,
        workflows: list[Workflow[Any, Any]] | None = None,
        lease: float = 30.0,
    ) -> None:
        if (db is None) == (storage is None):
            raise InvalidArgumentError("WorkflowEngine needs exactly one of db or storage=")
        self.storage: WorkflowStorage = storage if storage is not None else PgWorkflowStorage(db)  # type: ignore[arg-type]
        self._lease = check_seconds("lease", lease, allow_zero=False)
        self._workflows: dict[str, Workflow[Any, Any]] = {}
        for wf in workflows or []:
            self.register(wf)
        self._work = anyio.Event()  # set by start(): a local worker need not wait its poll

    def register(self, workflow: Workflow[Any, Any]) -> None:
        """Make ``workflow`` known to this engine's workers (``start`` does it too)."""
        if not isinstance(workflow, Workflow):
            raise InvalidArgumentError(f"not a Workflow: {workflow!r}")
        if workflow.fn is None:
            raise InvalidArgumentError(f"workflow {workflow.name!r} has no @run function")
        known = self._workflows.get(workflow.name)
        if known is not None and known is not workflow:
            raise InvalidArgumentError(f"another workflow is registered as {workflow.name!r}")
        self._workflows[workflow.name] = workflow

    async def start(
        self,
        workflow: Workflow[Any, Any] | str,
        input: Any = None,
        *,
        workflow_id: str | None = None,
    ) -> RunHandle:
        """Queue a run of ``workflow`` unless one with ``workflow_id`` exists (then return
        a handle on that one, ``created=False``)."""
        if isinstance(workflow, str):
            if workflow not in self._workflows:
                raise InvalidArgumentError(f"unknown workflow {workflow!r}")
            workflow = self._workflows[workflow]
        self.register(workflow)
        if workflow_id is None:
            workflow_id = uuid.uuid4().hex
        elif not isinstance(workflow_id, str) or not workflow_id or len(workflow_id) > 200:
            raise InvalidArgumentError(
                f"workflow_id must be a 1-200 character str: {workflow_id!r}"
            )
        run, created = await self.storage.create_run(workflow_id, workflow.name, input)
        if created:
            self._work.set()
        elif run.workflow != workflow.name:
            raise InvalidArgumentError(
                f"workflow id {workflow_id!r} belongs to a run of {run.workflow!r}"
            )
        return RunHandle(self, workflow_id, created)

    def handle(self, workflow_id: str) -> RunHandle:
        """A handle on an existing run."""
        return RunHandle(self, workflow_id, False)

    # -- workers -----------------------------------------------------------------------

    @asynccontextmanager
    async def worker(
        self, *, concurrency: int = 1, poll_interval: float = _IDLE_MAX
    ) -> AsyncIterator[WorkflowEngine]:
        """Execute runs of the registered workflows, ``concurrency`` at a time, until the
        block exits (runs still executing then are resumed later, by any worker)."""
        check_positive_int("concurrency", concurrency)
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        if not self._workflows:
            raise InvalidArgumentError("no workflow is registered with this engine")
        # A storage may keep resources for its workers (PgWorkflowStorage: its session).
        serving = getattr(self.storage, "serving", None)
        owner = f"{uuid.uuid4().hex[:12]}"
        async with (
            serving() if serving is not None else nullcontext(),
            anyio.create_task_group() as tg,
        ):
            poller = anyio.Lock()
            for _ in range(concurrency):
                tg.start_soon(self._slot, owner, poll, poller)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _slot(self, owner: str, poll: float, poller: anyio.Lock) -> None:
        idle = 0.0  # 0: this slot has just executed a run
        while True:
            if idle:
                # Idle slots take turns: one polls (and waits for start() to wake it), so a
                # new run wakes one slot rather than all. A slot back from a run claims at
                # once, and its claim may share a statement with its neighbours'.
                async with poller:
                    run = await self._claim(owner)
                    while run is None:
                        self._work = anyio.Event() if self._work.is_set() else self._work
                        with anyio.move_on_after(min(idle, poll)):
                            await self._work.wait()
                        idle = min(idle * 2, poll)
                        run = await self._claim(owner)
            else:
                run = await self._claim(owner)
                if run is None:
                    idle = _IDLE_MIN
                    continue
            idle = 0.0
            try:
                locked = await self.storage.lock_run(run.workflow_id, owner, self._lease)
            except DatabaseError as exc:
                logger.warning("workflow %s: could not take its lock: %s", run.workflow_id, exc)
                continue  # the claim lapses with its lease
            if not locked:
                # Another process still executes it (its lease lapsed meanwhile): our claim
                # ends its lease renewal, so it stops, and the run is resumed after ours.
                continue
            stopping = False
            try:
                await self._execute(run, owner)
            except anyio.get_cancelled_exc_class():
                stopping = True
                raise
            finally:
                try:
                    await self.storage.unlock_run(run.workflow_id, owner)
                except DatabaseError as exc:  # it expires (Redis) or ends with its session
                    logger.warning("workflow %s: could not unlock: %s", run.workflow_id, exc)
                if stopping:
                    await self._hand_back(run.workflow_id, owner)

    async def _claim(self, owner: str) -> RunRecord | None:
        try:
            # Read each time: start() and trigger() register workflows as they go.
            return await self.storage.claim_run(list(self._workflows), owner, self._lease)
        except DatabaseError as exc:
            if not exc.transient:
                raise
            logger.warning("workflow worker: %s; retrying", exc)
            return None

    async def _execute(self, run: RunRecord, owner: str) -> None:
        workflow = self._workflows[run.workflow]
        assert workflow.fn is not None
        if run.cancel_requested:
            await self.storage.update_run(run.workflow_id, "cancelled", owner=owner)
            return
        outcome: tuple[RunStatus, Any, dict[str, Any] | None] | None = None
        async with anyio.create_task_group() as tg:
            cancelled = anyio.Event()
            tg.start_soon(self._keep, run.workflow_id, owner, tg.cancel_scope, cancelled)
            try:
                output = await workflow.fn(WorkflowContext(self.storage, run), run.input)
                to_json("workflow output", output)
                outcome = ("completed", output, None)
            except DatabaseError as exc:
                if not exc.transient:
                    outcome = ("failed", None, describe(exc))
                else:  # the storage went away, not the run: leave it to be resumed
                    logger.warning("workflow %s: %s; leaving it to resume", run.workflow_id, exc)
            except Exception as exc:
                outcome = ("failed", None, describe(exc))
            tg.cancel_scope.cancel()
        if outcome is None and cancelled.is_set():
            outcome = ("cancelled", None, None)  # a run that ended first keeps its outcome
        if outcome is None:
            return  # the lease was lost, or the storage failed: another worker resumes it
        status, output, error = outcome
        with anyio.CancelScope(shield=True):
            try:
                await self.storage.update_run(
                    run.workflow_id, status, owner=owner, output=output, error=error
                )
            except DatabaseError as exc:
                if not exc.transient:
                    raise
                logger.warning("workflow %s: outcome not stored: %s", run.workflow_id, exc)

    async def _hand_back(self, workflow_id: str, owner: str) -> None:
        """A stopping worker's run goes back to the queue for any worker to resume now,
        rather than after its lease."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                await self.storage.update_run(workflow_id, "queued", owner=owner)
            except DatabaseError as exc:
                logger.warning("workflow %s: not handed back: %s", workflow_id, exc)

    async def _keep(
        self, workflow_id: str, owner: str, scope: anyio.CancelScope, cancelled: anyio.Event
    ) -> None:
        """Renew the lease and the lock; stop the run if either is lost or it is cancelled."""
        renewed = anyio.current_time()
        while True:
            await anyio.sleep(self._lease / 3)
            try:
                # The lock first: a run that lost it must stop, whatever the lease says.
                kept = await self.storage.extend_lock(workflow_id, owner, self._lease)
                kept = kept and await self.storage.renew_run(workflow_id, owner, self._lease)
                run = await self.storage.get_run(workflow_id) if kept else None
            except DatabaseError as exc:
                logger.warning("workflow %s: could not renew its lease: %s", workflow_id, exc)
                # Stop at once if the failure took the lock (its connection died), or once
                # the lease has run out: another worker may resume the run from then on.
                if anyio.current_time() - renewed >= self._lease or not await self._holds(
                    workflow_id, owner
                ):
                    scope.cancel()
                    return
                continue
            renewed = anyio.current_time()
            if run is not None and run.cancel_requested:
                cancelled.set()
            if run is None or run.cancel_requested:
                scope.cancel()
                return

    async def _holds(self, workflow_id: str, owner: str) -> bool:
        try:
            return await self.storage.extend_lock(workflow_id, owner, self._lease)
        except DatabaseError:
            return True  # unknown: the lease decides
