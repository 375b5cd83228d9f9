"""PgWorkflowStorage: runs, steps and step history in PostgreSQL tables.

The tables, in ``schema`` with ``table_prefix``, are the ``workflows`` migration set:
installed or upgraded on first use (the default prefix's by ``Database.migrate()`` too),
unless ``auto_migrate=False``: then ``migrate()`` is the caller's to run.
Runs are claimed with ``FOR UPDATE SKIP LOCKED`` and a lease. The run locks are session
advisory locks (``pgstreams:run:<schema>:<prefix>:<id>``, see ``_pg.locks``) on one
connection per storage (a RunSession), which also carries the statements of the runs this
process executes, batched across runs: the claims, step attempts, step results and last
updates of runs that execute side by side each share one statement.

Taking and letting go of run locks (claims, lock, unlock, a run's last update) happens on
that connection only. A run's other statements go there as long as they need not wait on
a lock: one that waits longer than ``_LOCK_WAIT`` (another transaction holds its run or
step row) is run on a lent connection instead, in a transaction that commits only if the
run's lock is still held on the session once the statement has its rows -- so it waits
alone, and a run that lost its lock still writes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Unpack

from psycopg import AsyncConnection, sql

from .._core.errors import DatabaseError, InvalidArgumentError
from .._core.validate import check_name, check_schema, to_json
from .._pg.database import Database, translate_errors
from .._pg.locks import KEY_SQL, lock_text
from .._pg.migrate import WORKFLOWS, migrate_instance
from . import pg_upkeep
from .pg_statements import (
    BATCHES,
    CreateItem,
    FinishItem,
    MarkItem,
    attempt_params,
    check_text,
    mark_params,
    run_record,
    statements,
)
from .run_session import LockWaitError, RunSession, lock_lost
from .storage import (
    TERMINAL,
    RunChange,
    RunRecord,
    RunStatus,
    StepAttempt,
    StepChange,
    StepRecord,
    StepStatus,
    Wakeup,
)

__all__ = ["PgWorkflowStorage"]

_LOCK_WAIT = 0.02
"""Seconds a statement on the run session may wait on a lock before it is run on a lent
connection (where it may wait as long as it takes, holding up no other run)."""

_executing: ContextVar[str | None] = ContextVar("pgstreams_executing_run", default=None)
"""The run the current task (and the tasks it starts) executes, if any."""


@dataclass(slots=True)
class _Held:
    """A run lock this process holds: its owner, its key, and the generation of the
    session connection it lives on; ``released`` once the run's last update let it go."""

    owner: str
    key: int
    generation: int
    released: bool = False


class PgWorkflowStorage:
    """Workflow state in PostgreSQL (see module docstring)."""

    def __init__(
        self,
        db: Database,
        *,
        schema: str | None = None,
        table_prefix: str = "wf_",
        auto_migrate: bool = True,
    ) -> None:
        self._db = db
        self.schema = check_schema(db.schema if schema is None else schema)
        if table_prefix:
            check_name("table prefix", table_prefix)
        self.table_prefix = table_prefix
        self._names = WORKFLOWS.names(self.schema, table_prefix)
        # A run lock's key, from the text ns || workflow_id (one scheme: see _pg.locks).
        run_key = sql.SQL(KEY_SQL).format(sql.SQL("%(ns)s || workflow_id"))
        self._sql = statements({**self._names, "run_key": run_key})
        self._ready = not auto_migrate  # False: install or upgrade on first use
        self._ns = lock_text("run", self.schema, table_prefix, "")  # + id: a run lock's text
        self._session = RunSession(self._open_session, self._sql, BATCHES, lock_timeout=_LOCK_WAIT)
        self._starts = RunSession(self._borrow, self._sql, BATCHES, keep=False)
        self._locks: dict[str, _Held] = {}  # run locks of runs this process executes
        self._prelocked: dict[str, _Held] = {}  # taken by claim_run, for lock_run
        self._contended: set[str] = set()  # claimed, but another process holds the lock
        self._serving = 0  # worker blocks using this storage

    async def migrate(self) -> None:
        """Install or upgrade this schema and prefix's tables (the ``workflows`` migration
        set: idempotent, safe to run concurrently)."""
        async with self._db.connection() as conn:
            await migrate_instance(conn, WORKFLOWS, self.schema, self.table_prefix)
        self._ready = True

    async def _open_session(self, stack: AsyncExitStack) -> AsyncConnection[Any]:
        """The session's connection: one from the pool, kept; a Database on a single
        connection cannot spare it, so the session gets its own."""
        with translate_errors():
            if self._db.pool is None:
                return await stack.enter_async_context(
                    await AsyncConnection.connect(self._db.dsn, autocommit=True)
                )
            return await stack.enter_async_context(self._db.connection())

    async def _borrow(self, stack: AsyncExitStack) -> AsyncConnection[Any]:
        return await stack.enter_async_context(self._db.connection())

    def _held(self, workflow_id: str) -> _Held | None:
        """The run's lock, when the calling task is the one executing that run."""
        held = self._locks.get(workflow_id)
        return held if held is not None and _executing.get() == workflow_id else None

    async def _rows(self, kind: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement: through the session when called by the task executing that
        run (and only while the run's lock is still there), else on a lent connection."""
        if not self._ready:
            await self.migrate()
        held = self._held(params.get("id", ""))
        if held is not None:
            return await self._on_session(kind, params, held)  # type: ignore[no-any-return]
        return await self._unshared(kind, params)

    async def _on_session(self, kind: str, item: Any, held: _Held) -> Any:
        """One call of the run this task executes, on the session; if it waited on a lock
        there, on a lent connection instead (``_fenced``)."""
        try:
            result, _ = await self._session.call(kind, item, generation=held.generation)
        except LockWaitError:
            return await self._fenced(kind, item, held)
        return result

    async def _fenced(self, kind: str, item: Any, held: _Held) -> Any:
        """A call that waited on a lock on the session, run alone on a lent connection,
        where it may wait as long as it takes. A run's last update lets its lock go on the
        session once the update is in."""
        if kind == "finish":
            params = {
                "id": item.workflow_id,
                "status": item.status,
                "owner": item.owner,
                "output": item.output,
                "error": item.error,
            }
            updated = bool(await self._fenced_rows("update", params, held))
            await self._release(held)
            return updated
        how = BATCHES.get(kind)
        params = item if how is None else how.params(None, [item])
        rows = await self._fenced_rows(kind, params, held)
        return rows if how is None else how.split([item], rows)[0]

    async def _fenced_rows(self, kind: str, params: dict[str, Any], held: _Held) -> list[Any]:
        """One statement in a transaction that commits only if the run's lock is still
        held on the session once the statement has taken its rows; else it is rolled back
        and fails as ``lock_lost()`` (the run is resumed elsewhere, as on the session)."""
        pid = self._session.pid_of(held.generation)
        if pid is None:
            raise lock_lost()
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql[kind], params)
            rows = await cur.fetchall() if cur.description else []
            cur = await conn.execute(self._sql["holds_lock"], {"pid": pid, "key": held.key})
            still = await cur.fetchone()
            if not (still and still[0]) or self._session.pid_of(held.generation) != pid:
                raise lock_lost()  # rolls the statement back
        return rows

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Held by each engine worker block: refuses a pool the session would starve (it
        keeps one connection while runs execute; starting runs and polling results need
        another), and gives the session's connection back when the last block ends."""
        pool = self._db.pool
        if pool is not None and pool.max_size < 2:
            raise InvalidArgumentError(
                "a workflow worker needs a pool of at least 2 connections (one holds the"
                f" run locks); this one has max_size={pool.max_size}"
            )
        self._serving += 1
        try:
            yield
        finally:
            self._serving -= 1
            if not self._serving and not self._locks:
                # Claims no slot went on to execute hold nothing worth keeping either.
                self._prelocked.clear()
                self._contended.clear()
                await self._session.reset()

    # -- runs --------------------------------------------------------------------------

    async def create_run(
        self, workflow_id: str, workflow: str, input: Any
    ) -> tuple[RunRecord, bool]:
        item = CreateItem(
            check_text("workflow id", workflow_id),
            check_text("workflow name", workflow),
            to_json("input", input),
        )
        if not self._ready:
            await self.migrate()
        row, _ = await self._starts.call("create", item)
        if row is not None:
            return run_record(row), True
        existing = await self.get_run(workflow_id)
        assert existing is not None  # runs are never deleted
        return existing, False

    async def get_run(self, workflow_id: str) -> RunRecord | None:
        rows = await self._rows("get", {"id": workflow_id})
        return run_record(rows[0]) if rows else None

    async def claim_run(
        self, workflows: Sequence[str], owner: str, lease: float
    ) -> RunRecord | None:
        """Claims made at the same time share one statement, which takes each run's lock
        on the session's connection."""
        if not self._ready:
            await self.migrate()
        group = (owner, tuple(workflows), float(lease), self._ns)
        row, generation = await self._session.call("claim", None, group=group)
        if row is None:
            return None
        run = run_record(row)
        if row[-2]:
            self._prelocked[run.workflow_id] = _Held(owner, int(row[-1]), generation)
        else:
            self._contended.add(run.workflow_id)
        return run

    async def renew_run(self, workflow_id: str, owner: str, lease: float) -> bool:
        rows = await self._rows("renew", {"id": workflow_id, "owner": owner, "lease": lease})
        return bool(rows)

    async def update_run(
        self, workflow_id: str, status: RunStatus, **change: Unpack[RunChange]
    ) -> bool:
        owner, output, error = change.get("owner"), change.get("output"), change.get("error")
        out = None if output is None else to_json("output", output)
        err = None if error is None else to_json("error", error)
        held = self._held(workflow_id)
        if (
            held is not None
            and owner is not None
            and held.owner == owner
            and not held.released
            and status in TERMINAL
        ):
            item = FinishItem(workflow_id, status, owner, out, err, held.key)
            updated = await self._on_session("finish", item, held)
            held.released = True
            return bool(updated)
        params = {"id": workflow_id, "status": status, "owner": owner, "output": out, "error": err}
        return bool(await self._rows("update", params))

    async def request_cancel(self, workflow_id: str) -> RunRecord | None:
        rows = await self._rows("cancel", {"id": workflow_id})
        return run_record(rows[0]) if rows else None

    async def retry_run(self, workflow_id: str) -> RunRecord | None:
        rows = await self._rows("retry", {"id": workflow_id})
        return run_record(rows[0]) if rows else None

    async def run_history(self, workflow_id: str) -> list[StepAttempt]:
        rows = await self._rows("history", {"id": workflow_id})
        return [StepAttempt(*r) for r in rows]

    # -- steps -------------------------------------------------------------------------

    async def insert_step(self, workflow_id: str, name: str) -> StepRecord:
        check_text("step name", name)
        rows = await self._rows("insert_step", {"id": workflow_id, "name": name})
        return StepRecord(*rows[0])

    async def get_step(self, workflow_id: str, name: str) -> StepRecord | None:
        rows = await self._rows("get_step", {"id": workflow_id, "name": name})
        return StepRecord(*rows[0]) if rows else None

    async def create_attempt(self, workflow_id: str, name: str) -> int:
        check_text("step name", name)
        held = self._held(workflow_id)
        if held is not None:  # shares a statement with other runs' steps
            return int(await self._on_session("attempt", (workflow_id, name), held))
        rows = await self._unshared("attempt", attempt_params(None, [(workflow_id, name)]))
        return int(rows[0][2])

    async def mark_step(
        self, workflow_id: str, name: str, status: StepStatus, **change: Unpack[StepChange]
    ) -> None:
        attempt, output, error = change.get("attempt"), change.get("output"), change.get("error")
        out = None if output is None else to_json("step output", output)
        err = None if error is None else to_json("step error", error)
        item = MarkItem(
            workflow_id,
            check_text("step name", name),
            status,
            None if attempt is None else int(attempt),
            out,
            err,
        )
        held = self._held(workflow_id)
        if held is not None:
            await self._on_session("mark", item, held)
        else:
            await self._unshared("mark", mark_params(None, [item]))

    async def _unshared(self, kind: str, params: dict[str, Any]) -> list[Any]:
        """One statement on a lent connection (outside the session)."""
        if not self._ready:
            await self.migrate()
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql[kind], params)
            return await cur.fetchall() if cur.description else []

    # -- the run lock ------------------------------------------------------------------

    async def lock_run(self, workflow_id: str, owner: str, ttl: float) -> bool:
        """A session advisory lock on the session's connection, which then also carries
        the run's statements (``ttl`` unused: the lock lasts as long as that connection).
        ``claim_run`` usually took it already."""
        pre = self._prelocked.pop(workflow_id, None)
        if pre is not None:
            if pre.generation != self._session.generation:
                return False  # the lock went with its connection; the claim lapses
            if pre.owner == owner and workflow_id not in self._locks:
                self._locks[workflow_id] = pre
                _executing.set(workflow_id)
                return True
            # This process still executes it (its lease lapsed meanwhile, and the claim
            # took the lock a second time on the same session): undo the claim's take.
            await self._release(pre)
            return False
        if workflow_id in self._locks:
            return False  # this process already executes it
        if workflow_id in self._contended:
            self._contended.discard(workflow_id)
            return False  # claim_run found the lock taken
        if not self._ready:
            await self.migrate()
        rows, generation = await self._session.call("lock", {"ns": self._ns, "id": workflow_id})
        if not rows or not rows[0][0] or generation != self._session.generation:
            return False  # taken elsewhere, or already gone with its connection
        if workflow_id in self._locks:  # taken meanwhile by another task of this process
            await self._release(_Held(owner, int(rows[0][1]), generation))
            return False
        self._locks[workflow_id] = _Held(owner, int(rows[0][1]), generation)
        _executing.set(workflow_id)
        return True

    async def extend_lock(self, workflow_id: str, owner: str, ttl: float) -> bool:
        held = self._locks.get(workflow_id)
        return (
            held is not None
            and held.owner == owner
            and held.generation == self._session.generation
            and self._session.alive
        )

    async def unlock_run(self, workflow_id: str, owner: str) -> None:
        held = self._locks.get(workflow_id)
        if held is None or held.owner != owner:
            return
        del self._locks[workflow_id]
        if _executing.get() == workflow_id:
            _executing.set(None)
        await self._release(held)

    async def _release(self, held: _Held) -> None:
        if held.released or held.generation != self._session.generation:
            return  # let go by the run's last update, or gone with its connection
        try:
            await self._session.call("unlock", {"key": held.key}, generation=held.generation)
        except DatabaseError:
            # The lock must not outlive its run: unless it is gone already (with its
            # connection), drop the session's connection and every lock on it (runs still
            # executing learn it at their next call).
            await self._session.reset(held.generation)

    # -- wake-ups and retention (NOTIFYs from the runs table's triggers; see pg_upkeep) --

    def work_wakeups(self) -> AbstractAsyncContextManager[Wakeup]:
        return self._db.wakeups(pg_upkeep.work_channel(self.schema, self.table_prefix))

    def end_wakeups(self, workflow_id: str) -> AbstractAsyncContextManager[Wakeup]:
        return self._db.wakeups(pg_upkeep.end_channel(self.schema, self.table_prefix, workflow_id))

    async def prune(self, older_than: float, *, exclusive: bool = False) -> int:
        if not self._ready:
            await self.migrate()
        return await pg_upkeep.prune(
            self._db, self._names, self.schema, self.table_prefix, older_than, exclusive=exclusive
        )

    async def close(self) -> None:
        """Release the run locks this process still holds, and the session."""
        for table in (self._locks, self._prelocked):
            while table:
                _, held = table.popitem()
                await self._release(held)
        await self._session.close()

    def __repr__(self) -> str:
        return f"PgWorkflowStorage(schema={self.schema!r}, table_prefix={self.table_prefix!r})"
