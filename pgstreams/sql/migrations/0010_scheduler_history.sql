-- Scheduler: a tick's history outlives its schedule. {schema} is substituted as a quoted
-- identifier; braces that belong to SQL are doubled.

-- unregister() keeps the ticks unless asked not to, so they no longer cascade with their
-- schedule. Ticks are still made only for a schedule that exists: the statements that make
-- them lock its row (the leader FOR NO KEY UPDATE, trigger_now and backfill FOR KEY SHARE),
-- and unregister deletes the row first, then closes what is left open.
ALTER TABLE {schema}.schedule_ticks DROP CONSTRAINT IF EXISTS schedule_ticks_schedule_id_fkey;

-- cancelled: the schedule was unregistered before the tick was delivered (or while its
-- consumer was dead); it is never delivered, and it is pruned like done and skipped ticks.
ALTER TABLE {schema}.schedule_ticks DROP CONSTRAINT IF EXISTS schedule_ticks_status_check;
ALTER TABLE {schema}.schedule_ticks ADD CONSTRAINT schedule_ticks_status_check
    CHECK (status IN ('pending', 'running', 'done', 'skipped', 'cancelled'));

DROP INDEX IF EXISTS {schema}.schedule_ticks_finished;
CREATE INDEX schedule_ticks_finished
    ON {schema}.schedule_ticks (scheduled_at) WHERE status IN ('done', 'skipped', 'cancelled');

-- unregistered: the tick was open when its schedule was unregistered. Its consumer finishes
-- it as usual, but a tick given back or left behind by a dead consumer is cancelled rather
-- than taken again -- also when a schedule of the same id was registered since.
ALTER TABLE {schema}.schedule_ticks
    ADD COLUMN IF NOT EXISTS unregistered boolean NOT NULL DEFAULT false;
