-- The command line's read-only statements. {schema} is the library's schema; a command
-- checks that a table exists (to_regclass) before reading it, so nothing here writes.

-- name: applied_versions
SELECT version FROM {schema}.schema_version ORDER BY version

-- name: queues
SELECT q.name, q.max_attempts, q.created_at FROM {schema}.queues q ORDER BY q.name

-- name: trigger_consumers
SELECT c.stream, c.name, c.updated_at FROM {schema}.change_consumers c ORDER BY 1, 2

-- name: wal_slots
SELECT slot_name::text, database::text, active, wal_status,
       (pg_current_wal_lsn() - restart_lsn)::int8,
       (pg_current_wal_lsn() - confirmed_flush_lsn)::int8,
       confirmed_flush_lsn::text
FROM pg_catalog.pg_replication_slots
WHERE database = current_database()
  AND (starts_with(slot_name::text, 'pgs_') OR starts_with(slot_name::text, 'pgslive_'))
ORDER BY slot_name

-- name: schedules
SELECT id, coalesce(cron, (interval_us / 1e6)::text || ' s'), paused, next_at
FROM {schema}.schedules ORDER BY id

-- name: instance_versions
SELECT version FROM {schema}.instance_version
WHERE migration_set = %(set)s AND instance = %(instance)s
ORDER BY version

-- name: workflow_counts
SELECT status, count(*), min(created_at) FILTER (WHERE status = 'running')
FROM {runs} GROUP BY status ORDER BY status
