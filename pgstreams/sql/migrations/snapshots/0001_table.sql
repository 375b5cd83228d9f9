-- Snapshots by (store prefix, id) (the table SnapshotStore made on first use before it was
-- versioned). Placeholders: {table} the table, {index} its index by recency.
CREATE TABLE IF NOT EXISTS {table} (
    prefix      text        NOT NULL,
    id          text        NOT NULL,
    snapshot    jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (prefix, id)
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (prefix, updated_at DESC);
