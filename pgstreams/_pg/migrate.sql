-- The migrations runner's own statements. {schema} is the schema being migrated.

-- name: lock
-- Every migration of one schema, whatever its set, runs under this one lock; a queue's
-- upgrade also takes the queue's lock, first (the order PgQueue.create takes them in).
SELECT pg_advisory_xact_lock(%(key)s)

-- name: bootstrap_main
-- The version tables cannot be migrations themselves: they record them. The main set's
-- versions (one row each), and those of each instance of the per-instance sets.
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.schema_version (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
{_instance_version}

-- name: bootstrap_instance
-- A schema that holds only per-instance tables (a workflow storage's own schema) has no
-- main set.
CREATE SCHEMA IF NOT EXISTS {schema};
{_instance_version}

-- name: _instance_version
CREATE TABLE IF NOT EXISTS {schema}.instance_version (
    migration_set  text        NOT NULL,
    instance       text        NOT NULL,
    version        integer     NOT NULL,
    name           text        NOT NULL,
    applied_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration_set, instance, version)
)

-- name: recorded
-- Every version recorded in this schema, main set first: checked against what this
-- library knows before anything is applied.
SELECT 'main', '', version, name FROM {schema}.schema_version
UNION ALL
SELECT migration_set, instance, version, name FROM {schema}.instance_version
ORDER BY 1, 2, 3

-- name: instance
-- One instance's versions, and whether the table that makes it exist is still there.
SELECT version, name, to_regclass(%(table)s) IS NOT NULL FROM {schema}.instance_version
WHERE migration_set = %(set)s AND instance = %(instance)s
ORDER BY version

-- name: forget
DELETE FROM {schema}.instance_version WHERE migration_set = %(set)s AND instance = %(instance)s

-- name: record_main
INSERT INTO {schema}.schema_version (version, name) VALUES (%(version)s, %(name)s)

-- name: record_instance
INSERT INTO {schema}.instance_version (migration_set, instance, version, name)
VALUES (%(set)s, %(instance)s, %(version)s, %(name)s)

-- name: has_queues
SELECT to_regclass(%(table)s) IS NOT NULL

-- name: queues
SELECT name FROM {schema}.queues ORDER BY name

-- name: queue_registered
SELECT EXISTS (SELECT FROM {schema}.queues WHERE name = %(name)s)

-- name: tables_exist
-- Planning (what migrate() would apply, for its progress reports) only reads.
SELECT to_regclass(t) IS NOT NULL FROM unnest(%(tables)s::text[]) WITH ORDINALITY AS x(t, n)
ORDER BY n

-- name: main_versions
SELECT version FROM {schema}.schema_version

-- name: instance_versions
SELECT migration_set, instance, version FROM {schema}.instance_version
