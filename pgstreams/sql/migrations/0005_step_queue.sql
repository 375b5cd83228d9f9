-- PgStepQueue: workflow steps as tasks in named queues, per namespace. {schema} is
-- substituted as a quoted identifier; braces that belong to SQL are doubled.
CREATE TABLE IF NOT EXISTS {schema}.step_tasks (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace     text        NOT NULL,
    queue         text        NOT NULL,
    workflow_id   text        NOT NULL,
    step_name     text        NOT NULL,
    input         jsonb,
    prev_results  jsonb       NOT NULL DEFAULT '{{}}',
    priority      integer     NOT NULL DEFAULT 0,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    claimed_by    text,
    claimed_at    timestamptz,
    claims        integer     NOT NULL DEFAULT 0,
    result        jsonb,
    error         jsonb,
    duration_ms   double precision,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX IF NOT EXISTS step_tasks_pending
    ON {schema}.step_tasks (namespace, queue, priority DESC, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS step_tasks_running
    ON {schema}.step_tasks (namespace, claimed_at) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS step_tasks_by_queue ON {schema}.step_tasks (namespace, queue, status);
