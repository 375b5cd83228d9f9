-- Wake-ups for whoever waits on the runs table, and an index for pruning finished runs.
-- Placeholders: {schema} the tables' schema, {runs} the runs table, {runs_ended} the index.
--
-- NOTIFY, from triggers so that every writer wakes the waiters, whichever statement (or
-- tool) changed the row: a start (once per INSERT statement, however many rows) and a run
-- handed back to the queue wake this table's idle workers; a run that ends (completed,
-- failed, cancelled) wakes the result() waiters of that run. Channel names are hashed --
-- 'pgstreams.' and the first 32 hex digits of the SHA-256 of a topic text -- so that any
-- workflow id fits NOTIFY's 63 bytes; PgWorkflowStorage computes the same names:
--   workers: pgstreams:workflows:<schema>:<runs table>
--   a run:   pgstreams:workflows:<schema>:<runs table>:ended:<workflow id>
-- The function is shared by every runs table of the schema (its text is the same for each).
CREATE OR REPLACE FUNCTION {schema}.workflow_wakeup() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    topic text := 'pgstreams:workflows:' || TG_TABLE_SCHEMA || ':' || TG_TABLE_NAME;
BEGIN
    IF TG_LEVEL = 'ROW' AND NEW.status <> 'queued' THEN
        topic := topic || ':ended:' || NEW.workflow_id;
    END IF;
    PERFORM pg_notify(
        'pgstreams.' || left(encode(sha256(convert_to(topic, 'UTF8')), 'hex'), 32), '');
    RETURN NULL;
END
$$;

CREATE TRIGGER workflow_started AFTER INSERT ON {runs}
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.workflow_wakeup();

-- Claims (queued -> running) and lease renewals notify nobody: the WHEN clause keeps the
-- function from being called at all for them.
CREATE TRIGGER workflow_status AFTER UPDATE OF status ON {runs}
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('queued', 'completed', 'failed', 'cancelled'))
    EXECUTE FUNCTION {schema}.workflow_wakeup();

-- Retention deletes the runs that ended before a cutoff, oldest first.
CREATE INDEX IF NOT EXISTS {runs_ended} ON {runs} (updated_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
