-- Workflow runs, their steps and every step attempt (the tables PgWorkflowStorage made on
-- first use before they were versioned). Placeholders: {runs}, {steps}, {attempts} the
-- tables (schema and table prefix applied), {runs_open} the index of open runs.
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
