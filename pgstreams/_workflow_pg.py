"""PgWorkflowStorage: runs, steps and step history in PostgreSQL tables.

The tables are created on first use (under an advisory lock) in ``schema`` with
``table_prefix``. Runs are claimed with ``FOR UPDATE SKIP LOCKED`` and a lease; the run
lock is a session advisory lock held on a connection set aside for the run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import anyio
from psycopg import AsyncConnection, sql

from ._calls import render
from ._db import Database, translate_errors
from ._errors import DatabaseError, InvalidArgumentError
from ._migrate import advisory_key
from ._validate import check_name, check_schema, to_json
from ._workflow_storage import (
    TERMINAL,
    RunRecord,
    RunStatus,
    StepAttempt,
    StepRecord,
    StepStatus,
)

__all__ = ["PgWorkflowStorage"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {runs} (
    workflow_id       text        PRIMARY KEY,
    workflow          text        NOT NULL,
    status            text        NOT NULL,
    input             jsonb,
    output            jsonb,
    error             jsonb,
    executions        integer     NOT NULL DEFAULT 0,
    cancel_requested  boolean     NOT NULL DEFAULT false,
    owner             text,
    lease_until       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {runs_open} ON {runs} (created_at)
    WHERE status IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS {steps} (
    workflow_id  text        NOT NULL,
    name         text        NOT NULL,
    status       text        NOT NULL,
    attempts     integer     NOT NULL DEFAULT 0,
    output       jsonb,
    error        jsonb,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, name)
);
CREATE TABLE IF NOT EXISTS {attempts} (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow_id  text        NOT NULL,
    step         text        NOT NULL,
    attempt      integer     NOT NULL,
    status       text        NOT NULL,
    output       jsonb,
    error        jsonb,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    UNIQUE (workflow_id, step, attempt)
);
"""

_RUN = (
    "workflow_id, workflow, status, input, output, error, executions, cancel_requested, owner,"
    " created_at, updated_at"
)

# The oldest queued run of the given workflows, or the oldest whose lease ran out.
_CLAIM = """
    UPDATE {runs}
    SET status = 'running', owner = %(owner)s, executions = executions + 1,
        lease_until = clock_timestamp() + %(lease)s * interval '1 second', updated_at = now()
    WHERE workflow_id = (
        SELECT workflow_id FROM {runs}
        WHERE status IN ('queued', 'running') AND workflow = ANY (%(workflows)s)
          AND (status = 'queued' OR lease_until < clock_timestamp())
        ORDER BY created_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
"""

_Q = {
    "CREATE": f"""
        INSERT INTO {{runs}} (workflow_id, workflow, status, input)
        VALUES (%(id)s, %(workflow)s, 'queued', %(input)s::jsonb)
        ON CONFLICT (workflow_id) DO NOTHING
        RETURNING {_RUN}
    """,
    "GET": f"SELECT {_RUN} FROM {{runs}} WHERE workflow_id = %(id)s",
    "CLAIM": f"{_CLAIM} RETURNING {_RUN}",
    # The same, taking the run lock in the same round trip.
    "CLAIM_LOCK": f"""{_CLAIM}
        RETURNING {_RUN}, pg_try_advisory_lock(hashtextextended(%(ns)s || workflow_id, 0)),
                  hashtextextended(%(ns)s || workflow_id, 0)
    """,
    "LOCK": """
        SELECT pg_try_advisory_lock(hashtextextended(%(ns)s || %(id)s, 0)),
               hashtextextended(%(ns)s || %(id)s, 0)
    """,
    "UNLOCK": "SELECT pg_advisory_unlock(%(key)s)",
    "RENEW": """
        UPDATE {runs} SET lease_until = clock_timestamp() + %(lease)s * interval '1 second'
        WHERE workflow_id = %(id)s AND owner = %(owner)s AND status = 'running'
        RETURNING cancel_requested
    """,
    "UPDATE": """
        UPDATE {runs}
        SET status = %(status)s, output = %(output)s::jsonb, error = %(error)s::jsonb,
            lease_until = NULL, updated_at = now()
        WHERE workflow_id = %(id)s
          AND (%(owner)s::text IS NULL
               OR (owner = %(owner)s AND status NOT IN ('completed', 'failed', 'cancelled')))
        RETURNING 1
    """,
    # A run's last update and the release of its lock, in one round trip.
    "FINISH": """
        WITH u AS (
            UPDATE {runs}
            SET status = %(status)s, output = %(output)s::jsonb, error = %(error)s::jsonb,
                lease_until = NULL, updated_at = now()
            WHERE workflow_id = %(id)s AND owner = %(owner)s
              AND status NOT IN ('completed', 'failed', 'cancelled')
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM u), pg_advisory_unlock(%(key)s)
    """,
    "CANCEL": f"""
        UPDATE {{runs}}
        SET status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
            cancel_requested = cancel_requested OR status = 'running', updated_at = now()
        WHERE workflow_id = %(id)s
        RETURNING {_RUN}
    """,
    "HISTORY": """
        SELECT workflow_id, step, attempt, status, output, error, started_at, finished_at
        FROM {attempts} WHERE workflow_id = %(id)s ORDER BY id
    """,
    "INSERT_STEP": """
        WITH i AS (
            INSERT INTO {steps} (workflow_id, name, status) VALUES (%(id)s, %(name)s, 'scheduled')
            ON CONFLICT (workflow_id, name) DO NOTHING
            RETURNING workflow_id, name, status, attempts, output, error
        )
        SELECT * FROM i
        UNION ALL
        SELECT workflow_id, name, status, attempts, output, error FROM {steps}
        WHERE workflow_id = %(id)s AND name = %(name)s AND NOT EXISTS (SELECT FROM i)
    """,
    "GET_STEP": """
        SELECT workflow_id, name, status, attempts, output, error FROM {steps}
        WHERE workflow_id = %(id)s AND name = %(name)s
    """,
    "ATTEMPT": """
        WITH s AS (
            INSERT INTO {steps} AS s (workflow_id, name, status, attempts)
            VALUES (%(id)s, %(name)s, 'running', 1)
            ON CONFLICT (workflow_id, name) DO UPDATE
            SET status = 'running', attempts = s.attempts + 1, updated_at = now()
            RETURNING attempts
        )
        INSERT INTO {attempts} (workflow_id, step, attempt, status)
        SELECT %(id)s, %(name)s, attempts, 'running' FROM s
        RETURNING attempt
    """,
    "MARK": """
        WITH s AS (
            UPDATE {steps}
            SET status = %(status)s, output = %(output)s::jsonb, error = %(error)s::jsonb,
                updated_at = now()
            WHERE workflow_id = %(id)s AND name = %(name)s
            RETURNING 1
        )
        UPDATE {attempts}
        SET status = %(status)s, output = %(output)s::jsonb, error = %(error)s::jsonb,
            finished_at = CASE WHEN %(status)s IN ('succeeded', 'failed')
                               THEN clock_timestamp() END
        WHERE workflow_id = %(id)s AND step = %(name)s AND attempt = %(attempt)s
          AND EXISTS (SELECT FROM s)
    """,
}


_executing: ContextVar[str | None] = ContextVar("pgstreams_executing_run", default=None)
"""The run the current task (and the tasks it starts) executes, if any."""


@dataclass(slots=True)
class _Held:
    """A run lock this process holds: its owner, the connection (kept for the run's
    statements) and the key; ``released`` once the run's last update let it go."""

    owner: str
    stack: AsyncExitStack
    conn: AsyncConnection[Any]
    key: int
    released: bool = False


class PgWorkflowStorage:
    """Workflow state in PostgreSQL (see module docstring)."""

    def __init__(
        self, db: Database, *, schema: str | None = None, table_prefix: str = "wf_"
    ) -> None:
        self._db = db
        self.schema = check_schema(db.schema if schema is None else schema)
        if table_prefix:
            check_name("table prefix", table_prefix)
        self.table_prefix = table_prefix
        self._names = {
            "runs": sql.Identifier(self.schema, f"{table_prefix}runs"),
            "runs_open": sql.Identifier(f"{table_prefix}runs_open"),
            "steps": sql.Identifier(self.schema, f"{table_prefix}steps"),
            "attempts": sql.Identifier(self.schema, f"{table_prefix}attempts"),
        }
        self._sql = render(_Q, self._names)
        self._ready = False
        self._ns = f"{self.schema}.{table_prefix}:"  # scopes the run locks' keys
        self._locks: dict[str, _Held] = {}  # run locks of runs this process executes
        self._prelocked: dict[str, _Held] = {}  # taken by claim_run, for lock_run
        self._contended: set[str] = set()  # claimed, but another process holds the lock

    async def migrate(self) -> None:
        """Create the tables if needed (idempotent, safe to run concurrently)."""
        async with self._db.connection() as conn, conn.transaction():
            key = advisory_key("workflows", self.schema, self.table_prefix)
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [key])
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
            )
            await conn.execute(sql.SQL(_SCHEMA).format(**self._names))  # type: ignore[arg-type,unused-ignore]
        self._ready = True

    async def _rows(self, key: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement: on the connection that holds the run's lock when called by the
        task executing that run (so a run needs no second connection), else on a lent one."""
        if not self._ready:
            await self.migrate()
        run = params.get("id", "")
        held = self._locks.get(run)
        if held is not None and _executing.get() == run and not held.conn.closed:
            # Shielded: a statement cancelled mid-flight would cost the run its connection,
            # and with it its lock.
            with anyio.CancelScope(shield=True), translate_errors():
                cur = await held.conn.execute(self._sql[key], params)
                return await cur.fetchall() if cur.description else []
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql[key], params)
            return await cur.fetchall() if cur.description else []

    def check_workers(self, concurrency: int) -> None:
        """Refuse a worker that would starve the pool: each running run keeps one
        connection, and claims and result polling need one more."""
        pool = self._db.pool
        if pool is not None and pool.max_size < concurrency + 1:
            raise InvalidArgumentError(
                f"a worker with concurrency={concurrency} needs a pool of at least"
                f" {concurrency + 1} connections (this one has max_size={pool.max_size})"
            )

    # -- runs --------------------------------------------------------------------------

    async def create_run(
        self, workflow_id: str, workflow: str, input: Any
    ) -> tuple[RunRecord, bool]:
        params = {"id": workflow_id, "workflow": workflow, "input": to_json("input", input)}
        rows = await self._rows("CREATE", params)
        if rows:
            return _run(rows[0]), True
        existing = await self.get_run(workflow_id)
        assert existing is not None  # runs are never deleted
        return existing, False

    async def get_run(self, workflow_id: str) -> RunRecord | None:
        rows = await self._rows("GET", {"id": workflow_id})
        return _run(rows[0]) if rows else None

    async def claim_run(
        self, workflows: Sequence[str], owner: str, lease: float
    ) -> RunRecord | None:
        params = {"workflows": list(workflows), "owner": owner, "lease": lease, "ns": self._ns}
        if self._db.pool is None:  # one shared connection: the lock gets its own later
            rows = await self._rows("CLAIM", params)
            return _run(rows[0]) if rows else None
        if not self._ready:
            await self.migrate()
        # Claim on a connection that then stays with the run, taking its lock on the way.
        # Shielded: a claim cancelled mid-flight could leave a lock on a pooled connection.
        with anyio.CancelScope(shield=True):
            stack = AsyncExitStack()
            conn = await stack.enter_async_context(self._db.connection())
            try:
                with translate_errors():
                    cur = await conn.execute(self._sql["CLAIM_LOCK"], params)
                    row = await cur.fetchone()
            except BaseException:
                await _discard(stack, conn)  # it may hold a lock the claim took
                raise
            if row is None or not row[-2]:
                await stack.aclose()
        if row is None:
            return None
        run = _run(row)
        if row[-2]:
            self._prelocked[run.workflow_id] = _Held(owner, stack, conn, int(row[-1]))
        else:
            self._contended.add(run.workflow_id)
        return run

    async def renew_run(self, workflow_id: str, owner: str, lease: float) -> bool:
        rows = await self._rows("RENEW", {"id": workflow_id, "owner": owner, "lease": lease})
        return bool(rows)

    async def update_run(
        self,
        workflow_id: str,
        status: RunStatus,
        *,
        owner: str | None = None,
        output: Any = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        params: dict[str, Any] = {
            "id": workflow_id,
            "status": status,
            "owner": owner,
            "output": None if output is None else to_json("output", output),
            "error": None if error is None else to_json("error", error),
        }
        held = self._locks.get(workflow_id)
        if (
            held is not None
            and owner is not None
            and held.owner == owner
            and not held.released
            and status in TERMINAL
        ):
            rows = await self._rows("FINISH", {**params, "key": held.key})
            held.released = True
            return bool(rows and rows[0][0])
        return bool(await self._rows("UPDATE", params))

    async def request_cancel(self, workflow_id: str) -> RunRecord | None:
        rows = await self._rows("CANCEL", {"id": workflow_id})
        return _run(rows[0]) if rows else None

    async def run_history(self, workflow_id: str) -> list[StepAttempt]:
        rows = await self._rows("HISTORY", {"id": workflow_id})
        return [StepAttempt(*r) for r in rows]

    # -- steps -------------------------------------------------------------------------

    async def insert_step(self, workflow_id: str, name: str) -> StepRecord:
        rows = await self._rows("INSERT_STEP", {"id": workflow_id, "name": name})
        return StepRecord(*rows[0])

    async def get_step(self, workflow_id: str, name: str) -> StepRecord | None:
        rows = await self._rows("GET_STEP", {"id": workflow_id, "name": name})
        return StepRecord(*rows[0]) if rows else None

    async def create_attempt(self, workflow_id: str, name: str) -> int:
        rows = await self._rows("ATTEMPT", {"id": workflow_id, "name": name})
        return int(rows[0][0])

    async def mark_step(
        self,
        workflow_id: str,
        name: str,
        status: StepStatus,
        *,
        attempt: int | None = None,
        output: Any = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        params = {
            "id": workflow_id,
            "name": name,
            "status": status,
            "attempt": attempt,
            "output": None if output is None else to_json("step output", output),
            "error": None if error is None else json.dumps(error),
        }
        await self._rows("MARK", params)

    # -- the run lock ------------------------------------------------------------------

    async def lock_run(self, workflow_id: str, owner: str, ttl: float) -> bool:
        """A session advisory lock on a connection kept for the run, which then also
        carries the run's statements (``ttl`` unused: the lock lasts as long as that
        connection). ``claim_run`` usually took it already. A Database on a single
        connection gets a dedicated connection per run."""
        pre = self._prelocked.pop(workflow_id, None)
        if pre is not None:
            if pre.owner == owner and workflow_id not in self._locks:
                self._locks[workflow_id] = pre
                _executing.set(workflow_id)
                return True
            # This process still executes it elsewhere (its old connection died and the
            # claim took the lock anew): let the claim's lock and connection go.
            await self._release(pre)
            return False
        if workflow_id in self._locks:
            return False  # this process already executes it
        if workflow_id in self._contended:
            self._contended.discard(workflow_id)
            return False  # claim_run found the lock taken
        stack = AsyncExitStack()
        try:
            with translate_errors():
                if self._db.pool is None:
                    conn = await stack.enter_async_context(
                        await AsyncConnection.connect(self._db.dsn, autocommit=True)
                    )
                else:
                    conn = await stack.enter_async_context(self._db.connection())
                cur = await conn.execute(self._sql["LOCK"], {"ns": self._ns, "id": workflow_id})
                row = await cur.fetchone()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        if row is None or not row[0]:
            await stack.aclose()
            return False
        self._locks[workflow_id] = _Held(owner, stack, conn, int(row[1]))
        _executing.set(workflow_id)
        return True

    async def extend_lock(self, workflow_id: str, owner: str, ttl: float) -> bool:
        held = self._locks.get(workflow_id)
        return held is not None and held.owner == owner and not held.conn.closed

    async def unlock_run(self, workflow_id: str, owner: str) -> None:
        held = self._locks.get(workflow_id)
        if held is None or held.owner != owner:
            return
        del self._locks[workflow_id]
        if _executing.get() == workflow_id:
            _executing.set(None)
        await self._release(held)

    async def _release(self, held: _Held) -> None:
        with anyio.CancelScope(shield=True):
            try:
                if not held.released and not held.conn.closed:
                    with translate_errors():
                        await held.conn.execute(self._sql["UNLOCK"], {"key": held.key})
            except DatabaseError:
                # Whatever failed, the lock must not stay on a pooled connection: close it
                # (its session, and the lock, end with it).
                await _discard(held.stack, held.conn)
            else:
                await held.stack.aclose()

    async def close(self) -> None:
        """Release the run locks this process still holds."""
        for table in (self._locks, self._prelocked):
            while table:
                _, held = table.popitem()
                await self._release(held)

    def __repr__(self) -> str:
        return f"PgWorkflowStorage(schema={self.schema!r}, table_prefix={self.table_prefix!r})"


async def _discard(stack: AsyncExitStack, conn: AsyncConnection[Any]) -> None:
    """Close ``conn`` before handing it back (the pool drops closed connections)."""
    try:
        await conn.close()
    finally:
        await stack.aclose()


def _run(row: Any) -> RunRecord:
    return RunRecord(
        workflow_id=row[0],
        workflow=row[1],
        status=row[2],
        input=row[3],
        output=row[4],
        error=row[5],
        executions=row[6],
        cancel_requested=row[7],
        owner=row[8],
        created_at=row[9],
        updated_at=row[10],
    )
