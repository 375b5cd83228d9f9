"""SQL of PgQueue. ``{table}``/``{stats}``/``{queues}``/``{ready_idx}`` are identifiers
substituted with ``psycopg.sql``; values are always ``%(name)s`` parameters."""

from __future__ import annotations

SHARDS = 16

CREATE = """
CREATE TABLE IF NOT EXISTS {table} (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload      jsonb       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{{}}',
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    visible_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    lease        bigint,
    dead_at      timestamptz,
    last_error   text
);
CREATE INDEX IF NOT EXISTS {ready_idx} ON {table} (visible_at, id) WHERE dead_at IS NULL;
"""

# create(max_attempts=...) sets the limit; create() without it keeps what is stored.
REGISTER_SET = """
INSERT INTO {queues} (name, max_attempts) VALUES (%(queue)s, %(max)s)
ON CONFLICT (name) DO UPDATE SET max_attempts = EXCLUDED.max_attempts
"""

REGISTER_KEEP = """
INSERT INTO {queues} (name, max_attempts) VALUES (%(queue)s, NULL)
ON CONFLICT (name) DO NOTHING
"""

REGISTER_SHARDS = """
INSERT INTO {stats} (queue, shard)
SELECT %(queue)s, g FROM generate_series(0, %(shards)s - 1) AS g
ON CONFLICT DO NOTHING
"""

# The queue's stored max_attempts (NULL = unlimited); handles cache it for a few seconds.
LIMIT = """
SELECT coalesce(max_attempts, 2147483647) FROM {queues} WHERE name = %(queue)s
"""

# The shard a statement bumps: spreads concurrent consumers over SHARDS counter rows.
_SHARD = f"pg_backend_pid() %% {SHARDS}"

PUBLISH = """
WITH m AS (
    INSERT INTO {table} (payload, headers, visible_at)
    VALUES (%(payload)s::jsonb, %(headers)s::jsonb, now() + %(delay)s * interval '1 second')
    RETURNING id
)
SELECT id, pg_notify(%(channel)s, '') FROM m
"""

# One notification per statement however many rows it inserts.
PUBLISH_BATCH = """
WITH m AS (
    INSERT INTO {table} (payload, headers, visible_at)
    SELECT p, %(headers)s::jsonb, now() + %(delay)s * interval '1 second'
    FROM unnest(%(payloads)s::jsonb[]) WITH ORDINALITY AS x(p, n)
    ORDER BY n
    RETURNING id
)
SELECT array_agg(id ORDER BY id), pg_notify(%(channel)s, '') FROM m
"""

# The next n visible messages, skipping rows other consumers hold. Picked in an ARRAY()
# subquery so that PostgreSQL plans the statement cheaply every time.
_PICK = """ARRAY(
    SELECT id FROM {table}
    WHERE dead_at IS NULL AND visible_at <= now()
    ORDER BY visible_at, id
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)"""

# Auto-ack: delete what is read. Everything but the payload's value comes back as text --
# cheap to receive, exact to send back -- so that messages read but never delivered can be
# put back byte for byte, in their place.
POP = f"""
WITH d AS (
    DELETE FROM {{table}} WHERE id = ANY({_PICK})
    RETURNING id, payload, headers, attempts, enqueued_at, visible_at
), s AS (
    UPDATE {{stats}} SET completed = completed + (SELECT count(*) FROM d)
    WHERE queue = %(queue)s AND shard = {_SHARD}
)
SELECT id, payload::text, headers::text, attempts, enqueued_at::text, visible_at::text
FROM d ORDER BY visible_at, id
"""

UNPOP = f"""
WITH r AS (
    INSERT INTO {{table}} (id, payload, headers, attempts, enqueued_at, visible_at)
    OVERRIDING SYSTEM VALUE
    SELECT id, p::jsonb, h::jsonb, a, e::timestamptz, v::timestamptz
    FROM unnest(%(ids)s::bigint[], %(payloads)s::text[], %(headers)s::text[],
                %(attempts)s::int[], %(enqueued)s::text[], %(visible)s::text[])
         AS x(id, p, h, a, e, v)
    ON CONFLICT (id) DO NOTHING  -- already back: never let one duplicate sink the rest
    RETURNING 1
), s AS (
    UPDATE {{stats}} SET completed = completed - (SELECT count(*) FROM r)
    WHERE queue = %(queue)s AND shard = {_SHARD}
)
SELECT count(*), pg_notify(%(channel)s, '') FROM r
"""

# A message given back whose original row is no longer known: appended as a new message.
REINSERT = f"""
WITH r AS (
    INSERT INTO {{table}} (payload) SELECT p::jsonb FROM unnest(%(payloads)s::text[]) AS x(p)
    RETURNING 1
), s AS (
    UPDATE {{stats}} SET completed = completed - (SELECT count(*) FROM r)
    WHERE queue = %(queue)s AND shard = {_SHARD}
)
SELECT count(*), pg_notify(%(channel)s, '') FROM r
"""

# Manual ack: lease up to n messages in one UPDATE. A message already delivered
# max_attempts times whose lease ran out goes to the dead set instead; it comes back with
# is_dead set and is not delivered.
CLAIM = f"""
UPDATE {{table}} SET
    attempts   = CASE WHEN attempts < %(max)s THEN attempts + 1 ELSE attempts END,
    lease      = CASE WHEN attempts < %(max)s THEN pg_current_xact_id()::text::bigint END,
    dead_at    = CASE WHEN attempts < %(max)s THEN NULL ELSE now() END,
    visible_at = CASE WHEN attempts < %(max)s
                      THEN now() + %(vis)s * interval '1 second' ELSE visible_at END,
    last_error = CASE WHEN lease IS NOT NULL
                      THEN 'visibility timeout expired' ELSE last_error END
WHERE id = ANY({_PICK})
RETURNING id, payload::text, headers::text, attempts, enqueued_at, dead_at IS NOT NULL, lease
"""

# Hand back leases that were read but never delivered: as if never read, and back near
# their place in line (the claim overwrote visible_at; enqueued_at is where they started).
RELEASE = """
WITH r AS (
    UPDATE {table} t
    SET attempts = t.attempts - 1, lease = NULL, visible_at = least(t.enqueued_at, now())
    FROM unnest(%(ids)s::bigint[], %(leases)s::bigint[]) AS x(id, lease)
    WHERE t.id = x.id AND t.lease = x.lease AND t.dead_at IS NULL
    RETURNING 1
)
SELECT count(*), pg_notify(%(channel)s, '') FROM r
"""

# A lease is (id, lease) where lease is the claiming transaction's id: unique per claim
# statement, so a set of envelopes is matched with two ANY() tests instead of a join.
ACK = f"""
WITH d AS (
    DELETE FROM {{table}} WHERE id = %(id)s AND lease = %(lease)s RETURNING 1
)
UPDATE {{stats}} SET completed = completed + 1
WHERE queue = %(queue)s AND shard = {_SHARD} AND EXISTS (SELECT FROM d)
RETURNING 1
"""

# Envelopes of one claim share its lease, so the usual batch is matched with two ANY()
# tests; ACK_PAIRS matches (id, lease) pairs exactly for envelopes of several claims.
ACK_MANY = f"""
WITH d AS (
    DELETE FROM {{table}}
    WHERE id = ANY(%(ids)s::bigint[]) AND lease = %(lease)s
    RETURNING id
), n AS (SELECT count(*) AS c FROM d)
UPDATE {{stats}} SET completed = completed + n.c FROM n
WHERE queue = %(queue)s AND shard = {_SHARD}
RETURNING n.c
"""

ACK_PAIRS = f"""
WITH d AS (
    DELETE FROM {{table}} t
    USING unnest(%(ids)s::bigint[], %(leases)s::bigint[]) AS x(id, lease)
    WHERE t.id = x.id AND t.lease = x.lease
    RETURNING t.id
), n AS (SELECT count(*) AS c FROM d)
UPDATE {{stats}} SET completed = completed + n.c FROM n
WHERE queue = %(queue)s AND shard = {_SHARD}
RETURNING n.c
"""

# A nack wakes idle consumers: the message may be visible again at once.
NACK = """
UPDATE {table}
SET lease = NULL,
    visible_at = now() + %(delay)s * interval '1 second',
    last_error = coalesce(%(error)s, last_error),
    dead_at = CASE WHEN attempts >= %(max)s THEN now() END
WHERE id = %(id)s AND lease = %(lease)s AND dead_at IS NULL
RETURNING pg_notify(%(channel)s, '')
"""

EXTEND = """
UPDATE {table} SET visible_at = now() + %(seconds)s * interval '1 second'
WHERE id = %(id)s AND lease = %(lease)s AND dead_at IS NULL
RETURNING 1
"""

# Seconds until the next message becomes visible (or a lease runs out), NULL if none.
NEXT_VISIBLE = """
SELECT extract(epoch FROM min(visible_at) - now())::float8 FROM {table} WHERE dead_at IS NULL
"""

METRICS = """
SELECT
    count(*) FILTER (WHERE dead_at IS NULL
                     AND NOT (lease IS NOT NULL AND visible_at > now())),
    count(*) FILTER (WHERE dead_at IS NULL AND lease IS NOT NULL AND visible_at > now()),
    count(*) FILTER (WHERE dead_at IS NOT NULL),
    (SELECT coalesce(sum(completed), 0)::bigint FROM {stats} WHERE queue = %(queue)s)
FROM {table}
"""

REQUEUE_DEAD = """
WITH r AS (
    UPDATE {table} SET dead_at = NULL, lease = NULL, attempts = 0, visible_at = now()
    WHERE dead_at IS NOT NULL
    RETURNING 1
)
SELECT count(*), pg_notify(%(channel)s, '') FROM r
"""

DEAD = """
SELECT id, payload::text, headers::text, attempts, enqueued_at, dead_at, last_error
FROM {table} WHERE dead_at IS NOT NULL ORDER BY dead_at, id LIMIT %(limit)s
"""

PURGE = """
WITH d AS (DELETE FROM {table} RETURNING 1) SELECT count(*) FROM d
"""

DROP_TABLE = """
DROP TABLE IF EXISTS {table}
"""

UNREGISTER = """
DELETE FROM {queues} WHERE name = %(queue)s
"""
