"""SQL of PgChangeStream. ``{changes}``/``{captures}``/``{consumers}``/``{capture_fn}`` are
identifiers substituted with ``psycopg.sql``; values are always ``%(name)s`` parameters.

Transaction ids travel as text (``xid8`` has no binary adapter in psycopg): ``::text::xid8``
on the way in, ``::text`` on the way out.
"""

from __future__ import annotations

# The table a user named: a regclass-style string (quoted parts keep their case) ...
RESOLVE_NAME = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text, format('%%I.%%I', n.nspname, c.relname)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%(table)s)
"""

# ... or exact (schema, name) parts.
RESOLVE_PARTS = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text, format('%%I.%%I', n.nspname, c.relname)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(name)s
"""

# The stream key of a table that may no longer exist: the name as the server parses it.
KEY_FROM_NAME = """
SELECT CASE cardinality(p)
           WHEN 1 THEN format('%%I.%%I', current_schema(), p[1])
           WHEN 2 THEN format('%%I.%%I', p[1], p[2])
       END
FROM parse_ident(%(table)s) AS p
"""

KEY_FROM_PARTS = "SELECT format('%%I.%%I', %(schema)s::text, %(name)s::text)"

COLUMNS = """
SELECT attname FROM pg_catalog.pg_attribute
WHERE attrelid = %(oid)s AND attnum > 0 AND NOT attisdropped
"""

PRIMARY_KEY = """
SELECT a.attname
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
WHERE i.indrelid = %(oid)s AND i.indisprimary
ORDER BY array_position(i.indkey::int2[], a.attnum)
"""

REGISTER = """
INSERT INTO {captures} AS c (stream, operations, columns, notify, capture, retention)
VALUES (%(stream)s, %(operations)s, %(columns)s::jsonb, %(notify)s, %(capture)s, %(retention)s)
ON CONFLICT (stream) DO UPDATE
SET operations = EXCLUDED.operations, columns = EXCLUDED.columns, notify = EXCLUDED.notify,
    capture = EXCLUDED.capture, retention = EXCLUDED.retention, installed_at = now(),
    removed_at = NULL
"""

UNREGISTER = "UPDATE {captures} SET removed_at = now() WHERE stream = %(stream)s"

NOTIFY = """
WITH c AS (
    INSERT INTO {changes} (stream, op, new) VALUES (%(stream)s, 'notify', %(payload)s::jsonb)
    RETURNING id
)
SELECT id, pg_notify(%(channel)s, '') FROM c
"""

_COLUMNS = "c.id, c.txid::text, c.op, c.pk::text, c.new::text, c.old::text, c.at"

# Where a subscription starts: every transaction older than the snapshot's xmin has ended,
# so from xmin on nothing can be missed. With a replay filter, from the oldest transaction
# that wrote a matching change; that first range [lo, hi) is then read by id, from first_id
# to top_id.
START = """
WITH w AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS hi),
f AS MATERIALIZED (
    SELECT min(c.txid) AS lo, min(c.id) AS first_id, max(c.id) AS top_id
    FROM {changes} c, w
    WHERE %(replay)s AND c.stream = %(stream)s AND c.txid < w.hi
      AND c.at >= %(since_at)s AND c.id >= %(since_id)s
)
SELECT coalesce(f.lo, w.hi)::text, w.hi::text, coalesce(f.first_id - 1, 0),
       coalesce(f.top_id, 0)
FROM w, f
"""

# The next page of the current range [lo, hi), by primary key: ids in (after, top]. Every
# transaction in the range had ended when hi was read, so the range is complete. The page
# may also hold changes of later ranges (their ids interleave); the reader skips those,
# which keeps this a plain key-range scan whatever the planner thinks of transaction ids.
PAGE = f"""
SELECT {_COLUMNS}
FROM {{changes}} c
WHERE c.stream = %(stream)s AND c.id > %(after)s AND c.id <= %(top)s
  AND c.at >= %(since_at)s AND c.id >= %(since_id)s
ORDER BY c.id
LIMIT %(n)s
"""

# A new range [lo, xmin now), its highest id and its first page, in one snapshot. The range
# is found through the txid index and its page fetched by primary key (an id-ordered scan
# for "the range, by id" would start at the stream's oldest change). ``held`` says whether
# committed changes wait behind an older transaction still running. Scalar subqueries keep
# xmin a plain parameter of the index conditions; "id + 0" and "ORDER BY txid LIMIT 1" keep
# the planner on the txid index when it cannot know how selective a condition is.
ADVANCE = f"""
WITH w AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS hi),
r AS MATERIALIZED (
    SELECT c.id FROM {{changes}} c
    WHERE c.txid >= %(lo)s::text::xid8 AND c.txid < (SELECT hi FROM w)
      AND c.stream = %(stream)s AND c.at >= %(since_at)s AND c.id + 0 >= %(since_id)s
),
p AS MATERIALIZED (SELECT id FROM r ORDER BY id LIMIT %(n)s)
SELECT (SELECT hi FROM w)::text,
       (SELECT x.txid FROM {{changes}} x
        WHERE x.txid >= (SELECT hi FROM w) AND x.stream = %(stream)s
        ORDER BY x.txid LIMIT 1) IS NOT NULL,
       (SELECT coalesce(max(id), 0) FROM r),
       c.*
FROM (SELECT) AS one
LEFT JOIN (
    SELECT {_COLUMNS} FROM {{changes}} c WHERE c.id = ANY (ARRAY(SELECT id FROM p))
) c ON true
ORDER BY c.id
"""

CONSUMER_OPEN = """
WITH w AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x)
INSERT INTO {consumers} (stream, name, lo, hi)
SELECT %(stream)s, %(name)s, w.x, w.x FROM w
ON CONFLICT (stream, name) DO UPDATE SET updated_at = {consumers}.updated_at
RETURNING lo::text, hi::text, after_id, top_id
"""

CONSUMER_SAVE = """
UPDATE {consumers}
SET lo = %(lo)s::text::xid8, hi = %(hi)s::text::xid8, after_id = %(after)s,
    top_id = %(top)s, updated_at = now()
WHERE stream = %(stream)s AND name = %(name)s
"""

CONSUMER_DROP = "DELETE FROM {consumers} WHERE stream = %(stream)s AND name = %(name)s"

CONSUMERS = """
SELECT name, lo::text, hi::text, after_id, updated_at FROM {consumers}
WHERE stream = %(stream)s ORDER BY name
"""

# Changes a consumer has not finished with: every range from its lo on, less what it
# finished in its current range.
LAG_CONSUMER = """
SELECT count(c.*), coalesce(extract(epoch FROM now() - min(c.at)), 0)::float8,
       bool_or(k.name IS NOT NULL)
FROM (SELECT 1) AS one
LEFT JOIN {consumers} k ON k.stream = %(stream)s AND k.name = %(name)s
LEFT JOIN {changes} c ON c.stream = %(stream)s AND c.txid >= k.lo
     AND NOT (c.txid < k.hi AND c.id <= k.after_id)
"""

# Changes committed but not yet deliverable: an older transaction is still running.
LAG_HELD = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(at)), 0)::float8
FROM {changes}
WHERE stream = %(stream)s AND txid >= pg_snapshot_xmin(pg_current_snapshot())
"""

RETENTION = "SELECT retention FROM {captures} WHERE stream = %(stream)s"

PRUNE = """
WITH d AS (
    DELETE FROM {changes} c
    WHERE c.stream = %(stream)s AND c.at < %(cutoff)s
      AND (%(force)s OR c.txid < ALL (SELECT k.lo FROM {consumers} k WHERE k.stream = %(stream)s))
    RETURNING 1
)
SELECT count(*) FROM d
"""
