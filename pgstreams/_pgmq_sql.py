"""SQL of PgmqQueue.

Reads, sends, deletes, archives, metrics and administration call pgmq's own functions, one
statement per operation. pgmq has no lease token, so a delivery is named by
``(msg_id, read_ct)``: each read bumps ``read_ct``. Acks lock the message only while it
still carries the reader's ``read_ct`` and then call ``pgmq.delete``/``pgmq.archive``; a
consumer whose visibility timeout ran out and whose message was read again cannot settle
it any more. The few writes pgmq has no function for -- a nack that also records its error,
handing back read-ahead messages as if never read -- are single guarded statements on the
queue's table.

``{qtable}`` (the queue's table), ``{dtable}`` (its dead-letter queue's table) and
``{registry}`` are identifiers; values are ``%(name)s`` parameters.
"""

from __future__ import annotations

# Column list of every read: what an Envelope or a put-back needs, JSON as text. The
# message comes second, where the auto-ack put-back bookkeeping (_Handed) expects it.
_COLUMNS = "msg_id, message::text, read_ct, enqueued_at, headers::text"

SEND = """
SELECT * FROM pgmq.send(%(queue)s, %(msg)s::jsonb, %(headers)s::jsonb,
                        clock_timestamp() + %(delay)s * interval '1 second')
"""

SEND_BATCH = """
SELECT * FROM pgmq.send_batch(%(queue)s, %(msgs)s::jsonb[], %(headers)s::jsonb[],
                              clock_timestamp() + %(delay)s * interval '1 second')
"""

READ = f"SELECT {_COLUMNS} FROM pgmq.read(%(queue)s, %(vt)s::integer, %(qty)s::integer)"

READ_POLL = f"""
SELECT {_COLUMNS}
FROM pgmq.read_with_poll(%(queue)s, %(vt)s::integer, %(qty)s::integer,
                          %(max_poll)s::integer, %(interval_ms)s::integer)
"""

# Auto-ack; vt and last_read_at come back too so that unread messages go back exactly.
POP = f"SELECT {_COLUMNS}, vt::text, last_read_at::text FROM pgmq.pop(%(queue)s, %(qty)s::integer)"

UNPOP = """
INSERT INTO {qtable} (msg_id, read_ct, enqueued_at, vt, last_read_at, message, headers)
OVERRIDING SYSTEM VALUE
SELECT i, r, e, v::timestamptz, l::timestamptz, m::jsonb, h::jsonb
FROM unnest(%(ids)s::bigint[], %(read_cts)s::int[], %(enqueued)s::timestamptz[],
            %(vts)s::text[], %(last_reads)s::text[], %(msgs)s::text[], %(headers)s::text[])
     AS x(i, r, e, v, l, m, h)
ON CONFLICT DO NOTHING
"""

# The lock (taken only while read_ct still names this delivery) comes first: the CTE is
# materialised, so pgmq's function runs on rows this statement already holds.
_HELD = """
WITH held AS MATERIALIZED (
    SELECT msg_id FROM {qtable}
    WHERE msg_id = %(id)s AND read_ct = %(read_ct)s
    FOR UPDATE
)"""

ACK_DELETE = _HELD + "\nSELECT pgmq.delete(%(queue)s, msg_id) FROM held"
ACK_ARCHIVE = _HELD + "\nSELECT pgmq.archive(%(queue)s, msg_id) FROM held"

EXTEND = (
    _HELD
    + """
SELECT s.msg_id
FROM held, pgmq.set_vt(%(queue)s, held.msg_id,
                       clock_timestamp() + %(seconds)s * interval '1 second') AS s
"""
)

_HELD_MANY = """
WITH held AS MATERIALIZED (
    SELECT m.msg_id FROM {qtable} m
    JOIN unnest(%(ids)s::bigint[], %(read_cts)s::int[]) AS x(id, rc)
      ON m.msg_id = x.id AND m.read_ct = x.rc
    FOR UPDATE OF m
)"""

ACK_MANY_DELETE = (
    _HELD_MANY + "\nSELECT count(*) FROM pgmq.delete(%(queue)s, ARRAY(SELECT msg_id FROM held))"
)
ACK_MANY_ARCHIVE = (
    _HELD_MANY + "\nSELECT count(*) FROM pgmq.archive(%(queue)s, ARRAY(SELECT msg_id FROM held))"
)

# A nack is set_vt plus a record of the attempt it ends and its error (read back when the
# message goes to the dead-letter queue), in one guarded statement.
NACK = """
UPDATE {qtable}
SET vt = clock_timestamp() + %(delay)s * interval '1 second',
    headers = coalesce(headers, '{{}}'::jsonb) || jsonb_build_object(
        'pgstreams_nack', jsonb_build_object('read_ct', read_ct, 'error', %(error)s::text))
WHERE msg_id = %(id)s AND read_ct = %(read_ct)s
RETURNING msg_id
"""

# Read-ahead leases handed back unread: visible at once and the read not counted.
RELEASE = """
UPDATE {qtable} m SET vt = clock_timestamp(), read_ct = m.read_ct - 1
FROM unnest(%(ids)s::bigint[], %(read_cts)s::int[]) AS x(id, rc)
WHERE m.msg_id = x.id AND m.read_ct = x.rc
"""

# Seconds until the next message becomes visible (a delayed message, an expiring lease).
NEXT_VISIBLE = """
SELECT extract(epoch FROM min(vt) - clock_timestamp())::float8 FROM {qtable}
"""

# Dead-lettering, in one transaction: lock the deliveries, copy them to the DLQ, delete.
DEAD_LOCK = """
SELECT m.msg_id, m.message::text,
       (coalesce(m.headers, '{{}}'::jsonb) - 'pgstreams_nack'
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
"""

DEAD_SEND = """
SELECT count(*) FROM pgmq.send_batch(%(dlq)s, %(msgs)s::jsonb[], %(headers)s::jsonb[])
"""

DELETE_MANY = "SELECT count(*) FROM pgmq.delete(%(queue)s, %(ids)s::bigint[])"

REQUEUE_TAKE = f"""
SELECT {_COLUMNS} FROM pgmq.pop(%(dlq)s, %(qty)s::integer) ORDER BY msg_id
"""

# Requeued messages keep their headers, minus the dead-letter record.
REQUEUE_SEND = """
SELECT count(*) FROM pgmq.send_batch(
    %(queue)s, %(msgs)s::jsonb[],
    ARRAY(SELECT coalesce(h, '{{}}'::jsonb) - 'pgstreams_dead'
          FROM unnest(%(headers)s::jsonb[]) WITH ORDINALITY AS x(h, n) ORDER BY n))
"""

DEAD_PEEK = """
SELECT msg_id, message::text, headers::text, enqueued_at
FROM {dtable} ORDER BY msg_id LIMIT %(limit)s
"""

METRICS = """
SELECT m.queue_length, m.queue_visible_length, m.newest_msg_age_sec, m.oldest_msg_age_sec,
       m.total_messages,
       CASE WHEN to_regclass(%(dlq_table)s) IS NULL THEN 0
            ELSE (SELECT d.queue_length FROM pgmq.metrics(%(dlq)s) d) END
FROM pgmq.metrics(%(queue)s) m
"""

SETTINGS = """
SELECT (SELECT max_attempts FROM {registry} WHERE name = %(queue)s),
       (SELECT throttle_interval_ms FROM pgmq.notify_insert_throttle
        WHERE queue_name = %(queue)s)
"""

REGISTER = """
INSERT INTO {registry} (name, max_attempts) VALUES (%(queue)s, %(max)s)
ON CONFLICT (name) DO UPDATE SET max_attempts = EXCLUDED.max_attempts
"""

REGISTER_KEEP = """
INSERT INTO {registry} (name, max_attempts) VALUES (%(queue)s, NULL)
ON CONFLICT (name) DO NOTHING
"""

UNREGISTER = "DELETE FROM {registry} WHERE name = %(queue)s"

EXISTS = "SELECT to_regclass(%(table)s) IS NOT NULL"
