-- Settings pgstreams keeps for pgmq queues (pgmq itself has no dead-letter limit).
-- {schema} is substituted as a quoted identifier.

CREATE TABLE IF NOT EXISTS {schema}.pgmq_queues (
    name          text PRIMARY KEY,
    max_attempts  integer,
    created_at    timestamptz NOT NULL DEFAULT now()
);
