-- A manual retry of a failed or cancelled run gives each unfinished step a fresh attempt
-- budget: the attempts made before the last retry no longer count against `retries`, and
-- the history keeps them (attempt numbers go on from where they were).
-- Placeholders: {steps} the steps table.
ALTER TABLE {steps} ADD COLUMN IF NOT EXISTS retried_attempts integer NOT NULL DEFAULT 0;
