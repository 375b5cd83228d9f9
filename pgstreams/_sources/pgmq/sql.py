"""SQL of PgmqQueue.

Sending, reading, popping, metrics and administration call pgmq's own functions, one
statement per operation. pgmq has no lease token, so pgstreams names a delivery by
``(msg_id, read_ct)`` (each read bumps ``read_ct``). Settling a delivery must check that
pair, which ``pgmq.delete``/``archive``/``set_vt`` cannot, so ack, nack and extend run
what those functions run on the queue's tables, with the check added: a consumer whose
visibility timeout ran out and whose message was read again cannot settle it any more.
Handing back read-ahead messages and moving messages to the dead-letter queue are guarded
the same way.

``{qtable}`` (the queue's table), ``{atable}`` (its archive), ``{dtable}`` (its dead-letter
queue's table) and ``{registry}`` are identifiers; values are ``%(name)s`` parameters.
"""

from __future__ import annotations

# Column list of every read: what an Envelope or a put-back needs, JSON as text. The
# message comes second, where the auto-ack put-back bookkeeping (Handed) expects it.
_COLUMNS = "msg_id, message::text, read_ct, enqueued_at, headers::text"

SEND = """
SELECT * FROM pgmq.send(%(queue)s, %(msg)s::jsonb, %(headers)s::jsonb,
                        clock_timestamp() + %(delay)s * interval '1 second')
"""

# The batch travels as one JSON array: adapting a Python list to jsonb[] costs the client
# several times what the insert costs the server.
SEND_BATCH = """
WITH m AS (
    SELECT ARRAY(SELECT e FROM jsonb_array_elements(%(msgs)s::jsonb) WITH ORDINALITY AS x(e, n)
                 ORDER BY n) AS msgs
)
SELECT s.* FROM m, pgmq.send_batch(
    %(queue)s, m.msgs, array_fill(%(headers)s::jsonb, ARRAY[cardinality(m.msgs)]),
    clock_timestamp() + %(delay)s * interval '1 second') AS s
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

# Settling a delivery checks that read_ct still names it, which pgmq.delete, pgmq.archive
# and pgmq.set_vt cannot do: these are the statements those functions run, plus that check.
_ARCHIVED = "msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers"

ACK_DELETE = """
DELETE FROM {qtable} WHERE msg_id = %(id)s AND read_ct = %(read_ct)s RETURNING true
"""

ACK_ARCHIVE = f"""
WITH d AS (
    DELETE FROM {{qtable}} WHERE msg_id = %(id)s AND read_ct = %(read_ct)s
    RETURNING {_ARCHIVED}
)
INSERT INTO {{atable}} ({_ARCHIVED}) SELECT {_ARCHIVED} FROM d RETURNING true
"""

# ids and read counts arrive as comma-separated text: adapting two Python lists to arrays
# costs the client more than the server spends parsing the text.
_HELD_MANY = """
    DELETE FROM {qtable} m
    USING unnest(string_to_array(%(ids)s, ',')::bigint[],
                 string_to_array(%(read_cts)s, ',')::int[]) AS x(id, rc)
    WHERE m.msg_id = x.id AND m.read_ct = x.rc"""

ACK_MANY_DELETE = f"""
WITH d AS ({_HELD_MANY}
    RETURNING 1
)
SELECT count(*) FROM d
"""

ACK_MANY_ARCHIVE = f"""
WITH d AS ({_HELD_MANY}
    RETURNING {", ".join("m." + c for c in _ARCHIVED.split(", "))}
), a AS (
    INSERT INTO {{atable}} ({_ARCHIVED}) SELECT {_ARCHIVED} FROM d RETURNING 1
)
SELECT count(*) FROM a
"""

EXTEND = """
UPDATE {qtable} SET vt = clock_timestamp() + %(seconds)s * interval '1 second'
WHERE msg_id = %(id)s AND read_ct = %(read_ct)s
RETURNING msg_id
"""

# A nack is set_vt plus a record of the attempt it ends and its error (read back when the
# message goes to the dead-letter queue), in one guarded statement.
NACK = """
UPDATE {qtable}
SET vt = clock_timestamp() + %(delay)s * interval '1 second',
    headers = CASE jsonb_typeof(headers) WHEN 'object' THEN headers ELSE '{{}}' END
              || jsonb_build_object(
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
