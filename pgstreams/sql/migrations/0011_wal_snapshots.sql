-- WAL capture: the progress of a durable consumer's snapshot (snapshot=True, or a slot
-- re-created after it was lost). A row exists while the snapshot is unfinished; it names
-- the next table to read and the primary key to read after (NULL: from the start), both
-- saved once every row of a chunk has been handled. {schema} is substituted as a quoted
-- identifier; braces that belong to SQL are doubled.
CREATE TABLE IF NOT EXISTS {schema}.wal_snapshots (
    slot        text PRIMARY KEY,
    tables      text[] NOT NULL,
    table_index int NOT NULL DEFAULT 0,
    after       text[],
    started_at  timestamptz NOT NULL DEFAULT now()
);
