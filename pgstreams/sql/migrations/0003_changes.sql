-- Change data capture: the change log, capture settings, durable consumers and the
-- trigger function. {schema} is substituted as a quoted identifier; braces that belong to
-- SQL are doubled.

-- One row per captured change. txid is the writing (top-level) transaction: readers
-- deliver, round by round, the changes of the transactions that committed between two
-- snapshots, so a transaction that commits late can never slip in behind a reader.
CREATE TABLE IF NOT EXISTS {schema}.changes (
    stream  text        NOT NULL,
    id      bigint      GENERATED ALWAYS AS IDENTITY,
    txid    xid8        NOT NULL DEFAULT pg_current_xact_id(),
    at      timestamptz NOT NULL DEFAULT statement_timestamp(),
    op      text        NOT NULL,
    pk      jsonb,
    new     jsonb,
    old     jsonb,
    PRIMARY KEY (id)
);
-- Two indexes, each the only one for its column: reads by id take the primary key, reads
-- by transaction id this one, whatever the statistics say (the stream is a filter: all
-- streams share one id sequence). Writers pay for two index entries per change.
CREATE INDEX IF NOT EXISTS changes_by_txid ON {schema}.changes (txid);

-- What install_trigger() set up for each stream (kept after remove_trigger()).
CREATE TABLE IF NOT EXISTS {schema}.change_captures (
    stream        text PRIMARY KEY,
    operations    text[]      NOT NULL,
    columns       jsonb,
    notify        text        NOT NULL,
    capture       text        NOT NULL DEFAULT 'statement',
    retention     interval,
    installed_at  timestamptz NOT NULL DEFAULT now(),
    removed_at    timestamptz
);

-- Durable consumers: the position after the last change the consumer finished with. A
-- round delivers the changes committed between prev_snap and cur_snap in id order (none
-- above top_id); after_id is the last one finished.
CREATE TABLE IF NOT EXISTS {schema}.change_consumers (
    stream      text        NOT NULL,
    name        text        NOT NULL,
    prev_snap   pg_snapshot NOT NULL,
    cur_snap    pg_snapshot NOT NULL,
    after_id    bigint      NOT NULL DEFAULT 0,
    top_id      bigint      NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, name)
);

-- Trigger arguments (both capture functions): stream key, NOTIFY channel ('' = none),
-- captured columns as a text[] literal ('' = all), primary-key columns as a text[] literal,
-- and the primary key's column when it has just one ('' otherwise). The common case -- all
-- columns, a one-column key -- needs no array parsing per call.

-- Statement-level capture: one INSERT ... SELECT per statement from the transition tables.
CREATE OR REPLACE FUNCTION {schema}.capture_changes() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {schema}.changes (stream, op, pk, new)
        SELECT TG_ARGV[0], 'insert',
               CASE WHEN TG_ARGV[4] <> '' THEN jsonb_build_object(TG_ARGV[4], j -> TG_ARGV[4])
                    WHEN TG_ARGV[3] = '{{}}' THEN NULL
                    ELSE {schema}.capture_pick(j, TG_ARGV[3]::text[]) END,
               CASE WHEN TG_ARGV[2] = '' THEN j ELSE {schema}.capture_pick(j, TG_ARGV[2]::text[]) END
        FROM new_rows n, LATERAL to_jsonb(n) AS j;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {schema}.changes (stream, op, pk, old)
        SELECT TG_ARGV[0], 'delete',
               CASE WHEN TG_ARGV[4] <> '' THEN jsonb_build_object(TG_ARGV[4], j -> TG_ARGV[4])
                    WHEN TG_ARGV[3] = '{{}}' THEN NULL
                    ELSE {schema}.capture_pick(j, TG_ARGV[3]::text[]) END,
               CASE WHEN TG_ARGV[2] = '' THEN j ELSE {schema}.capture_pick(j, TG_ARGV[2]::text[]) END
        FROM old_rows o, LATERAL to_jsonb(o) AS j;
    ELSE
        -- Both transition tables receive an updated row's two versions in the same call,
        -- so their scan positions pair them (a join on the key would lose rows whose key
        -- the UPDATE changed).
        INSERT INTO {schema}.changes (stream, op, pk, new, old)
        SELECT TG_ARGV[0], 'update',
               CASE WHEN TG_ARGV[4] <> '' THEN jsonb_build_object(TG_ARGV[4], a.j -> TG_ARGV[4])
                    WHEN TG_ARGV[3] = '{{}}' THEN NULL
                    ELSE {schema}.capture_pick(a.j, TG_ARGV[3]::text[]) END,
               CASE WHEN TG_ARGV[2] = '' THEN a.j ELSE {schema}.capture_pick(a.j, TG_ARGV[2]::text[]) END,
               CASE WHEN TG_ARGV[2] = '' THEN b.j ELSE {schema}.capture_pick(b.j, TG_ARGV[2]::text[]) END
        FROM (SELECT row_number() OVER () AS rn, to_jsonb(n) AS j FROM new_rows n) a
        JOIN (SELECT row_number() OVER () AS rn, to_jsonb(o) AS j FROM old_rows o) b
          ON a.rn = b.rn;
    END IF;
    IF FOUND AND TG_ARGV[1] <> '' THEN
        PERFORM pg_notify(TG_ARGV[1], '');
    END IF;
    RETURN NULL;
END
$fn$;

-- Row-level capture: one INSERT per row. For single-row statements -- most OLTP writes --
-- it costs the writer less than the statement-level kind (no transition tables).
CREATE OR REPLACE FUNCTION {schema}.capture_row_changes() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    n jsonb;
    o jsonb;
BEGIN
    IF TG_OP <> 'DELETE' THEN n := to_jsonb(NEW); END IF;
    IF TG_OP <> 'INSERT' THEN o := to_jsonb(OLD); END IF;
    INSERT INTO {schema}.changes (stream, op, pk, new, old)
    VALUES (TG_ARGV[0], lower(TG_OP),
            CASE WHEN TG_ARGV[4] <> '' THEN jsonb_build_object(TG_ARGV[4], coalesce(n, o) -> TG_ARGV[4])
                    WHEN TG_ARGV[3] = '{{}}' THEN NULL
                    ELSE {schema}.capture_pick(coalesce(n, o), TG_ARGV[3]::text[]) END,
            CASE WHEN TG_ARGV[2] = '' THEN n ELSE {schema}.capture_pick(n, TG_ARGV[2]::text[]) END,
            CASE WHEN TG_ARGV[2] = '' THEN o ELSE {schema}.capture_pick(o, TG_ARGV[2]::text[]) END);
    IF TG_ARGV[1] <> '' THEN
        PERFORM pg_notify(TG_ARGV[1], '');
    END IF;
    RETURN NULL;
END
$fn$;

-- The row image restricted to ``keys`` (NULL for no image: STRICT).
CREATE OR REPLACE FUNCTION {schema}.capture_pick(j jsonb, keys text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
    SELECT coalesce(jsonb_object_agg(k, j -> k), '{{}}'::jsonb) FROM unnest(keys) AS k
$fn$;
