"""PgWorkflowStorage: runs, steps and step history in PostgreSQL tables.

The tables are created on first use (under an advisory lock) in ``schema`` with
``table_prefix``. Runs are claimed with ``FOR UPDATE SKIP LOCKED`` and a lease. The run
locks are session advisory locks on one connection per storage (a RunSession), which also
carries the statements of the runs this process executes, batched across runs: the
claims, step attempts, step results and last updates of runs that execute side by side
each share one statement.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

from psycopg import AsyncConnection, sql

from .._core.errors import DatabaseError, InvalidArgumentError
from .._core.validate import check_name, check_schema, to_json
from .._pg.calls import render
from .._pg.database import Database, translate_errors
from .._pg.migrate import advisory_key
from .run_session import Batch, RunSession
from .storage import (
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

# The n oldest queued runs of the given workflows, or the oldest whose lease ran out,
# each with its run lock taken on the way (false: another process holds it). The sort makes
# the UPDATE finish before the first lock is taken: session locks outlive a rollback, so a
# statement failing halfway must not have taken any.
_CLAIM = f"""
    WITH c AS (
        UPDATE {{runs}}
        SET status = 'running', owner = %(owner)s, executions = executions + 1,
            lease_until = clock_timestamp() + %(lease)s * interval '1 second',
            updated_at = now()
        WHERE workflow_id = ANY (ARRAY(
            SELECT workflow_id FROM {{runs}}
            WHERE status IN ('queued', 'running') AND workflow = ANY (%(workflows)s)
              AND (status = 'queued' OR lease_until < clock_timestamp())
            ORDER BY created_at
            LIMIT %(n)s
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING {_RUN}, hashtextextended(%(ns)s || workflow_id, 0) AS k
    )
    SELECT {_RUN}, pg_try_advisory_lock(k), k
    FROM (SELECT * FROM c ORDER BY created_at, workflow_id) AS claimed
"""

_Q = {
    # New runs (batched: starts made at the same time share it).
    "CREATE": f"""
        INSERT INTO {{runs}} (workflow_id, workflow, status, input)
        SELECT v.i, v.w, 'queued', COALESCE(v.n, 'null')
        FROM jsonb_to_recordset(%(batch)s::jsonb) AS v(i text, w text, n jsonb)
        ON CONFLICT (workflow_id) DO NOTHING
        RETURNING {_RUN}
    """,
    "GET": f"SELECT {_RUN} FROM {{runs}} WHERE workflow_id = %(id)s",
    "CLAIM": _CLAIM,
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
    # Runs' last updates, each releasing its run lock (batched: see RunSession).
    "FINISH": """
        WITH v AS (
            SELECT * FROM jsonb_to_recordset(%(batch)s::jsonb)
                AS v(i text, s text, w text, o jsonb, e jsonb, k bigint)
        ), u AS (
            UPDATE {runs} r
            SET status = v.s, output = v.o, error = v.e, lease_until = NULL, updated_at = now()
            FROM v
            WHERE r.workflow_id = ANY (ARRAY(SELECT i FROM v))  -- keeps it on the index
              AND r.workflow_id = v.i AND r.owner = v.w
              AND r.status NOT IN ('completed', 'failed', 'cancelled')
            RETURNING r.workflow_id
        )
        SELECT v.i, v.i IN (SELECT workflow_id FROM u), pg_advisory_unlock(v.k) FROM v
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
    # Steps' next attempts (batched): the step is running, the history gains an attempt.
    "ATTEMPT": """
        WITH s AS (
            INSERT INTO {steps} AS s (workflow_id, name, status, attempts)
            SELECT i, n, 'running', 1 FROM unnest(%(ids)s::text[], %(names)s::text[]) AS v(i, n)
            ON CONFLICT (workflow_id, name) DO UPDATE
            SET status = 'running', attempts = s.attempts + 1, updated_at = now()
            RETURNING workflow_id, name, attempts
        )
        INSERT INTO {attempts} (workflow_id, step, attempt, status)
        SELECT workflow_id, name, attempts, 'running' FROM s
        RETURNING workflow_id, step, attempt
    """,
    # Steps' statuses, and with an attempt number that history entry too (batched).
    "MARK": """
        WITH v AS (
            SELECT * FROM jsonb_to_recordset(%(batch)s::jsonb)
                AS v(i text, n text, s text, a integer, o jsonb, e jsonb)
        ), s AS (
            UPDATE {steps} t SET status = v.s, output = v.o, error = v.e, updated_at = now()
            FROM v
            WHERE t.workflow_id = ANY (ARRAY(SELECT i FROM v))  -- keeps it on the index
              AND t.workflow_id = v.i AND t.name = v.n
            RETURNING t.workflow_id, t.name
        )
        UPDATE {attempts} t
        SET status = v.s, output = v.o, error = v.e,
            finished_at = CASE WHEN v.s IN ('succeeded', 'failed') THEN clock_timestamp() END
        FROM v
        WHERE t.workflow_id = ANY (ARRAY(SELECT i FROM v))
          AND t.workflow_id = v.i AND t.step = v.n AND t.attempt = v.a
          AND (v.i, v.n) IN (SELECT workflow_id, name FROM s)
    """,
}


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


# Items of the JSON-batched kinds are (key, JSON object text): the key names the row the
# item changes (no two equal keys share a statement), the texts make the batch.


def _json_batch(group: Hashable, items: list[Any]) -> dict[str, Any]:
    return {"batch": "[" + ",".join(text for _, text in items) + "]"}


def _key(item: tuple[Hashable, str]) -> Hashable:
    return item[0]


def _create_split(items: list[Any], rows: list[Any]) -> list[Any]:
    created = {r[0]: r for r in rows}
    return [created.get(workflow_id) for workflow_id, _ in items]


def _no_results(items: list[Any], rows: list[Any]) -> list[Any]:
    return [None] * len(items)


def _finish_split(items: list[Any], rows: list[Any]) -> list[Any]:
    updated = {r[0]: bool(r[1]) for r in rows}
    return [updated[workflow_id] for workflow_id, _ in items]


def _claim_params(group: Hashable, items: list[Any]) -> dict[str, Any]:
    owner, workflows, lease, ns = cast(tuple[str, tuple[str, ...], float, str], group)
    return {"owner": owner, "workflows": list(workflows), "lease": lease, "ns": ns, "n": len(items)}


def _claim_split(items: list[Any], rows: list[Any]) -> list[Any]:
    return list(rows) + [None] * (len(items) - len(rows))


def _attempt_params(group: Hashable, items: list[Any]) -> dict[str, Any]:
    return {"ids": [i for i, _ in items], "names": [n for _, n in items]}


def _attempt_split(items: list[Any], rows: list[Any]) -> list[Any]:
    attempts = {(r[0], r[1]): r[2] for r in rows}
    return [attempts[item] for item in items]


_BATCHES = {
    "CREATE": Batch(_json_batch, _create_split, key=_key),
    "CLAIM": Batch(_claim_params, _claim_split, alone_on_failure=False),
    "ATTEMPT": Batch(_attempt_params, _attempt_split, key=lambda item: item),
    "MARK": Batch(_json_batch, _no_results, key=_key),
    "FINISH": Batch(_json_batch, _finish_split, key=_key),
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
        self._sql = render(_Q, self._names)
        self._ready = False
        self._ns = f"{self.schema}.{table_prefix}:"  # scopes the run locks' keys
        self._session = RunSession(self._open_session, self._sql, _BATCHES)
        self._starts = RunSession(self._borrow, self._sql, _BATCHES, keep=False)
        self._locks: dict[str, _Held] = {}  # run locks of runs this process executes
        self._prelocked: dict[str, _Held] = {}  # taken by claim_run, for lock_run
        self._contended: set[str] = set()  # claimed, but another process holds the lock
        self._serving = 0  # worker blocks using this storage

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

    async def _rows(self, key: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement: through the session when called by the task executing that
        run (and only while the run's lock is still there), else on a lent connection."""
        if not self._ready:
            await self.migrate()
        held = self._held(params.get("id", ""))
        if held is not None:
            rows, _ = await self._session.call(key, params, generation=held.generation)
            return rows  # type: ignore[no-any-return]
        return await self._unshared(key, params)

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
        text = to_json("input", input)
        if not self._ready:
            await self.migrate()
        item = f'{{"i":{json.dumps(workflow_id)},"w":{json.dumps(workflow)},"n":{text}}}'
        row, _ = await self._starts.call("CREATE", (workflow_id, item))
        if row is not None:
            return _run(row), True
        existing = await self.get_run(workflow_id)
        assert existing is not None  # runs are never deleted
        return existing, False

    async def get_run(self, workflow_id: str) -> RunRecord | None:
        rows = await self._rows("GET", {"id": workflow_id})
        return _run(rows[0]) if rows else None

    async def claim_run(
        self, workflows: Sequence[str], owner: str, lease: float
    ) -> RunRecord | None:
        """Claims made at the same time share one statement, which takes each run's lock
        on the session's connection."""
        if not self._ready:
            await self.migrate()
        group = (owner, tuple(workflows), float(lease), self._ns)
        row, generation = await self._session.call("CLAIM", None, group=group)
        if row is None:
            return None
        run = _run(row)
        if row[-2]:
            self._prelocked[run.workflow_id] = _Held(owner, int(row[-1]), generation)
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
            item = (
                f'{{"i":{json.dumps(workflow_id)},"s":"{status}","w":{json.dumps(owner)},'
                f'"o":{out or "null"},"e":{err or "null"},"k":{held.key}}}'
            )
            updated, _ = await self._session.call(
                "FINISH", (workflow_id, item), generation=held.generation
            )
            held.released = True
            return bool(updated)
        params = {"id": workflow_id, "status": status, "owner": owner, "output": out, "error": err}
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
        held = self._held(workflow_id)
        if held is not None:  # shares a statement with other runs' steps
            attempt, _ = await self._session.call(
                "ATTEMPT", (workflow_id, name), generation=held.generation
            )
            return int(attempt)
        rows = await self._unshared("ATTEMPT", _attempt_params(None, [(workflow_id, name)]))
        return int(rows[0][2])

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
        out = None if output is None else to_json("step output", output)
        err = None if error is None else to_json("step error", error)
        item = (
            f'{{"i":{json.dumps(workflow_id)},"n":{json.dumps(name)},"s":"{status}",'
            f'"a":{"null" if attempt is None else int(attempt)},'
            f'"o":{out or "null"},"e":{err or "null"}}}'
        )
        held = self._held(workflow_id)
        if held is not None:
            await self._session.call(
                "MARK", ((workflow_id, name), item), generation=held.generation
            )
        else:
            await self._unshared("MARK", _json_batch(None, [(None, item)]))

    async def _unshared(self, key: str, params: dict[str, Any]) -> list[Any]:
        """One statement on a lent connection (outside the session)."""
        if not self._ready:
            await self.migrate()
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql[key], params)
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
        rows, generation = await self._session.call("LOCK", {"ns": self._ns, "id": workflow_id})
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
            await self._session.call("UNLOCK", {"key": held.key}, generation=held.generation)
        except DatabaseError:
            # The lock must not outlive its run: unless it is gone already (with its
            # connection), drop the session's connection and every lock on it (runs still
            # executing learn it at their next call).
            await self._session.reset(held.generation)

    async def close(self) -> None:
        """Release the run locks this process still holds, and the session."""
        for table in (self._locks, self._prelocked):
            while table:
                _, held = table.popitem()
                await self._release(held)
        await self._session.close()

    def __repr__(self) -> str:
        return f"PgWorkflowStorage(schema={self.schema!r}, table_prefix={self.table_prefix!r})"


def _run(row: Any) -> RunRecord:
    return RunRecord(*row[:11])  # the columns of _RUN, in RunRecord's field order
