-- Dead messages in the order dead_letters() lists them, so it and requeue_dead() read the
-- dead set without scanning the live messages. Partial: live messages add no entries, and
-- dead_at already decides the ready index's entries, so no update loses HOT for it.
CREATE INDEX IF NOT EXISTS {dead_idx} ON {table} (dead_at, id) WHERE dead_at IS NOT NULL;
