-- SnapshotStore. {table} is the store's table (see sql/migrations/snapshots/); prefix
-- namespaces one store's ids within it.

-- name: save
INSERT INTO {table} (prefix, id, snapshot)
VALUES (%(prefix)s, %(id)s, %(snapshot)s::jsonb)
ON CONFLICT (prefix, id) DO UPDATE
SET snapshot = EXCLUDED.snapshot, updated_at = clock_timestamp()
RETURNING 1

-- name: load
SELECT snapshot FROM {table} WHERE prefix = %(prefix)s AND id = %(id)s

-- name: delete
DELETE FROM {table} WHERE prefix = %(prefix)s AND id = %(id)s RETURNING 1

-- name: list
SELECT id, snapshot, updated_at FROM {table}
WHERE prefix = %(prefix)s AND starts_with(id, %(start)s)
ORDER BY updated_at DESC, id
LIMIT %(limit)s
