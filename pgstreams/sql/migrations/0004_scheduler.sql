-- Scheduler: schedules, and one row per tick. {schema} is substituted as a quoted
-- identifier; braces that belong to SQL are doubled.

-- A schedule fires on ``cron`` (in ``timezone``) or every ``interval_us`` from ``anchor``.
-- next_at is its first fire time not yet accounted for: the leader turns every fire time up
-- to now into ticks (or skips it) and moves next_at past now, in one transaction.
CREATE TABLE IF NOT EXISTS {schema}.schedules (
    id            text        PRIMARY KEY,
    name          text,
    cron          text,
    interval_us   bigint      CHECK (interval_us > 0),
    timezone      text        NOT NULL,
    anchor        timestamptz NOT NULL,
    max_catch_up  integer     NOT NULL CHECK (max_catch_up >= 0),
    jitter        double precision NOT NULL CHECK (jitter >= 0),
    overlap       text        NOT NULL CHECK (overlap IN ('skip', 'allow', 'queue_one')),
    metadata      jsonb       NOT NULL,
    paused        boolean     NOT NULL DEFAULT false,
    next_at       timestamptz,
    missed        bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (interval_us IS NULL))
);
CREATE INDEX IF NOT EXISTS schedules_due ON {schema}.schedules (next_at) WHERE NOT paused;

-- When a leader last ran a pass (the scheduler's clock): fire times that came due while
-- one ran are on time, those that passed while none did are missed (catch-up rules).
CREATE TABLE IF NOT EXISTS {schema}.scheduler_state (
    id        boolean     PRIMARY KEY DEFAULT true CHECK (id),
    alive_at  timestamptz
);
INSERT INTO {schema}.scheduler_state (id) VALUES (true) ON CONFLICT DO NOTHING;

-- kind: scheduled (on time), catch_up (a missed fire time, emitted late), manual
-- (trigger_now) or backfill. serial: the schedule's overlap was not 'allow' when the tick was
-- made, so it runs only while no other serial tick of the schedule runs. status: pending ->
-- running (leased to claimed_by until lease_until, server time) -> done; or skipped.
-- Schedule times (scheduled_at, due_at, created_at, fired_at, done_at) come from the
-- scheduler's clock.
CREATE TABLE IF NOT EXISTS {schema}.schedule_ticks (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    schedule_id   text        NOT NULL REFERENCES {schema}.schedules (id) ON DELETE CASCADE,
    scheduled_at  timestamptz NOT NULL,
    due_at        timestamptz NOT NULL,
    jitter        double precision NOT NULL DEFAULT 0,
    kind          text        NOT NULL CHECK (kind IN ('scheduled', 'catch_up', 'manual', 'backfill')),
    serial        boolean     NOT NULL,
    status        text        NOT NULL CHECK (status IN ('pending', 'running', 'done', 'skipped')),
    metadata      jsonb       NOT NULL,
    created_at    timestamptz NOT NULL,
    fired_at      timestamptz,
    done_at       timestamptz,
    claimed_by    text,
    claims        integer     NOT NULL DEFAULT 0,
    lease_until   timestamptz
);
-- Exactly one tick per fire time, however many leaders there ever were (manual ticks are
-- extra by definition).
CREATE UNIQUE INDEX IF NOT EXISTS schedule_ticks_once
    ON {schema}.schedule_ticks (schedule_id, scheduled_at) WHERE kind <> 'manual';
-- At most one running serial tick per schedule, whatever races the claimers run.
CREATE UNIQUE INDEX IF NOT EXISTS schedule_ticks_one_running
    ON {schema}.schedule_ticks (schedule_id) WHERE status = 'running' AND serial;
CREATE INDEX IF NOT EXISTS schedule_ticks_open
    ON {schema}.schedule_ticks (due_at, id) WHERE status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS schedule_ticks_open_by_schedule
    ON {schema}.schedule_ticks (schedule_id) WHERE status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS schedule_ticks_history
    ON {schema}.schedule_ticks (schedule_id, scheduled_at DESC);
CREATE INDEX IF NOT EXISTS schedule_ticks_finished
    ON {schema}.schedule_ticks (scheduled_at) WHERE status IN ('done', 'skipped');
