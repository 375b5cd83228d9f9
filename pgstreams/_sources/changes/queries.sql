-- SQL of PgChangeStream. {changes}, {captures} and {consumers} are the library's tables;
-- values are always %(name)s parameters.
--
-- Transaction ids travel as text (xid8 has no binary adapter in psycopg): ::text::xid8 on
-- the way in, ::text on the way out.
--
-- The ddl_ blocks are trigger DDL, composed at each install with that trigger's names:
-- {trigger}, {table}, {schema} (the library's) and {args} (the trigger arguments as
-- literals, the same for every capture function: see 0003_changes.sql).

-- name: resolve_name
-- The table a user named: a regclass-style string (quoted parts keep their case) ...
SELECT c.oid, n.nspname, c.relname, c.relkind::text, format('%%I.%%I', n.nspname, c.relname),
       c.relhassubclass
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%(table)s);

-- name: resolve_parts
-- ... or exact (schema, name) parts.
SELECT c.oid, n.nspname, c.relname, c.relkind::text, format('%%I.%%I', n.nspname, c.relname),
       c.relhassubclass
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(name)s;

-- name: key_from_name
-- The stream key of a table that may no longer exist: the name as the server parses it.
SELECT CASE cardinality(p)
           WHEN 1 THEN format('%%I.%%I', current_schema(), p[1])
           WHEN 2 THEN format('%%I.%%I', p[1], p[2])
       END
FROM parse_ident(%(table)s) AS p;

-- name: key_from_parts
SELECT format('%%I.%%I', %(schema)s::text, %(name)s::text);

-- name: columns
SELECT attname FROM pg_catalog.pg_attribute
WHERE attrelid = %(oid)s AND attnum > 0 AND NOT attisdropped;

-- name: primary_key
SELECT a.attname
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
WHERE i.indrelid = %(oid)s AND i.indisprimary
ORDER BY array_position(i.indkey::int2[], a.attnum);

-- name: lock_capture
-- Installs and removals of one table's capture take turns.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: register
INSERT INTO {captures} AS c (stream, operations, columns, notify, capture, retention)
VALUES (%(stream)s, %(operations)s, %(columns)s::jsonb, %(notify)s, %(capture)s, %(retention)s)
ON CONFLICT (stream) DO UPDATE
SET operations = EXCLUDED.operations, columns = EXCLUDED.columns, notify = EXCLUDED.notify,
    capture = EXCLUDED.capture, retention = EXCLUDED.retention, installed_at = now(),
    removed_at = NULL;

-- name: unregister
UPDATE {captures} SET removed_at = now() WHERE stream = %(stream)s;

-- name: notify
WITH c AS (
    INSERT INTO {changes} (stream, op, new) VALUES (%(stream)s, 'notify', %(payload)s::jsonb)
    RETURNING id
)
SELECT id, pg_notify(%(channel)s, '') FROM c;

-- name: _columns
c.id, c.txid::text, c.op, c.pk::text, c.new::text, c.old::text, c.at

-- name: start
-- Delivery goes in rounds. A round delivers the changes of every transaction that committed
-- between two snapshots -- visible in the round's snapshot ("cur"), not in the previous one
-- ("prev") -- in id order. A transaction's changes all become visible at once, at commit,
-- so nothing can slip in behind a finished round; and a later change of a row is made after
-- the earlier one's transaction committed, so it comes in the same round (with a later id)
-- or a later one. Snapshots travel as pg_snapshot text ("xmin:xmax:xip,...").
--
-- A live subscription starts at the current snapshot: the first round brings what commits
-- after it. A replay starts from an empty one: its first round is every matching change
-- visible now, read by id from first_id to top_id.
WITH s AS MATERIALIZED (SELECT pg_current_snapshot() AS cur),
f AS MATERIALIZED (
    SELECT min(c.id) AS first_id, max(c.id) AS top_id
    FROM {changes} c
    WHERE %(replay)s AND c.stream = %(stream)s
      AND c.at >= %(since_at)s AND c.id >= %(since_id)s
)
SELECT (SELECT cur FROM s)::text, coalesce(f.first_id - 1, 0), coalesce(f.top_id, 0),
       pg_is_in_recovery()
FROM f;

-- name: page
-- The rest of a round, by primary key: ids in (after, top]. The page may also hold changes
-- of other rounds (ids interleave); the reader skips those, which keeps this a plain
-- key-range scan whatever the planner thinks of transaction ids. The function (migration
-- 0013) selects what _columns does and keeps the scan ordered, stopping after n rows.
SELECT * FROM {change_page}(
    %(stream)s, %(after)s, %(top)s, %(since_at)s, %(since_id)s, %(n)s
);

-- name: advance
-- A new round in one snapshot: its snapshot, its highest id and its first page. Changes not
-- visible in prev are those of transactions at or above prev's xmax or in its in-progress
-- list -- an index condition on txid however old prev's xmin (a long transaction) is; this
-- statement sees exactly the committed ones. "id + 0" keeps the planner off the primary key.
WITH s AS MATERIALIZED (SELECT pg_current_snapshot() AS cur),
r AS MATERIALIZED (
    SELECT c.id FROM {changes} c
    WHERE (c.txid >= %(prev_xmax)s::text::xid8
           OR c.txid = ANY (%(prev_xip)s::text[]::xid8[]))
      AND c.stream = %(stream)s AND c.at >= %(since_at)s AND c.id + 0 >= %(since_id)s
),
p AS MATERIALIZED (SELECT id FROM r ORDER BY id LIMIT %(n)s)
SELECT (SELECT cur FROM s)::text, (SELECT coalesce(max(id), 0) FROM r), pg_is_in_recovery(),
       c.*
FROM (SELECT) AS one
LEFT JOIN (
    SELECT {_columns} FROM {changes} c WHERE c.id = ANY (ARRAY(SELECT id FROM p))
) c ON true
ORDER BY c.id;

-- name: consumer_open
INSERT INTO {consumers} (stream, name, prev_snap, cur_snap)
VALUES (%(stream)s, %(name)s, pg_current_snapshot(), pg_current_snapshot())
ON CONFLICT (stream, name) DO UPDATE SET updated_at = {consumers}.updated_at
RETURNING prev_snap::text, cur_snap::text, after_id, top_id, pg_current_snapshot()::text,
          pg_is_in_recovery();

-- name: consumer_save
UPDATE {consumers}
SET prev_snap = %(prev)s::pg_snapshot, cur_snap = %(cur)s::pg_snapshot, after_id = %(after)s,
    top_id = %(top)s, updated_at = now()
WHERE stream = %(stream)s AND name = %(name)s;

-- name: consumer_drop
DELETE FROM {consumers} WHERE stream = %(stream)s AND name = %(name)s;

-- name: consumers
SELECT name FROM {consumers} WHERE stream = %(stream)s ORDER BY name;

-- name: lag_consumer
-- Changes a consumer has not finished with: not visible in its prev snapshot, less those of
-- its current round it has finished.
SELECT count(c.*), coalesce(extract(epoch FROM now() - min(c.at)), 0)::float8,
       bool_or(k.name IS NOT NULL)
FROM (SELECT) AS one
LEFT JOIN {consumers} k ON k.stream = %(stream)s AND k.name = %(name)s
LEFT JOIN {changes} c ON c.stream = %(stream)s
     AND c.txid >= pg_snapshot_xmin(k.prev_snap)
     AND NOT pg_visible_in_snapshot(c.txid, k.prev_snap)
     AND NOT (pg_visible_in_snapshot(c.txid, k.cur_snap) AND c.id <= k.after_id);

-- name: retention
SELECT retention FROM {captures} WHERE stream = %(stream)s;

-- name: prune
WITH d AS (
    DELETE FROM {changes} c
    WHERE c.stream = %(stream)s AND c.at < %(cutoff)s
      AND (%(force)s OR NOT EXISTS (
          SELECT FROM {consumers} k
          WHERE k.stream = %(stream)s AND NOT pg_visible_in_snapshot(c.txid, k.prev_snap)))
    RETURNING 1
)
SELECT count(*) FROM d;

-- name: ddl_drop_trigger
DROP TRIGGER IF EXISTS {trigger} ON {table};

-- name: ddl_statement_insert
-- Statement-level capture reads each statement's rows from its transition tables.
CREATE TRIGGER {trigger} AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION {schema}.capture_changes({args});

-- name: ddl_statement_update
CREATE TRIGGER {trigger} AFTER UPDATE ON {table}
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION {schema}.capture_changes({args});

-- name: ddl_statement_delete
CREATE TRIGGER {trigger} AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION {schema}.capture_changes({args});

-- name: ddl_row_insert
CREATE TRIGGER {trigger} AFTER INSERT ON {table}
FOR EACH ROW EXECUTE FUNCTION {schema}.capture_row_changes({args});

-- name: ddl_row_update
CREATE TRIGGER {trigger} AFTER UPDATE ON {table}
FOR EACH ROW EXECUTE FUNCTION {schema}.capture_row_changes({args});

-- name: ddl_row_delete
CREATE TRIGGER {trigger} AFTER DELETE ON {table}
FOR EACH ROW EXECUTE FUNCTION {schema}.capture_row_changes({args});

-- name: ddl_truncate
-- TRUNCATE has statement triggers only, whatever the capture mode: one change per statement
-- (see 0009_truncate_capture.sql).
CREATE TRIGGER {trigger} AFTER TRUNCATE ON {table}
FOR EACH STATEMENT EXECUTE FUNCTION {schema}.capture_truncate({args});
