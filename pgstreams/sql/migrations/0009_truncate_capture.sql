-- TRUNCATE capture: one change per TRUNCATE statement (op 'truncate', no row images), made
-- by a statement-level AFTER TRUNCATE trigger -- whatever the table's capture mode, since
-- TRUNCATE fires no row triggers. It takes the arguments of the other capture functions
-- (see 0003_changes.sql) and uses the first two: the stream key and the NOTIFY channel.
CREATE OR REPLACE FUNCTION {schema}.capture_truncate() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {schema}.changes (stream, op) VALUES (TG_ARGV[0], 'truncate');
    PERFORM pg_notify(TG_ARGV[1], '') WHERE TG_ARGV[1] <> '';
    RETURN NULL;
END
$fn$;

-- Captures installed before this version get the truncate trigger when they had every
-- operation there was (the default): what install_trigger() with the same arguments now
-- installs. A capture of chosen operations keeps its choice. The new trigger copies the
-- arguments of the capture's insert trigger (its NOTIFY channel may be a hash the server
-- cannot compute), and is found through the triggers, not the registry, so a table renamed
-- since its install is upgraded too. Cloned row triggers of partitions are not captures of
-- their own (tgparentid); a partitioned table gets its truncate trigger on the parent.
DO $do$
DECLARE
    -- The library schema, found without writing its name into a string.
    lib CONSTANT oid := (SELECT t.typnamespace FROM pg_catalog.pg_type t
                         WHERE t.oid = pg_typeof(NULL::{schema}.changes));
    prefix CONSTANT text := (SELECT n.nspname FROM pg_catalog.pg_namespace n
                             WHERE n.oid = lib);
    capture record;
    rest bytea;
    cut integer;
    args text[];
BEGIN
    FOR capture IN
        SELECT t.tgargs, t.tgnargs,
               quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS tab
        FROM pg_catalog.pg_trigger t
        JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
        JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE p.pronamespace = lib
          AND p.proname IN ('capture_changes', 'capture_row_changes')
          AND t.tgparentid = 0
          AND t.tgname = prefix || '_capture_insert'
          AND (SELECT count(*) FROM pg_catalog.pg_trigger o
               WHERE o.tgrelid = t.tgrelid AND o.tgfoid = t.tgfoid AND o.tgparentid = 0
                 AND o.tgname IN (prefix || '_capture_update', prefix || '_capture_delete')) = 2
    LOOP
        -- tgargs holds the arguments as zero-terminated strings.
        args := ARRAY[]::text[];
        rest := capture.tgargs;
        FOR i IN 1 .. capture.tgnargs LOOP
            cut := position(decode('00', 'hex') IN rest);
            args := args || convert_from(substring(rest FROM 1 FOR cut - 1),
                                         current_setting('server_encoding'));
            rest := substring(rest FROM cut + 1);
        END LOOP;
        EXECUTE 'DROP TRIGGER IF EXISTS ' || quote_ident(prefix || '_capture_trunc')
            || ' ON ' || capture.tab;
        EXECUTE 'CREATE TRIGGER ' || quote_ident(prefix || '_capture_trunc')
            || ' AFTER TRUNCATE ON ' || capture.tab
            || ' FOR EACH STATEMENT EXECUTE FUNCTION ' || quote_ident(prefix)
            || '.capture_truncate('
            || (SELECT string_agg(quote_literal(a.arg), ', ' ORDER BY a.i)
                FROM unnest(args) WITH ORDINALITY AS a(arg, i))
            || ')';
        UPDATE {schema}.change_captures
        SET operations = operations || 'truncate'::text
        WHERE stream = args[1] AND NOT 'truncate' = ANY (operations);
    END LOOP;
END
$do$;
