"""SQL of the Scheduler. ``{schedules}``/``{ticks}`` are identifiers substituted with
``psycopg.sql``; values are always ``%(name)s`` parameters. Schedule times (``now``, fire
and due times) are parameters from the scheduler's clock; leases use the server's
``clock_timestamp()``."""

from __future__ import annotations

_SCHEDULE_COLUMNS = """
id, name, cron, interval_us, timezone, anchor, max_catch_up, jitter, overlap, metadata, paused,
next_at, created_at, updated_at
"""

_TICK_COLUMNS = """
id, schedule_id, scheduled_at, due_at, fired_at, done_at, kind, status, jitter, metadata, claims
"""

_SAME_TIMING = """(s.cron, s.interval_us, s.timezone)
    IS NOT DISTINCT FROM (EXCLUDED.cron, EXCLUDED.interval_us, EXCLUDED.timezone)"""

# Upsert. The anchor and next fire time stay unless the timing (cron, interval, zone)
# changed; then both start from the time of this call.
REGISTER = f"""
INSERT INTO {{schedules}} AS s
    (id, name, cron, interval_us, timezone, anchor, max_catch_up, jitter, overlap, metadata,
     next_at)
VALUES (%(id)s, %(name)s, %(cron)s, %(interval_us)s, %(timezone)s, %(now)s, %(max_catch_up)s,
        %(jitter)s, %(overlap)s, %(metadata)s::jsonb, %(next_at)s)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name,
    max_catch_up = EXCLUDED.max_catch_up,
    jitter = EXCLUDED.jitter,
    overlap = EXCLUDED.overlap,
    metadata = EXCLUDED.metadata,
    cron = EXCLUDED.cron,
    interval_us = EXCLUDED.interval_us,
    timezone = EXCLUDED.timezone,
    anchor = CASE WHEN {_SAME_TIMING} THEN s.anchor ELSE EXCLUDED.anchor END,
    next_at = CASE WHEN {_SAME_TIMING} THEN s.next_at ELSE EXCLUDED.next_at END,
    updated_at = now()
RETURNING {_SCHEDULE_COLUMNS}
"""

GET = f"SELECT {_SCHEDULE_COLUMNS} FROM {{schedules}} WHERE id = %(id)s"
GET_FOR_UPDATE = f"{GET} FOR NO KEY UPDATE"
LIST = f"SELECT {_SCHEDULE_COLUMNS} FROM {{schedules}} ORDER BY id"
UNREGISTER = "DELETE FROM {schedules} WHERE id = %(id)s RETURNING id"
PAUSE = "UPDATE {schedules} SET paused = true, updated_at = now() WHERE id = %(id)s RETURNING id"
RESUME = """
UPDATE {schedules} SET paused = false, next_at = %(next_at)s, updated_at = now()
WHERE id = %(id)s AND paused
"""
NOTIFY = "SELECT pg_notify(%(channel)s, '')"

# -- the leader ------------------------------------------------------------------------

# The previous pass's time, replaced by this one's.
LEAD_ALIVE = """
WITH prev AS (SELECT alive_at FROM {state} FOR UPDATE)
UPDATE {state} SET alive_at = %(now)s FROM prev RETURNING prev.alive_at
"""

LEAD_DUE = f"""
SELECT {_SCHEDULE_COLUMNS} FROM {{schedules}}
WHERE NOT paused AND next_at <= %(now)s
ORDER BY next_at
FOR NO KEY UPDATE
"""

# One fire time. Overlap is decided here, against the schedule's open ticks in this
# transaction (earlier fire times of the same pass included).
LEAD_TICK = """
INSERT INTO {ticks} (schedule_id, scheduled_at, due_at, jitter, kind, serial, status, metadata,
                     created_at)
SELECT %(id)s, %(at)s, %(due)s, %(jitter)s, %(kind)s, %(overlap)s <> 'allow',
       CASE
           WHEN %(overlap)s = 'skip' AND EXISTS (
               SELECT 1 FROM {ticks} o
               WHERE o.schedule_id = %(id)s AND o.status IN ('pending', 'running'))
           THEN 'skipped'
           WHEN %(overlap)s = 'queue_one' AND EXISTS (
               SELECT 1 FROM {ticks} o
               WHERE o.schedule_id = %(id)s AND o.status = 'pending')
           THEN 'skipped'
           ELSE 'pending'
       END,
       %(metadata)s::jsonb, %(now)s
ON CONFLICT (schedule_id, scheduled_at) WHERE kind <> 'manual' DO NOTHING
"""

LEAD_ADVANCE = "UPDATE {schedules} SET next_at = %(next_at)s WHERE id = %(id)s"

LEAD_NEXT = "SELECT min(next_at) FROM {schedules} WHERE NOT paused"

# Finished ticks past the history window, a bounded batch per pass.
LEAD_PRUNE = """
DELETE FROM {ticks} WHERE id IN (
    SELECT id FROM {ticks}
    WHERE status IN ('done', 'skipped') AND scheduled_at < %(before)s
    LIMIT 1000
)
"""

# -- consumers -------------------------------------------------------------------------

# Ticks a consumer may take once due: pending, or running on a lease that ran out (its
# consumer died; such a tick is finished even if the schedule was paused since). A serial
# tick waits while another tick of its schedule runs; the unique index
# schedule_ticks_one_running settles races the snapshot cannot see.
_TAKEABLE = """
    t.status IN ('pending', 'running')
    AND (t.status = 'pending' OR t.lease_until <= clock_timestamp())
    AND (%(schedule)s::text IS NULL OR t.schedule_id = %(schedule)s::text)
    AND (NOT s.paused OR t.kind IN ('manual', 'backfill') OR t.status = 'running')
    AND NOT (t.serial AND t.status = 'pending' AND EXISTS (
        SELECT 1 FROM {ticks} r
        WHERE r.schedule_id = t.schedule_id AND r.status = 'running' AND r.serial))
"""

CLAIM = f"""
WITH c AS (
    SELECT t.id
    FROM {{ticks}} t JOIN {{schedules}} s ON s.id = t.schedule_id
    WHERE {_TAKEABLE} AND t.due_at <= %(now)s
    ORDER BY t.due_at, t.id
    LIMIT 1
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE {{ticks}} t
SET status = 'running', claimed_by = %(me)s, claims = t.claims + 1, fired_at = %(now)s,
    lease_until = clock_timestamp() + %(lease)s * interval '1 second'
FROM c
WHERE t.id = c.id
RETURNING {", ".join("t." + c.strip() for c in _TICK_COLUMNS.split(","))}
"""

# Seconds (on the scheduler's clock) until the next takeable tick is due; NULL if none.
NEXT_DUE = f"""
SELECT extract(epoch FROM min(t.due_at) - %(now)s)::float8
FROM {{ticks}} t JOIN {{schedules}} s ON s.id = t.schedule_id
WHERE {_TAKEABLE}
"""

FINISH = """
WITH d AS (
    UPDATE {ticks} SET status = 'done', done_at = %(now)s, lease_until = NULL
    WHERE id = %(id)s AND status = 'running' AND claimed_by = %(me)s AND claims = %(claims)s
    RETURNING serial
)
SELECT pg_notify(%(channel)s, '') FROM d WHERE d.serial
"""

RELEASE = """
WITH r AS (
    UPDATE {ticks} SET status = 'pending', claimed_by = NULL, lease_until = NULL
    WHERE id = %(id)s AND status = 'running' AND claimed_by = %(me)s AND claims = %(claims)s
    RETURNING id
)
SELECT pg_notify(%(channel)s, '') FROM r
"""

RENEW = """
UPDATE {ticks} t SET lease_until = clock_timestamp() + %(lease)s * interval '1 second'
FROM unnest(%(ids)s::bigint[], %(claims)s::int[]) AS h(id, claims)
WHERE t.id = h.id AND t.claims = h.claims AND t.status = 'running' AND t.claimed_by = %(me)s
"""

# -- manual ticks ----------------------------------------------------------------------

TRIGGER = f"""
INSERT INTO {{ticks}} (schedule_id, scheduled_at, due_at, kind, serial, status, metadata,
                       created_at)
SELECT s.id, %(now)s, %(now)s, 'manual', s.overlap <> 'allow', 'pending', s.metadata, %(now)s
FROM {{schedules}} s WHERE s.id = %(id)s
RETURNING {_TICK_COLUMNS}
"""

BACKFILL = f"""
INSERT INTO {{ticks}} (schedule_id, scheduled_at, due_at, kind, serial, status, metadata,
                       created_at)
SELECT s.id, f.at, %(now)s, 'backfill', s.overlap <> 'allow', 'pending', s.metadata, %(now)s
FROM {{schedules}} s, unnest(%(fires)s::timestamptz[]) AS f(at)
WHERE s.id = %(id)s
ORDER BY f.at
ON CONFLICT (schedule_id, scheduled_at) WHERE kind <> 'manual' DO NOTHING
RETURNING {_TICK_COLUMNS}
"""

HISTORY = f"""
SELECT {_TICK_COLUMNS} FROM {{ticks}} WHERE schedule_id = %(id)s
ORDER BY scheduled_at DESC, id DESC LIMIT %(limit)s
"""
