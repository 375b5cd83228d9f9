"""PgWorkflowStorage: runs, steps and step history in PostgreSQL tables.

The tables are created on first use (under an advisory lock) in ``schema`` with
``table_prefix``. Runs are claimed with ``FOR UPDATE SKIP LOCKED`` and a lease; the run
lock is a session advisory lock held on a connection set aside for the run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio
from psycopg import AsyncConnection, sql

from ._db import Database, translate_errors
from ._errors import DatabaseError, InvalidArgumentError
from ._migrate import advisory_key
from ._validate import check_name, check_schema, to_json
from ._workflow_storage import RunRecord, RunStatus, StepAttempt, StepRecord, StepStatus

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

_Q = {
    "CREATE": f"""
        INSERT INTO {{runs}} (workflow_id, workflow, status, input)
        VALUES (%(id)s, %(workflow)s, 'queued', %(input)s::jsonb)
        ON CONFLICT (workflow_id) DO NOTHING
        RETURNING {_RUN}
    """,
    "GET": f"SELECT {_RUN} FROM {{runs}} WHERE workflow_id = %(id)s",
    "CLAIM": f"""
        UPDATE {{runs}}
        SET status = 'running', owner = %(owner)s, executions = executions + 1,
            lease_until = clock_timestamp() + %(lease)s * interval '1 second', updated_at = now()
        WHERE workflow_id = (
            SELECT workflow_id FROM {{runs}}
            WHERE status IN ('queued', 'running') AND workflow = ANY (%(workflows)s)
              AND (status = 'queued' OR lease_until < clock_timestamp())
            ORDER BY created_at
            LIMIT 1
            FOR UPDATE SKIP LOCKED
        )
        RETURNING {_RUN}
    """,
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
        self._sql = {
            key: sql.SQL(text).format(**self._names).as_string().encode()  # type: ignore[arg-type,unused-ignore]
            for key, text in _Q.items()
        }
        self._ready = False
        # Run locks held by this process: workflow id -> (owner, its connection, key).
        self._locks: dict[str, tuple[str, AsyncExitStack, AsyncConnection[Any], int]] = {}

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
        """Run one statement: on the connection that holds the run's lock when this process
        executes the run (so a run needs no second connection), else on a lent one."""
        if not self._ready:
            await self.migrate()
        held = self._locks.get(params.get("id", ""))
        if held is not None and not held[2].closed:
            with translate_errors():
                cur = await held[2].execute(self._sql[key], params)
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
        params = {"workflows": list(workflows), "owner": owner, "lease": lease}
        rows = await self._rows("CLAIM", params)
        return _run(rows[0]) if rows else None

    async def renew_run(self, workflow_id: str, owner: str, lease: float) -> bool:
        rows = await self._rows("RENEW", {"id": workflow_id, "owner": owner, "lease": lease})
        return bool(rows)

    async def cancel_requested(self, workflow_id: str) -> bool:
        run = await self.get_run(workflow_id)
        return run is not None and run.cancel_requested

    async def update_run(
        self,
        workflow_id: str,
        status: RunStatus,
        *,
        owner: str | None = None,
        output: Any = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        params = {
            "id": workflow_id,
            "status": status,
            "owner": owner,
            "output": None if output is None else to_json("output", output),
            "error": None if error is None else to_json("error", error),
        }
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
        connection). A Database on a single connection gets a dedicated one per run."""
        if workflow_id in self._locks:
            return False  # this process already executes it
        key = advisory_key("workflow-run", self.schema, self.table_prefix, workflow_id)
        stack = AsyncExitStack()
        try:
            if self._db.pool is None:
                conn = await stack.enter_async_context(
                    await AsyncConnection.connect(self._db.dsn, autocommit=True)
                )
            else:
                conn = await stack.enter_async_context(self._db.connection())
            with translate_errors():
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", [key])
                row = await cur.fetchone()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        if row is None or not row[0]:
            await stack.aclose()
            return False
        self._locks[workflow_id] = (owner, stack, conn, key)
        return True

    async def extend_lock(self, workflow_id: str, owner: str, ttl: float) -> bool:
        held = self._locks.get(workflow_id)
        return held is not None and held[0] == owner and not held[2].closed

    async def unlock_run(self, workflow_id: str, owner: str) -> None:
        held = self._locks.get(workflow_id)
        if held is None or held[0] != owner:
            return
        del self._locks[workflow_id]
        _, stack, conn, key = held
        with anyio.CancelScope(shield=True):
            try:
                if not conn.closed:
                    with translate_errors():
                        await conn.execute("SELECT pg_advisory_unlock(%s)", [key])
            except DatabaseError:
                pass  # the connection is going back broken: its session and lock end with it
            finally:
                await stack.aclose()

    async def close(self) -> None:
        for workflow_id, held in list(self._locks.items()):
            await self.unlock_run(workflow_id, held[0])

    def __repr__(self) -> str:
        return f"PgWorkflowStorage(schema={self.schema!r}, table_prefix={self.table_prefix!r})"


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
