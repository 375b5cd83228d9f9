"""WorkflowEngine: start runs idempotently, and execute them in workers.

``start`` creates a run keyed by its workflow id in one atomic statement, so however many
callers race, one run exists. ``worker(concurrency=N)`` claims queued runs -- and runs
whose worker died, once their lease has run out -- takes the run lock, and executes them,
renewing the lease while they run. Runs spread across every process that shares the
storage.

Idle workers and ``result()`` sleep until the storage wakes them (a run was started or
handed back; the run ended) and poll every ``poll_interval`` as the safety net: a run whose
worker died is found by polling once its lease ran out. The engine knows its storage only
through the ``WorkflowStorage`` protocol.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio

from .._core import telemetry
from .._core.errors import DatabaseError, InvalidArgumentError
from .._core.validate import check_positive_int, check_seconds, to_json
from .storage import TERMINAL, RunRecord, RunStatus, Wakeup, WorkflowStorage
from .workflow import (
    Workflow,
    WorkflowCancelledError,
    WorkflowContext,
    WorkflowFailedError,
    describe,
)

if TYPE_CHECKING:
    from .._pg.database import Database

__all__ = ["RunHandle", "WorkflowEngine"]

logger = logging.getLogger("pgstreams.workflows")

_POLL = 0.5
"""Default seconds between the polls of an idle worker or a ``result()`` waiter."""
_PRUNE_EVERY = (10.0, 3600.0)
"""Automatic retention prunes every quarter of the retention, within these bounds."""


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
        WorkflowCancelledError. Woken by the storage when the run ends in any process,
        polling every ``poll_interval`` as the safety net."""
        run = await self._record()
        if run.status not in TERMINAL:
            storage = self._engine.storage
            async with storage.end_wakeups(self.workflow_id) as wake:
                while True:
                    wake.arm()  # before the read: an end in between is not missed
                    run = await self._record()
                    if run.status in TERMINAL:
                        break
                    await wake.wait(self._engine.poll_interval)
        if run.status == "failed":
            raise WorkflowFailedError(self.workflow_id, run.error)
        if run.status == "cancelled":
            raise WorkflowCancelledError(f"workflow {self.workflow_id!r} was cancelled")
        return run.output

    async def cancel(self) -> bool:
        """Cancel the run: at once if queued, at its worker's next lease renewal if
        running. False if it had already ended."""
        run = await self._engine.storage.request_cancel(self.workflow_id)
        return run is not None and (
            run.status == "cancelled" or (run.status == "running" and run.cancel_requested)
        )

    async def retry(self) -> None:
        """Queue a failed or cancelled run again; see :meth:`WorkflowEngine.retry`."""
        await self._engine.retry(self.workflow_id)

    async def _record(self) -> RunRecord:
        run = await self._engine.storage.get_run(self.workflow_id)
        if run is None:
            raise InvalidArgumentError(f"no workflow run {self.workflow_id!r}")
        return run

    def __repr__(self) -> str:
        return f"RunHandle({self.workflow_id!r}, created={self.created})"


class WorkflowEngine:
    """Starts and executes workflow runs on one storage (see module docstring).

    ``WorkflowEngine(db)`` keeps its runs in PostgreSQL (``PgWorkflowStorage(db)``);
    ``storage=`` takes any ``WorkflowStorage``. ``lease``: seconds a worker holds a run
    without renewing it; a run whose worker died is resumed elsewhere after that long.
    ``poll_interval``: seconds between the polls of idle workers and ``result()`` waiters
    (the safety net under wake-ups; also how soon a run whose lease ran out is found).
    """

    def __init__(
        self,
        db: Database | None = None,
        *,
        storage: WorkflowStorage | None = None,
        workflows: list[Workflow[Any, Any]] | None = None,
        lease: float = 30.0,
        poll_interval: float = _POLL,
    ) -> None:
        if storage is None and db is not None:
            storage = _default_storage(db)
        elif (db is None) == (storage is None):
            raise InvalidArgumentError("WorkflowEngine needs exactly one of db or storage=")
        assert storage is not None
        self.storage: WorkflowStorage = storage
        self._lease = check_seconds("lease", lease, allow_zero=False)
        self.poll_interval = check_seconds("poll_interval", poll_interval, allow_zero=False)
        self._workflows: dict[str, Workflow[Any, Any]] = {}
        self._working: set[Wakeup] = set()  # the wake-ups of this engine's worker blocks
        for wf in workflows or []:
            self.register(wf)

    def register(self, workflow: Workflow[Any, Any]) -> None:
        """Make ``workflow`` known to this engine's workers (``start`` and ``trigger`` do
        it too); running workers claim its runs from then on."""
        if not isinstance(workflow, Workflow):
            raise InvalidArgumentError(f"not a Workflow: {workflow!r}")
        if workflow.fn is None:
            raise InvalidArgumentError(f"workflow {workflow.name!r} has no @run function")
        known = self._workflows.get(workflow.name)
        if known is workflow:
            return
        if known is not None:
            raise InvalidArgumentError(f"another workflow is registered as {workflow.name!r}")
        self._workflows[workflow.name] = workflow
        for wake in self._working:  # its runs may be queued already
            wake.fire()

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
        if not created and run.workflow != workflow.name:
            raise InvalidArgumentError(
                f"workflow id {workflow_id!r} belongs to a run of {run.workflow!r}"
            )
        return RunHandle(self, workflow_id, created)

    async def retry(self, workflow_id: str) -> RunHandle:
        """Queue a failed or cancelled run again. Its finished steps keep their results;
        each unfinished step starts over with its full ``retries`` budget (the history
        keeps the earlier attempts). Raises ``InvalidArgumentError`` for an unknown run
        or one that is queued, running or completed."""
        if await self.storage.retry_run(workflow_id) is None:
            run = await self.storage.get_run(workflow_id)
            if run is None:
                raise InvalidArgumentError(f"no workflow run {workflow_id!r}")
            raise InvalidArgumentError(
                f"workflow run {workflow_id!r} is {run.status}: only a failed or cancelled"
                " run can be retried"
            )
        logger.info("workflow %s: queued again for a retry", workflow_id)
        return RunHandle(self, workflow_id, False)

    def handle(self, workflow_id: str) -> RunHandle:
        """A handle on an existing run."""
        return RunHandle(self, workflow_id, False)

    async def prune(self, *, older_than: timedelta | float) -> int:
        """Delete the runs that ended (completed, failed or cancelled) longer than
        ``older_than`` ago (a timedelta or seconds, by the storage's clock), with their
        steps and history; returns how many. Queued and running runs are never touched,
        however old. A pruned run's workflow id may be started again."""
        return await self.storage.prune(_duration("older_than", older_than))

    # -- workers -----------------------------------------------------------------------

    @asynccontextmanager
    async def worker(
        self,
        *,
        concurrency: int = 1,
        poll_interval: float | None = None,
        retention: timedelta | float | None = None,
        grace: float = 0.0,
    ) -> AsyncIterator[WorkflowEngine]:
        """Execute runs of the registered workflows, ``concurrency`` at a time, until the
        block exits.

        When the block ends normally the worker stops claiming runs and gives the runs it
        is executing up to ``grace`` seconds to finish; those still executing then -- or
        at once, when the block ends by an exception or a cancellation -- are handed back
        for any worker to resume from their last finished step.

        A worker may start before any workflow is registered: it claims the runs of each
        workflow from the moment it is registered. ``poll_interval`` overrides the
        engine's. With ``retention`` (a timedelta or seconds), the worker also prunes
        runs that ended longer ago than that -- when it starts, then every quarter of the
        retention (at least every hour) -- one process at a time.
        """
        check_positive_int("concurrency", concurrency)
        poll = (
            self.poll_interval
            if poll_interval is None
            else check_seconds("poll_interval", poll_interval, allow_zero=False)
        )
        keep = None if retention is None else _duration("retention", retention)
        grace = check_seconds("grace", grace)
        owner = f"{uuid.uuid4().hex[:12]}"
        slots = _Slots(concurrency)
        async with (
            self.storage.serving(),
            self.storage.work_wakeups() as wake,
            anyio.create_task_group() as tg,
        ):
            self._working.add(wake)
            try:
                poller = anyio.Lock()
                for _ in range(concurrency):
                    tg.start_soon(self._slot, owner, poll, poller, wake, slots)
                if keep is not None:
                    tg.start_soon(self._retain, keep)
                yield self
                slots.stopping = True
                wake.fire()  # the idle slot sees it and ends; busy ones end after their run
                if slots.busy:
                    logger.info(
                        "workflow worker stopping: %d run(s) in flight, up to %g s to finish",
                        slots.busy,
                        grace,
                    )
                with anyio.move_on_after(grace):
                    await slots.ended.wait()
                if slots.busy:
                    logger.info("workflow worker: handing back %d unfinished run(s)", slots.busy)
            finally:
                self._working.discard(wake)
                tg.cancel_scope.cancel()

    async def _slot(
        self, owner: str, poll: float, poller: anyio.Lock, wake: Wakeup, slots: _Slots
    ) -> None:
        try:
            await self._serve(owner, poll, poller, wake, slots)
        finally:
            slots.left -= 1
            if not slots.left:
                slots.ended.set()

    async def _serve(
        self, owner: str, poll: float, poller: anyio.Lock, wake: Wakeup, slots: _Slots
    ) -> None:
        fresh = False  # True: this slot has just executed a run
        while not slots.stopping:
            if fresh:
                # A slot back from a run claims at once, and its claim may share a
                # statement with its neighbours'.
                run = await self._claim(owner)
                if run is None:
                    fresh = False
                    continue
            else:
                # Idle slots take turns: one sleeps on the wake-up and claims, so a new
                # run wakes one slot rather than all.
                async with poller:
                    if slots.stopping:
                        return
                    wake.arm()  # before the claim: a run started meanwhile is not missed
                    run = await self._claim(owner)
                    while run is None:
                        await wake.wait(poll)
                        if slots.stopping:
                            wake.fire()  # the next idle slot ends too
                            return
                        wake.arm()
                        run = await self._claim(owner)
            fresh = True
            slots.busy += 1
            try:
                await self._run_claimed(run, owner)
            finally:
                slots.busy -= 1

    async def _run_claimed(self, run: RunRecord, owner: str) -> None:
        try:
            locked = await self.storage.lock_run(run.workflow_id, owner, self._lease)
        except DatabaseError as exc:
            logger.warning("workflow %s: could not take its lock: %s", run.workflow_id, exc)
            return  # the claim lapses with its lease
        if not locked:
            # Another process still executes it (its lease lapsed meanwhile): our claim
            # ends its lease renewal, so it stops, and the run is resumed after ours.
            return
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

    async def _retain(self, keep: float) -> None:
        """Automatic retention: prune now, then every so often (jittered, so processes
        started together drift apart); the storage lets one process prune at a time."""
        every = min(max(keep / 4, _PRUNE_EVERY[0]), _PRUNE_EVERY[1])
        while True:
            try:
                pruned = await self.storage.prune(keep, exclusive=True)
            except DatabaseError as exc:
                logger.warning("workflow retention: %s; trying again later", exc)
            else:
                if pruned:
                    logger.info("workflow retention: pruned %d finished runs", pruned)
            await anyio.sleep(every * random.uniform(0.9, 1.1))

    async def _claim(self, owner: str) -> RunRecord | None:
        if not self._workflows:
            return None  # nothing to claim until a workflow is registered
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
        logger.info(
            "workflow %s (%s): started, execution %d",
            run.workflow_id,
            run.workflow,
            run.executions,
        )
        with telemetry.workflow_run(run.workflow, run.workflow_id, run.executions) as ended:
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
                        logger.warning(
                            "workflow %s: %s; leaving it to resume", run.workflow_id, exc
                        )
                except Exception as exc:
                    outcome = ("failed", None, describe(exc))
                tg.cancel_scope.cancel()
            if outcome is None and cancelled.is_set():
                outcome = ("cancelled", None, None)  # a run that ended first keeps its outcome
            if outcome is not None:
                ended(outcome[0], outcome[2])
        if outcome is None:
            return  # the lease was lost, or the storage failed: another worker resumes it
        status, output, error = outcome
        if status == "failed":
            logger.warning("workflow %s (%s): failed: %s", run.workflow_id, run.workflow, error)
        else:
            logger.info("workflow %s (%s): %s", run.workflow_id, run.workflow, status)
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


class _Slots:
    """One worker block's slots: whether it is stopping, how many execute a run, and an
    event set once every slot has ended."""

    def __init__(self, count: int) -> None:
        self.stopping = False
        self.busy = 0
        self.left = count
        self.ended = anyio.Event()


def _default_storage(db: Database) -> WorkflowStorage:
    """``WorkflowEngine(db)``'s storage. Imported here, on use, so that the engine module
    depends on the storage protocol alone."""
    from .pg import PgWorkflowStorage

    return PgWorkflowStorage(db)


def _duration(what: str, value: timedelta | float) -> float:
    """A timedelta or a number of seconds, as seconds (>= 0)."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return check_seconds(what, value)
