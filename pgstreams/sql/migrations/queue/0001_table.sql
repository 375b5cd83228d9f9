-- One queue's messages (the table PgQueue.create made before queue tables were versioned).
-- Placeholders: {table} the queue's table, {ready_idx} its index of deliverable messages;
-- braces that belong to SQL are doubled.
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
