-- A database as pgstreams left it before every table was versioned (commit 792519b): the
-- main set's bookkeeping and tables up to 0005, and the per-queue, workflow and snapshot
-- tables created on first use with inline DDL (copied verbatim from that code), with no
-- record of their version. Then data in every table, as the library wrote it.
-- Placeholders are psycopg.sql identifiers; values are literals (fixture data).

-- name: runner
-- The old runner's own table.
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.schema_version (
 version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())

-- name: queue
-- PgQueue.create: sql.CREATE, then REGISTER_KEEP and REGISTER_SHARDS (16 shards).
CREATE TABLE IF NOT EXISTS {table} (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload      jsonb       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{{}}',
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    visible_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    lease        bigint,
    dead_at      timestamptz,
    last_error   text
);
CREATE INDEX IF NOT EXISTS {ready_idx} ON {table} (visible_at, id) WHERE dead_at IS NULL;
INSERT INTO {schema}.queues (name, max_attempts) VALUES ({name}, NULL)
ON CONFLICT (name) DO NOTHING;
INSERT INTO {schema}.queue_stats (queue, shard)
SELECT {name}, g FROM generate_series(0, 16 - 1) AS g
ON CONFLICT DO NOTHING

-- name: workflows
-- PgWorkflowStorage.migrate: CREATE SCHEMA, then _SCHEMA.
CREATE SCHEMA IF NOT EXISTS {schema};
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
)

-- name: snapshots
-- SnapshotStore: CREATE SCHEMA, then _TABLE.
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {table} (
    prefix      text        NOT NULL,
    id          text        NOT NULL,
    snapshot    jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (prefix, id)
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (prefix, updated_at DESC)

-- name: queue_data
-- A pending message, a leased one (its lease a transaction id), a dead one, and
-- completions counted on one shard.
INSERT INTO {table} (payload, headers, attempts, lease, visible_at, dead_at, last_error)
VALUES ('{{"n": 1}}', '{{}}', 0, NULL, now() - interval '1 minute', NULL, NULL),
       ('{{"n": 2}}', '{{"h": "x"}}', 1, 4242, now() + interval '1 hour', NULL, NULL),
       ('{{"n": 3}}', '{{}}', 3, NULL, now(), now(), 'boom');
UPDATE {schema}.queue_stats SET completed = 7 WHERE queue = {name} AND shard = 3

-- name: workflow_data
-- A completed run with a step retried once, a queued run, a running one.
INSERT INTO {runs} (workflow_id, workflow, status, input, output, executions, owner)
VALUES ('r1', 'signup', 'completed', '{{"user": 1}}', '{{"ok": true}}', 1, NULL),
       ('r2', 'signup', 'queued', '{{"user": 2}}', NULL, 0, NULL),
       ('r3', 'signup', 'running', 'null', NULL, 1, 'worker-1');
INSERT INTO {steps} (workflow_id, name, status, attempts, output)
VALUES ('r1', 'send', 'succeeded', 2, '"sent"');
INSERT INTO {attempts} (workflow_id, step, attempt, status, output, error, finished_at)
VALUES ('r1', 'send', 1, 'failed', NULL, '{{"message": "smtp down"}}', now()),
       ('r1', 'send', 2, 'succeeded', '"sent"', NULL, now())

-- name: snapshot_data
INSERT INTO {table} (prefix, id, snapshot)
VALUES ('', 'order-1', '{{"step": 2}}'), ('app:', 'user-1', '{{"name": "ada"}}')

-- name: main_data
-- The main set's tables: a pgmq queue's settings, captured changes with their capture and
-- a durable consumer, a schedule with a done and a pending tick, a step task.
INSERT INTO {schema}.pgmq_queues (name, max_attempts) VALUES ('orders', 5);
INSERT INTO {schema}.change_captures (stream, operations, columns, notify)
VALUES ('public.users', ARRAY['insert', 'update'], NULL, 'statement');
INSERT INTO {schema}.changes (stream, op, pk, new, old)
VALUES ('public.users', 'insert', '{{"id": 1}}', '{{"id": 1, "name": "ada"}}', NULL),
       ('public.users', 'update', '{{"id": 1}}', '{{"id": 1, "name": "bob"}}',
        '{{"id": 1, "name": "ada"}}');
INSERT INTO {schema}.change_consumers (stream, name, prev_snap, cur_snap, after_id, top_id)
VALUES ('public.users', 'search', pg_current_snapshot(), pg_current_snapshot(), 1, 2);
INSERT INTO {schema}.schedules (id, name, interval_us, timezone, anchor, max_catch_up, jitter,
                                overlap, metadata, next_at)
VALUES ('nightly', 'Nightly', 86400000000, 'UTC', '2024-01-01T00:00:00Z', 1, 0, 'skip',
        '{{"team": "ops"}}', '2024-01-03T00:00:00Z');
INSERT INTO {schema}.schedule_ticks (schedule_id, scheduled_at, due_at, kind, serial, status,
                                     metadata, created_at, fired_at, done_at)
VALUES ('nightly', '2024-01-01T00:00:00Z', '2024-01-01T00:00:00Z', 'scheduled', true, 'done',
        '{{}}', '2024-01-01T00:00:00Z', '2024-01-01T00:00:01Z', '2024-01-01T00:00:02Z'),
       ('nightly', '2024-01-02T00:00:00Z', '2024-01-02T00:00:00Z', 'scheduled', true,
        'pending', '{{}}', '2024-01-02T00:00:00Z', NULL, NULL);
INSERT INTO {schema}.step_tasks (namespace, queue, workflow_id, step_name, input, priority)
VALUES ('default', 'fast', 'r2', 'send', '{{"to": "ada"}}', 5)
