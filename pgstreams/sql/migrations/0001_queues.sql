-- Registry of PgQueue queues and their sharded completion counters.
-- {schema} is substituted as a quoted identifier; every other name is fixed.

CREATE TABLE IF NOT EXISTS {schema}.queues (
    name          text PRIMARY KEY,
    max_attempts  integer,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per (queue, shard); a consumer bumps the shard picked by its backend pid, so
-- concurrent consumers rarely wait on the same counter row.
CREATE TABLE IF NOT EXISTS {schema}.queue_stats (
    queue      text    NOT NULL REFERENCES {schema}.queues (name) ON DELETE CASCADE,
    shard      integer NOT NULL,
    completed  bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, shard)
);
