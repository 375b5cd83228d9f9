-- SQL of PgQueue.
--
-- {table} (the queue's table, which the queue migration set creates and upgrades), {stats}
-- (the sharded completion counters) and {queues} (the registry) are identifiers; {shards}
-- is the number of counter rows per queue. Values are %(name)s parameters.
--
-- Manual ack leases messages; auto-ack deletes them in a transaction it holds open (pop_*).
-- A lease is (id, lease) where lease is the id of the transaction that leased the message:
-- unique per leasing statement, so the messages of one read share it and a set of them is
-- matched with two ANY() tests instead of a join. visible_at doubles as the lease's end.
-- Fragments carry no comments: their text is repeated in every statement that uses them.
--
-- _pick takes the next n visible messages, skipping rows other consumers hold, in an ARRAY()
-- subquery so that PostgreSQL plans the statement cheaply every time. _shard is the counter
-- row a statement bumps: it spreads concurrent consumers over the queue's counter rows.
-- _lease leases a picked row for %(vis)s seconds and counts the attempt, or -- if it was
-- already delivered %(max)s times and its lease ran out -- moves it to the dead set
-- instead.

-- name: lock
-- Serialises creating, upgrading and dropping one queue across processes.
SELECT pg_advisory_xact_lock(%(key)s)

-- name: register_set
-- create(max_attempts=...) sets the limit; create() without it keeps what is stored.
INSERT INTO {queues} (name, max_attempts) VALUES (%(queue)s, %(max)s)
ON CONFLICT (name) DO UPDATE SET max_attempts = EXCLUDED.max_attempts

-- name: register_keep
INSERT INTO {queues} (name, max_attempts) VALUES (%(queue)s, NULL)
ON CONFLICT (name) DO NOTHING

-- name: register_shards
INSERT INTO {stats} (queue, shard)
SELECT %(queue)s, g FROM generate_series(0, {shards} - 1) AS g
ON CONFLICT DO NOTHING

-- name: limit
-- The queue's stored max_attempts (NULL = unlimited); handles cache it for a few seconds.
SELECT coalesce(max_attempts, 2147483647) FROM {queues} WHERE name = %(queue)s

-- name: _shard
pg_backend_pid() %% {shards}

-- name: _pick
ARRAY(
    SELECT id FROM {table}
    WHERE dead_at IS NULL AND visible_at <= now()
    ORDER BY visible_at, id
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)

-- name: _lease
attempts   = CASE WHEN attempts < %(max)s THEN attempts + 1 ELSE attempts END,
lease      = CASE WHEN attempts < %(max)s THEN pg_current_xact_id()::text::bigint END,
dead_at    = CASE WHEN attempts < %(max)s THEN NULL ELSE now() END,
visible_at = CASE WHEN attempts < %(max)s
                  THEN now() + %(vis)s * interval '1 second' ELSE visible_at END,
last_error = CASE WHEN lease IS NOT NULL
                  THEN 'visibility timeout expired' ELSE last_error END

-- name: publish
WITH m AS (
    INSERT INTO {table} (payload, headers, visible_at)
    VALUES (%(payload)s::jsonb, %(headers)s::jsonb, now() + %(delay)s * interval '1 second')
    RETURNING id
)
SELECT id, pg_notify(%(channel)s, '') FROM m

-- name: publish_batch
-- One notification per statement however many rows it inserts.
WITH m AS (
    INSERT INTO {table} (payload, headers, visible_at)
    SELECT p, %(headers)s::jsonb, now() + %(delay)s * interval '1 second'
    FROM unnest(%(payloads)s::jsonb[]) WITH ORDINALITY AS x(p, n)
    ORDER BY n
    RETURNING id
)
SELECT array_agg(id ORDER BY id), pg_notify(%(channel)s, '') FROM m

-- name: pop_begin
-- Auto-ack: a read opens a transaction that stays open while its messages are handed out;
-- a session left idle in it longer than the lease ends, and its read goes back.
BEGIN;
SELECT set_config('idle_in_transaction_session_timeout', %(idle_ms)s, true);

-- name: pop
-- Auto-ack: take the next n messages by deleting them inside the open transaction. Other
-- consumers skip them (their rows are locked); they are gone once it commits -- when the
-- subscriber asks for more -- and back in line at once if the connection drops first. A
-- message whose manual-ack lease ran out on its last attempt goes to the dead set instead.
-- Everything but the payload's value comes back as text, cheap to receive and exact to put
-- back.
WITH picked AS MATERIALIZED (
    SELECT id, attempts >= %(max)s AS spent FROM {table}
    WHERE dead_at IS NULL AND visible_at <= now()
    ORDER BY visible_at, id
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
), dead AS (
    UPDATE {table} SET
        dead_at = now(),
        last_error = CASE WHEN lease IS NOT NULL
                          THEN 'visibility timeout expired' ELSE last_error END
    WHERE id = ANY(ARRAY(SELECT id FROM picked WHERE spent))
)
DELETE FROM {table} WHERE id = ANY(ARRAY(SELECT id FROM picked WHERE NOT spent))
RETURNING id, payload::text, headers::text, attempts, enqueued_at::text, visible_at::text

-- name: pop_count
-- Messages of the open transaction that were handed out, counted as completed.
UPDATE {stats} SET completed = completed + %(count)s
WHERE queue = %(queue)s AND shard = {_shard};

-- name: pop_keep
-- Messages of the open transaction that were never handed out, put back as they were (in
-- their place in line) before it commits; idle consumers are woken.
INSERT INTO {table} (id, payload, headers, attempts, enqueued_at, visible_at)
OVERRIDING SYSTEM VALUE
SELECT id, p::jsonb, h::jsonb, a, e::timestamptz, v::timestamptz
FROM unnest(%(ids)s::bigint[], %(payloads)s::text[], %(headers)s::text[],
            %(attempts)s::int[], %(enqueued)s::text[], %(visible)s::text[])
     AS x(id, p, h, a, e, v);
SELECT pg_notify(%(channel)s, '');

-- name: unpop
-- Messages an operator read ahead and gave back after the stream deleted them: inserted
-- again with their id, payload text, headers and attempt count, visible at once and near
-- their place in line. Idempotent: a message already back (or never deleted) is skipped.
WITH r AS (
    INSERT INTO {table} (id, payload, headers, attempts, enqueued_at, visible_at)
    OVERRIDING SYSTEM VALUE
    SELECT id, p::jsonb, h::jsonb, a, e::timestamptz, least(e::timestamptz, now())
    FROM unnest(%(ids)s::bigint[], %(payloads)s::text[], %(headers)s::text[],
                %(attempts)s::int[], %(enqueued)s::text[])
         AS x(id, p, h, a, e)
    ON CONFLICT (id) DO NOTHING  -- already back: never let one duplicate sink the rest
    RETURNING 1
), counted AS (
    UPDATE {stats} SET completed = completed - (SELECT count(*) FROM r)
    WHERE queue = %(queue)s AND shard = {_shard} AND EXISTS (SELECT FROM r)
)
SELECT count(*), pg_notify(%(channel)s, '') FROM r

-- name: reinsert
-- A message given back whose original row is no longer known: appended as a new message.
WITH r AS (
    INSERT INTO {table} (payload) SELECT p::jsonb FROM unnest(%(payloads)s::text[]) AS x(p)
    RETURNING 1
), counted AS (
    UPDATE {stats} SET completed = completed - (SELECT count(*) FROM r)
    WHERE queue = %(queue)s AND shard = {_shard}
)
SELECT count(*), pg_notify(%(channel)s, '') FROM r

-- name: claim
-- Manual ack: lease up to n messages in one UPDATE.
UPDATE {table} SET
{_lease}
WHERE id = ANY({_pick})
RETURNING id, payload::text, headers::text, attempts, enqueued_at, dead_at IS NOT NULL, lease

-- name: release
-- Hand back leases that were read but never delivered: as if never read, and back near
-- their place in line.
WITH r AS (
    UPDATE {table} t
    SET attempts = t.attempts - 1, lease = NULL, visible_at = least(t.enqueued_at, now())
    FROM unnest(%(ids)s::bigint[], %(leases)s::bigint[]) AS x(id, lease)
    WHERE t.id = x.id AND t.lease = x.lease AND t.dead_at IS NULL
    RETURNING 1
)
SELECT count(*), pg_notify(%(channel)s, '') FROM r

-- name: ack
WITH d AS (
    DELETE FROM {table} WHERE id = %(id)s AND lease = %(lease)s RETURNING 1
)
UPDATE {stats} SET completed = completed + 1
WHERE queue = %(queue)s AND shard = {_shard} AND EXISTS (SELECT FROM d)
RETURNING 1

-- name: ack_many
-- Envelopes of one claim share its lease, so the usual batch is matched with two ANY()
-- tests; ack_pairs matches (id, lease) pairs exactly for envelopes of several claims.
WITH d AS (
    DELETE FROM {table}
    WHERE id = ANY(%(ids)s::bigint[]) AND lease = %(lease)s
    RETURNING id
), n AS (SELECT count(*) AS c FROM d)
UPDATE {stats} SET completed = completed + n.c FROM n
WHERE queue = %(queue)s AND shard = {_shard}
RETURNING n.c

-- name: ack_pairs
WITH d AS (
    DELETE FROM {table} t
    USING unnest(%(ids)s::bigint[], %(leases)s::bigint[]) AS x(id, lease)
    WHERE t.id = x.id AND t.lease = x.lease
    RETURNING t.id
), n AS (SELECT count(*) AS c FROM d)
UPDATE {stats} SET completed = completed + n.c FROM n
WHERE queue = %(queue)s AND shard = {_shard}
RETURNING n.c

-- name: nack
-- A nack wakes idle consumers: the message may be visible again at once.
UPDATE {table}
SET lease = NULL,
    visible_at = now() + %(delay)s * interval '1 second',
    last_error = coalesce(%(error)s, last_error),
    dead_at = CASE WHEN attempts >= %(max)s THEN now() END
WHERE id = %(id)s AND lease = %(lease)s AND dead_at IS NULL
RETURNING dead_at IS NOT NULL, pg_notify(%(channel)s, '')

-- name: extend
UPDATE {table} SET visible_at = now() + %(seconds)s * interval '1 second'
WHERE id = %(id)s AND lease = %(lease)s AND dead_at IS NULL
RETURNING 1

-- name: next_visible
-- Seconds until the next message becomes visible (or a lease runs out), NULL if none.
SELECT extract(epoch FROM min(visible_at) - now())::float8 FROM {table} WHERE dead_at IS NULL

-- name: metrics
-- In flight: leased (manual ack), or taken by an auto-ack read whose transaction is still
-- open -- the row's xmax is a transaction in progress: among the snapshot's running ids, or
-- at or past its xmax (compared on the low 32 bits, modulo 2^32).
WITH s AS (
    SELECT pg_snapshot_xmax(snap)::text::bigint %% 4294967296 AS top,
           ARRAY(SELECT x::text::bigint %% 4294967296 FROM pg_snapshot_xip(snap) AS x) AS xids
    FROM pg_current_snapshot() AS snap
), m AS (
    SELECT t.dead_at IS NOT NULL AS dead,
           (t.lease IS NOT NULL AND t.visible_at > now())
           OR (t.xmax <> '0' AND (
               (s.top - t.xmax::text::bigint + 4294967296) %% 4294967296 NOT BETWEEN 1 AND 2147483647
               OR t.xmax::text::bigint = ANY(s.xids))) AS busy
    FROM {table} AS t, s
)
SELECT
    count(*) FILTER (WHERE NOT dead AND NOT busy),
    count(*) FILTER (WHERE NOT dead AND busy),
    count(*) FILTER (WHERE dead),
    (SELECT coalesce(sum(completed), 0)::bigint FROM {stats} WHERE queue = %(queue)s)
FROM m

-- name: requeue_dead_start
-- How many messages are dead, and the time that bounds requeue_dead(): a message that dies
-- after it (one requeued and dead again, say) is left for the next call.
SELECT count(*), clock_timestamp() FROM {table} WHERE dead_at IS NOT NULL

-- name: requeue_dead
-- One batch in one transaction, in dead-index order after the previous batch's last
-- (dead_at, id): each batch costs what it moves, however many come before. Rows another
-- requeue or a purge holds are skipped: that statement deals with them.
WITH picked AS (
    SELECT id, dead_at FROM {table}
    WHERE dead_at IS NOT NULL AND dead_at <= %(cutoff)s
      AND (dead_at, id) > (%(after_at)s, %(after_id)s)
    ORDER BY dead_at, id
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE {table} AS q SET dead_at = NULL, lease = NULL, attempts = 0, visible_at = now()
    FROM picked WHERE q.id = picked.id
    RETURNING q.id
)
SELECT count(*), max(dead_at), (array_agg(id ORDER BY dead_at DESC, id DESC))[1],
       (SELECT count(*) FROM moved), (SELECT pg_notify(%(channel)s, '') FROM moved LIMIT 1)
FROM picked

-- name: dead
SELECT id, payload::text, headers::text, attempts, enqueued_at, dead_at, last_error
FROM {table} WHERE dead_at IS NOT NULL ORDER BY dead_at, id LIMIT %(limit)s

-- name: purge
WITH d AS (DELETE FROM {table} RETURNING 1) SELECT count(*) FROM d

-- name: drop_table
DROP TABLE IF EXISTS {table}

-- name: unregister
DELETE FROM {queues} WHERE name = %(queue)s
