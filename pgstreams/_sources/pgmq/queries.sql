-- SQL of PgmqQueue and of installing pgmq.
--
-- Sending, reading, popping, metrics and administration call pgmq's own functions, one
-- statement per operation. pgmq has no lease token, so pgstreams names a delivery by
-- (msg_id, read_ct) (each read bumps read_ct). Settling a delivery must check that pair,
-- which pgmq.delete/archive/set_vt cannot, so ack, nack and extend run what those functions
-- run on the queue's tables, with the check added: a consumer whose visibility timeout ran
-- out and whose message was read again cannot settle it any more. Handing back read-ahead
-- messages and moving messages to the dead-letter queue are guarded the same way.
--
-- {qtable} (the queue's table), {atable} (its archive), {dtable} (its dead-letter queue's
-- table) and {registry} (pgstreams' table of queue settings) are identifiers; the blocks
-- install.py runs (install_* and lock) use none of them. Values are %(name)s parameters.
-- Fragments carry no comments: their text is repeated in every statement that uses them.
--
-- _columns, the column list of every read, is what an Envelope or a put-back needs, JSON as
-- text; the message comes second, where the auto-ack put-back bookkeeping (Handed) expects
-- it. _archived is what pgmq.archive copies to the archive table.

-- name: install_state
SELECT to_regclass('pgmq.meta') IS NOT NULL,
       EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pgmq')

-- name: install_found
-- A scan of the catalog tables under the statement's own snapshot. to_regclass() would go
-- through the backend's catalog caches, which may still remember "absent" from before an
-- advisory-lock wait during which another process installed pgmq.
SELECT EXISTS (
    SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'pgmq' AND c.relname = 'meta'
)

-- name: install_features
-- What pgstreams relies on: message headers (pgmq 1.5), last_read_at (1.10) and throttled
-- insert notifications (pgmq.notify_insert_throttle, later still). The pgmq package's
-- bundled SQL (1.13) has them all.
SELECT count(*) = 2 AND to_regclass('pgmq.notify_insert_throttle') IS NOT NULL
FROM pg_attribute a JOIN pg_type t ON a.attrelid = t.typrelid
WHERE t.oid = 'pgmq.message_record'::regtype AND a.attname IN ('headers', 'last_read_at')

-- name: install_extension
CREATE EXTENSION IF NOT EXISTS pgmq

-- name: lock
-- Serialises installing pgmq, or creating and dropping one queue (the key says which),
-- across processes.
SELECT pg_advisory_xact_lock(%(key)s)

-- name: partman_state
-- pgmq.create_partitioned makes and rotates partitions with pg_partman.
SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_partman'),
       EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_partman')

-- name: kind
SELECT is_partitioned, is_unlogged FROM pgmq.meta WHERE queue_name = %(queue)s

-- name: create
SELECT pgmq.create(%(queue)s)

-- name: create_unlogged
SELECT pgmq.create_unlogged(%(queue)s)

-- name: create_partitioned
SELECT pgmq.create_partitioned(%(queue)s)

-- name: list
SELECT queue_name FROM pgmq.list_queues() ORDER BY 1

-- name: register
INSERT INTO {registry} (name, max_attempts) VALUES (%(queue)s, %(max)s)
ON CONFLICT (name) DO UPDATE SET max_attempts = EXCLUDED.max_attempts

-- name: register_keep
INSERT INTO {registry} (name, max_attempts) VALUES (%(queue)s, NULL)
ON CONFLICT (name) DO NOTHING

-- name: unregister
DELETE FROM {registry} WHERE name = %(queue)s

-- name: settings
SELECT (SELECT max_attempts FROM {registry} WHERE name = %(queue)s),
       (SELECT throttle_interval_ms FROM pgmq.notify_insert_throttle
        WHERE queue_name = %(queue)s)

-- name: enable_notify
SELECT pgmq.enable_notify_insert(%(queue)s, %(ms)s::integer)

-- name: disable_notify
SELECT pgmq.disable_notify_insert(%(queue)s)

-- name: metrics
SELECT m.queue_length, m.queue_visible_length, m.newest_msg_age_sec, m.oldest_msg_age_sec,
       m.total_messages,
       CASE WHEN to_regclass(%(dlq_table)s) IS NULL THEN 0
            ELSE (SELECT d.queue_length FROM pgmq.metrics(%(dlq)s) d) END
FROM pgmq.metrics(%(queue)s) m

-- name: purge
SELECT pgmq.purge_queue(%(queue)s)

-- name: exists
SELECT to_regclass(%(table)s) IS NOT NULL

-- name: queue_exists
SELECT EXISTS (SELECT FROM pgmq.meta WHERE queue_name = %(queue)s)

-- name: drop
SELECT pgmq.drop_queue(%(queue)s)

-- name: send
SELECT * FROM pgmq.send(%(queue)s, %(msg)s::jsonb, %(headers)s::jsonb,
                        clock_timestamp() + %(delay)s * interval '1 second')

-- name: send_batch
-- The batch travels as one JSON array: adapting a Python list to jsonb[] costs the client
-- several times what the insert costs the server.
WITH m AS (
    SELECT ARRAY(SELECT e FROM jsonb_array_elements(%(msgs)s::jsonb) WITH ORDINALITY AS x(e, n)
                 ORDER BY n) AS msgs
)
SELECT s.* FROM m, pgmq.send_batch(
    %(queue)s, m.msgs, array_fill(%(headers)s::jsonb, ARRAY[cardinality(m.msgs)]),
    clock_timestamp() + %(delay)s * interval '1 second') AS s

-- name: send_back
-- Values given back after this handle forgot their rows go back as new messages (each one
-- JSON text).
SELECT count(*) FROM pgmq.send_batch(%(queue)s, %(msgs)s::jsonb[])

-- name: _columns
msg_id, message::text, read_ct, enqueued_at, headers::text

-- name: read
SELECT {_columns} FROM pgmq.read(%(queue)s, %(vt)s::integer, %(qty)s::integer)

-- name: read_poll
SELECT {_columns}
FROM pgmq.read_with_poll(%(queue)s, %(vt)s::integer, %(qty)s::integer,
                          %(max_poll)s::integer, %(interval_ms)s::integer)

-- name: pop
-- Auto-ack; vt and last_read_at come back too so that unread messages go back exactly.
SELECT {_columns}, vt::text, last_read_at::text FROM pgmq.pop(%(queue)s, %(qty)s::integer)

-- name: unpop
INSERT INTO {qtable} (msg_id, read_ct, enqueued_at, vt, last_read_at, message, headers)
OVERRIDING SYSTEM VALUE
SELECT i, r, e, v::timestamptz, l::timestamptz, m::jsonb, h::jsonb
FROM unnest(%(ids)s::bigint[], %(read_cts)s::int[], %(enqueued)s::timestamptz[],
            %(vts)s::text[], %(last_reads)s::text[], %(msgs)s::text[], %(headers)s::text[])
     AS x(i, r, e, v, l, m, h)
ON CONFLICT DO NOTHING

-- name: next_visible
-- Seconds until the next message becomes visible (a delayed message, an expiring lease).
SELECT extract(epoch FROM min(vt) - clock_timestamp())::float8 FROM {qtable}

-- name: _archived
msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers

-- name: ack_delete
DELETE FROM {qtable} WHERE msg_id = %(id)s AND read_ct = %(read_ct)s RETURNING true

-- name: ack_archive
WITH d AS (
    DELETE FROM {qtable} WHERE msg_id = %(id)s AND read_ct = %(read_ct)s
    RETURNING {_archived}
)
INSERT INTO {atable} ({_archived}) SELECT {_archived} FROM d RETURNING true

-- name: _held_many
DELETE FROM {qtable} m
USING unnest(string_to_array(%(ids)s, ',')::bigint[],
             string_to_array(%(read_cts)s, ',')::int[]) AS x(id, rc)
WHERE m.msg_id = x.id AND m.read_ct = x.rc

-- name: ack_many_delete
-- ids and read counts arrive as comma-separated text: adapting two Python lists to arrays
-- costs the client more than the server spends parsing the text.
WITH d AS (
    {_held_many}
    RETURNING 1
)
SELECT count(*) FROM d

-- name: ack_many_archive
WITH d AS (
    {_held_many}
    RETURNING m.msg_id, m.vt, m.read_ct, m.enqueued_at, m.last_read_at, m.message, m.headers
), a AS (
    INSERT INTO {atable} ({_archived}) SELECT {_archived} FROM d RETURNING 1
)
SELECT count(*) FROM a

-- name: extend
UPDATE {qtable} SET vt = clock_timestamp() + %(seconds)s * interval '1 second'
WHERE msg_id = %(id)s AND read_ct = %(read_ct)s
RETURNING msg_id

-- name: nack
-- set_vt plus a record of the attempt it ends and its error (read back when the message
-- goes to the dead-letter queue), in one guarded statement.
UPDATE {qtable}
SET vt = clock_timestamp() + %(delay)s * interval '1 second',
    headers = CASE jsonb_typeof(headers) WHEN 'object' THEN headers ELSE '{{}}' END
              || jsonb_build_object(
        'pgstreams_nack', jsonb_build_object('read_ct', read_ct, 'error', %(error)s::text))
WHERE msg_id = %(id)s AND read_ct = %(read_ct)s
RETURNING msg_id

-- name: release
-- Read-ahead leases handed back unread: visible at once and the read not counted.
UPDATE {qtable} m SET vt = clock_timestamp(), read_ct = m.read_ct - 1
FROM unnest(%(ids)s::bigint[], %(read_cts)s::int[]) AS x(id, rc)
WHERE m.msg_id = x.id AND m.read_ct = x.rc

-- name: dead_lock
-- Dead-lettering, in one transaction: lock the deliveries, copy them to the DLQ, delete.
SELECT m.msg_id, m.message::text,
       (CASE jsonb_typeof(m.headers) WHEN 'object' THEN m.headers ELSE '{{}}' END
        - 'pgstreams_nack'
        || jsonb_build_object('pgstreams_dead', jsonb_build_object(
               'queue', %(queue)s::text,
               'msg_id', m.msg_id,
               'read_ct', m.read_ct,
               'enqueued_at', m.enqueued_at,
               'dead_at', clock_timestamp(),
               'error', CASE WHEN (m.headers -> 'pgstreams_nack' ->> 'read_ct')::int
                                  = m.read_ct - 1
                             THEN m.headers -> 'pgstreams_nack' ->> 'error'
                             ELSE 'visibility timeout expired' END)))::text
FROM {qtable} m
JOIN unnest(%(ids)s::bigint[], %(read_cts)s::int[]) AS x(id, rc)
  ON m.msg_id = x.id AND m.read_ct = x.rc
ORDER BY m.msg_id
FOR UPDATE OF m

-- name: dead_send
SELECT count(*) FROM pgmq.send_batch(%(dlq)s, %(msgs)s::jsonb[], %(headers)s::jsonb[])

-- name: delete_many
SELECT count(*) FROM pgmq.delete(%(queue)s, %(ids)s::bigint[])

-- name: dead_count
SELECT count(*) FROM {dtable}

-- name: requeue_take
SELECT {_columns} FROM pgmq.pop(%(dlq)s, %(qty)s::integer) ORDER BY msg_id

-- name: requeue_send
-- Requeued messages keep their headers, minus the dead-letter record.
SELECT count(*) FROM pgmq.send_batch(
    %(queue)s, %(msgs)s::jsonb[],
    ARRAY(SELECT coalesce(h, '{{}}'::jsonb) - 'pgstreams_dead'
          FROM unnest(%(headers)s::jsonb[]) WITH ORDINALITY AS x(h, n) ORDER BY n))

-- name: dead_peek
SELECT msg_id, message::text, headers::text, enqueued_at
FROM {dtable} ORDER BY msg_id LIMIT %(limit)s
