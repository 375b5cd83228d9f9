-- SQL of the Scheduler. {schedules}, {ticks} and {state} are identifiers substituted with
-- psycopg.sql; values are always parameters. Schedule times (now, fire and due times) are
-- parameters from the scheduler's clock; leases use the server's clock_timestamp().

-- name: _schedule_columns
id, name, cron, interval_us, timezone, anchor, max_catch_up, jitter, overlap, metadata, paused,
next_at, created_at, updated_at

-- name: _tick_columns
id, schedule_id, scheduled_at, due_at, fired_at, done_at, kind, status, jitter, metadata, claims

-- name: _same_timing
(s.cron, s.interval_us, s.timezone)
    IS NOT DISTINCT FROM (EXCLUDED.cron, EXCLUDED.interval_us, EXCLUDED.timezone)

-- name: register
-- Upsert. The anchor and next fire time stay unless the timing (cron, interval, zone)
-- changed; then both start from the time of this call.
INSERT INTO {schedules} AS s
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
    anchor = CASE WHEN {_same_timing} THEN s.anchor ELSE EXCLUDED.anchor END,
    next_at = CASE WHEN {_same_timing} THEN s.next_at ELSE EXCLUDED.next_at END,
    updated_at = now()
RETURNING {_schedule_columns}

-- name: get
SELECT {_schedule_columns} FROM {schedules} WHERE id = %(id)s

-- name: get_for_update
SELECT {_schedule_columns} FROM {schedules} WHERE id = %(id)s FOR NO KEY UPDATE

-- name: list
SELECT {_schedule_columns} FROM {schedules} ORDER BY id

-- name: unregister
-- Waits for a leader pass that is making ticks of this schedule (it holds the row).
DELETE FROM {schedules} WHERE id = %(id)s RETURNING id

-- name: cancel_open
-- After unregister: ticks not yet delivered never will be. A tick being handled is left to
-- its consumer, which finishes it as usual; marked unregistered, it is cancelled if given
-- back or left behind, never taken again (by a schedule registered later under this id).
UPDATE {ticks}
SET unregistered = true,
    status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END,
    done_at = CASE WHEN status = 'pending' THEN %(now)s ELSE done_at END
WHERE schedule_id = %(id)s AND status IN ('pending', 'running')

-- name: delete_ticks
DELETE FROM {ticks} WHERE schedule_id = %(id)s

-- name: pause
UPDATE {schedules} SET paused = true, updated_at = now() WHERE id = %(id)s RETURNING id

-- name: resume
UPDATE {schedules} SET paused = false, next_at = %(next_at)s, updated_at = now()
WHERE id = %(id)s AND paused

-- name: notify
SELECT pg_notify(%(channel)s, '')

-- name: lead_try_lock
-- The leader's lock is the session's: it goes when the connection goes.
SELECT pg_try_advisory_lock(%(key)s)

-- name: lead_alive
-- The previous pass's time, replaced by this one's.
WITH prev AS (SELECT alive_at FROM {state} FOR UPDATE)
UPDATE {state} SET alive_at = %(now)s FROM prev RETURNING prev.alive_at

-- name: lead_due
SELECT {_schedule_columns} FROM {schedules}
WHERE NOT paused AND next_at <= %(now)s
ORDER BY next_at
FOR NO KEY UPDATE

-- name: lead_tick
-- One fire time. Overlap is decided here, against the schedule's open ticks in this
-- transaction (earlier fire times of the same pass included).
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

-- name: lead_advance
UPDATE {schedules} SET next_at = %(next_at)s WHERE id = %(id)s

-- name: lead_next
SELECT min(next_at) FROM {schedules} WHERE NOT paused

-- name: lead_prune
-- Finished ticks past the history window, a bounded batch per pass (whether or not their
-- schedule still exists).
DELETE FROM {ticks} WHERE id IN (
    SELECT id FROM {ticks}
    WHERE status IN ('done', 'skipped', 'cancelled') AND scheduled_at < %(before)s
    LIMIT 1000
)

-- name: lead_cancel_orphans
-- Open ticks of unregistered schedules that no consumer will finish: pending ones that
-- slipped past unregister, and running ones whose consumer died (lease out).
UPDATE {ticks} SET status = 'cancelled', done_at = %(now)s, lease_until = NULL
WHERE id IN (
    SELECT t.id FROM {ticks} t
    WHERE t.status IN ('pending', 'running')
      AND (t.status = 'pending' OR t.lease_until <= clock_timestamp())
      AND (t.unregistered
           OR NOT EXISTS (SELECT 1 FROM {schedules} s WHERE s.id = t.schedule_id))
    LIMIT 1000
)

-- name: _takeable
-- Ticks a consumer may take once due: pending, or running on a lease that ran out (its
-- consumer died; such a tick is finished even if the schedule was paused since). Only
-- ticks of a registered schedule (the consumers join it), and none that was open when its
-- schedule was unregistered. A serial tick waits while another tick of its schedule runs;
-- the unique index schedule_ticks_one_running settles races the snapshot cannot see.
    t.status IN ('pending', 'running')
    AND (t.status = 'pending' OR t.lease_until <= clock_timestamp())
    AND NOT t.unregistered
    AND (%(schedule)s::text IS NULL OR t.schedule_id = %(schedule)s::text)
    AND (NOT s.paused OR t.kind IN ('manual', 'backfill') OR t.status = 'running')
    AND NOT (t.serial AND t.status = 'pending' AND EXISTS (
        SELECT 1 FROM {ticks} r
        WHERE r.schedule_id = t.schedule_id AND r.status = 'running' AND r.serial))

-- name: claim
WITH c AS (
    SELECT t.id
    FROM {ticks} t JOIN {schedules} s ON s.id = t.schedule_id
    WHERE {_takeable} AND t.due_at <= %(now)s
    ORDER BY t.due_at, t.id
    LIMIT 1
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE {ticks} t
SET status = 'running', claimed_by = %(me)s, claims = t.claims + 1, fired_at = %(now)s,
    lease_until = clock_timestamp() + %(lease)s * interval '1 second'
FROM c
WHERE t.id = c.id
RETURNING t.id, t.schedule_id, t.scheduled_at, t.due_at, t.fired_at, t.done_at, t.kind,
          t.status, t.jitter, t.metadata, t.claims

-- name: next_due
-- Seconds (on the scheduler's clock) until the next takeable tick is due; NULL if none.
SELECT extract(epoch FROM min(t.due_at) - %(now)s)::float8
FROM {ticks} t JOIN {schedules} s ON s.id = t.schedule_id
WHERE {_takeable}

-- name: finish
WITH d AS (
    UPDATE {ticks} SET status = 'done', done_at = %(now)s, lease_until = NULL
    WHERE id = %(id)s AND status = 'running' AND claimed_by = %(me)s AND claims = %(claims)s
    RETURNING serial
)
SELECT pg_notify(%(channel)s, '') FROM d WHERE d.serial

-- name: release
-- A tick of a schedule unregistered while it ran is cancelled instead.
WITH r AS (
    UPDATE {ticks}
    SET status = CASE WHEN unregistered THEN 'cancelled' ELSE 'pending' END,
        done_at = CASE WHEN unregistered THEN %(now)s END,
        claimed_by = NULL, lease_until = NULL
    WHERE id = %(id)s AND status = 'running' AND claimed_by = %(me)s AND claims = %(claims)s
    RETURNING id, unregistered
)
SELECT pg_notify(%(channel)s, '') FROM r WHERE NOT r.unregistered

-- name: renew
UPDATE {ticks} t SET lease_until = clock_timestamp() + %(lease)s * interval '1 second'
FROM unnest(%(ids)s::bigint[], %(claims)s::int[]) AS h(id, claims)
WHERE t.id = h.id AND t.claims = h.claims AND t.status = 'running' AND t.claimed_by = %(me)s

-- name: trigger
-- The schedule's row is locked (KEY SHARE) so that unregister, which deletes it first,
-- waits for this tick and then finds it.
INSERT INTO {ticks} (schedule_id, scheduled_at, due_at, kind, serial, status, metadata,
                     created_at)
SELECT s.id, %(now)s, %(now)s, 'manual', s.overlap <> 'allow', 'pending', s.metadata, %(now)s
FROM {schedules} s WHERE s.id = %(id)s
FOR KEY SHARE
RETURNING {_tick_columns}

-- name: backfill
-- Locks the schedule's row as trigger does.
INSERT INTO {ticks} (schedule_id, scheduled_at, due_at, kind, serial, status, metadata,
                     created_at)
SELECT s.id, f.at, %(now)s, 'backfill', s.overlap <> 'allow', 'pending', s.metadata, %(now)s
FROM {schedules} s, unnest(%(fires)s::timestamptz[]) AS f(at)
WHERE s.id = %(id)s
ORDER BY f.at
FOR KEY SHARE OF s
ON CONFLICT (schedule_id, scheduled_at) WHERE kind <> 'manual' DO NOTHING
RETURNING {_tick_columns}

-- name: history
SELECT {_tick_columns} FROM {ticks} WHERE schedule_id = %(id)s
ORDER BY scheduled_at DESC, id DESC LIMIT %(limit)s
