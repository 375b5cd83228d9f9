-- SQL of PgWorkflowStorage (the tables themselves are made by the migrations).
--
-- {runs}, {steps} and {attempts} are the storage's tables. Values are always named
-- parameters. Statements that runs executing side by side share (create, claim, attempt,
-- mark, finish) take one row per call: create, mark and finish from a jsonb array of
-- objects the driver's adapter serialises (one key per column), attempt from text arrays.
-- JSON values (inputs, outputs, errors) travel inside it as JSON text, cast to jsonb here.
--
-- Run locks are session advisory locks. {run_key} is a run lock's key computed from the
-- text ns || workflow_id (the library's one key scheme, _pg/locks.py). The locks live on
-- the storage's session connection, so claim, lock, unlock and finish (which lets the lock
-- go) run there; holds_lock lets a statement run on another connection check that the
-- lock is still held (see pg.py).
--
-- _run, the columns of a run, is in RunRecord's field order.

-- name: _run
workflow_id, workflow, status, input, output, error, executions, cancel_requested, owner,
created_at, updated_at

-- name: create
-- New runs (shared by starts made at the same time); a run that exists is left alone.
INSERT INTO {runs} (workflow_id, workflow, status, input)
SELECT v.i, v.w, 'queued', COALESCE(v.n::jsonb, 'null')
FROM jsonb_to_recordset(%(batch)s) AS v(i text, w text, n text)
ON CONFLICT (workflow_id) DO NOTHING
RETURNING {_run}

-- name: get
SELECT {_run} FROM {runs} WHERE workflow_id = %(id)s

-- name: claim
-- The n oldest queued runs of the given workflows, or the oldest whose lease ran out, each
-- with its run lock taken on the way (false: another process holds it). The sort makes the
-- UPDATE finish before the first lock is taken: session locks outlive a rollback, so a
-- statement failing halfway must not have taken any.
WITH c AS (
    UPDATE {runs}
    SET status = 'running', owner = %(owner)s, executions = executions + 1,
        lease_until = clock_timestamp() + %(lease)s * interval '1 second',
        updated_at = now()
    WHERE workflow_id = ANY (ARRAY(
        SELECT workflow_id FROM {runs}
        WHERE status IN ('queued', 'running') AND workflow = ANY (%(workflows)s)
          AND (status = 'queued' OR lease_until < clock_timestamp())
        ORDER BY created_at
        LIMIT %(n)s
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING {_run}, {run_key} AS k
)
SELECT {_run}, pg_try_advisory_lock(k), k
FROM (SELECT * FROM c ORDER BY created_at, workflow_id) AS claimed

-- name: lock
SELECT pg_try_advisory_lock(k), k
FROM (SELECT {run_key} AS k FROM (SELECT %(id)s::text AS workflow_id) AS run) AS key

-- name: unlock
SELECT pg_advisory_unlock(%(key)s)

-- name: holds_lock
-- Whether the backend pid still holds the run lock key (a bigint advisory lock shows in
-- pg_locks as its high and low halves).
SELECT EXISTS (
    SELECT FROM pg_locks
    WHERE locktype = 'advisory' AND pid = %(pid)s AND granted AND objsubid = 1
      AND classid = ((%(key)s::bigint >> 32) & 4294967295)::oid
      AND objid = (%(key)s::bigint & 4294967295)::oid
)

-- name: renew
UPDATE {runs} SET lease_until = clock_timestamp() + %(lease)s * interval '1 second'
WHERE workflow_id = %(id)s AND owner = %(owner)s AND status = 'running'
RETURNING cancel_requested

-- name: update
UPDATE {runs}
SET status = %(status)s, output = %(output)s::jsonb, error = %(error)s::jsonb,
    lease_until = NULL, updated_at = now()
WHERE workflow_id = %(id)s
  AND (%(owner)s::text IS NULL
       OR (owner = %(owner)s AND status NOT IN ('completed', 'failed', 'cancelled')))
RETURNING 1

-- name: finish
-- Runs' last updates (shared), each letting its run lock go. The aggregate reads every row
-- the UPDATE returns before the first lock is let go: should the UPDATE fail (a lock wait
-- timed out), no lock is gone, as a lock let go is not taken back by the rollback.
WITH v AS (
    SELECT * FROM jsonb_to_recordset(%(batch)s)
        AS v(i text, s text, w text, o text, e text, k bigint)
), u AS (
    UPDATE {runs} r
    SET status = v.s, output = v.o::jsonb, error = v.e::jsonb, lease_until = NULL,
        updated_at = now()
    FROM v
    WHERE r.workflow_id = ANY (ARRAY(SELECT i FROM v))  -- keeps it on the index
      AND r.workflow_id = v.i AND r.owner = v.w
      AND r.status NOT IN ('completed', 'failed', 'cancelled')
    RETURNING r.workflow_id
), done AS (
    SELECT array_agg(workflow_id) AS ids FROM u
)
SELECT v.i, COALESCE(v.i = ANY (done.ids), false), pg_advisory_unlock(v.k) FROM v, done

-- name: cancel
UPDATE {runs}
SET status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
    cancel_requested = cancel_requested OR status = 'running', updated_at = now()
WHERE workflow_id = %(id)s
RETURNING {_run}

-- name: retry
-- A failed or cancelled run back to the queue (the runs trigger wakes the idle workers);
-- its unfinished steps get a fresh attempt budget. Nothing when the run is in any other
-- state.
WITH r AS (
    UPDATE {runs}
    SET status = 'queued', output = NULL, error = NULL, cancel_requested = false,
        owner = NULL, lease_until = NULL, updated_at = now()
    WHERE workflow_id = %(id)s AND status IN ('failed', 'cancelled')
    RETURNING {_run}
), s AS (
    UPDATE {steps}
    SET status = 'scheduled', retried_attempts = attempts, updated_at = now()
    WHERE workflow_id = %(id)s AND status <> 'succeeded' AND EXISTS (SELECT FROM r)
)
SELECT * FROM r

-- name: history
SELECT workflow_id, step, attempt, status, output, error, started_at, finished_at
FROM {attempts} WHERE workflow_id = %(id)s ORDER BY id

-- name: insert_step
WITH i AS (
    INSERT INTO {steps} (workflow_id, name, status) VALUES (%(id)s, %(name)s, 'scheduled')
    ON CONFLICT (workflow_id, name) DO NOTHING
    RETURNING workflow_id, name, status, attempts, output, error, retried_attempts
)
SELECT * FROM i
UNION ALL
SELECT workflow_id, name, status, attempts, output, error, retried_attempts FROM {steps}
WHERE workflow_id = %(id)s AND name = %(name)s AND NOT EXISTS (SELECT FROM i)

-- name: get_step
SELECT workflow_id, name, status, attempts, output, error, retried_attempts FROM {steps}
WHERE workflow_id = %(id)s AND name = %(name)s

-- name: attempt
-- Steps' next attempts (shared): the step is running, the history gains an attempt.
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

-- name: mark
-- Steps' statuses, and with an attempt number that history entry too (shared).
WITH v AS (
    SELECT * FROM jsonb_to_recordset(%(batch)s)
        AS v(i text, n text, s text, a integer, o text, e text)
), s AS (
    UPDATE {steps} t SET status = v.s, output = v.o::jsonb, error = v.e::jsonb,
        updated_at = now()
    FROM v
    WHERE t.workflow_id = ANY (ARRAY(SELECT i FROM v))  -- keeps it on the index
      AND t.workflow_id = v.i AND t.name = v.n
    RETURNING t.workflow_id, t.name
)
UPDATE {attempts} t
SET status = v.s, output = v.o::jsonb, error = v.e::jsonb,
    finished_at = CASE WHEN v.s IN ('succeeded', 'failed') THEN clock_timestamp() END
FROM v
WHERE t.workflow_id = ANY (ARRAY(SELECT i FROM v))
  AND t.workflow_id = v.i AND t.step = v.n AND t.attempt = v.a
  AND (v.i, v.n) IN (SELECT workflow_id, name FROM s)

-- name: session_open
-- The run session's connection: a statement that waits on a lock longer than this fails
-- (and is run elsewhere) rather than stall the other runs' statements behind it.
SELECT set_config('lock_timeout', %(lock_timeout)s, false)

-- name: session_drop
-- Before the run session's connection goes back to the pool: no lock and no setting of
-- ours stays with it.
SELECT pg_advisory_unlock_all();
RESET lock_timeout

-- Retention (the workflow engine's prune; see pg_upkeep.py) ----------------------------

-- name: prune
-- One batch: the n runs that ended longest ago, if before the cutoff (on the runs_ended
-- index), deleted with their steps and attempts. A row another statement holds is left
-- for the next pass.
WITH doomed AS (
    SELECT workflow_id FROM {runs}
    WHERE status IN ('completed', 'failed', 'cancelled')
      AND updated_at < now() - %(older_than)s * interval '1 second'
    ORDER BY updated_at
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {runs} WHERE workflow_id = ANY (ARRAY(SELECT workflow_id FROM doomed))
    RETURNING workflow_id
), steps AS (  -- ANY (ARRAY(...)) keeps each delete on its table's key index
    DELETE FROM {steps} WHERE workflow_id = ANY (ARRAY(SELECT workflow_id FROM gone))
), attempts AS (
    DELETE FROM {attempts} WHERE workflow_id = ANY (ARRAY(SELECT workflow_id FROM gone))
)
SELECT count(*) FROM gone

-- name: prune_lock
-- Automatic retention: one process at a time (a session lock, let go with unlock).
SELECT pg_try_advisory_lock(%(key)s)
