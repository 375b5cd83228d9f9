-- Statement-level trigger capture of a table with a column named "j", "n" or "o": the
-- row image was written as to_jsonb(n), where a column named n wins over the row alias
-- (capturing that column instead of the row), and the image's alias j clashed with a
-- column j ("column reference is ambiguous"). Whole-row references are now n.* / o.* and
-- the image is qualified. {schema} is substituted as a quoted identifier; braces that
-- belong to SQL are doubled.
CREATE OR REPLACE FUNCTION {schema}.capture_changes() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {schema}.changes (stream, op, pk, new)
        SELECT TG_ARGV[0], 'insert',
               CASE WHEN TG_ARGV[4] <> '' THEN jsonb_build_object(TG_ARGV[4], img.j -> TG_ARGV[4])
                    WHEN TG_ARGV[3] = '{{}}' THEN NULL
                    ELSE {schema}.capture_pick(img.j, TG_ARGV[3]::text[]) END,
               CASE WHEN TG_ARGV[2] = '' THEN img.j ELSE {schema}.capture_pick(img.j, TG_ARGV[2]::text[]) END
        FROM new_rows AS n, LATERAL to_jsonb(n.*) AS img(j);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {schema}.changes (stream, op, pk, old)
        SELECT TG_ARGV[0], 'delete',
               CASE WHEN TG_ARGV[4] <> '' THEN jsonb_build_object(TG_ARGV[4], img.j -> TG_ARGV[4])
                    WHEN TG_ARGV[3] = '{{}}' THEN NULL
                    ELSE {schema}.capture_pick(img.j, TG_ARGV[3]::text[]) END,
               CASE WHEN TG_ARGV[2] = '' THEN img.j ELSE {schema}.capture_pick(img.j, TG_ARGV[2]::text[]) END
        FROM old_rows AS o, LATERAL to_jsonb(o.*) AS img(j);
    ELSE
        -- Both transition tables receive an updated row's two versions in the same call,
        -- so their scan positions pair them (a join on the key would lose rows whose key
        -- the UPDATE changed).
        INSERT INTO {schema}.changes (stream, op, pk, new, old)
        SELECT TG_ARGV[0], 'update',
               CASE WHEN TG_ARGV[4] <> '' THEN jsonb_build_object(TG_ARGV[4], a.j -> TG_ARGV[4])
                    WHEN TG_ARGV[3] = '{{}}' THEN NULL
                    ELSE {schema}.capture_pick(a.j, TG_ARGV[3]::text[]) END,
               CASE WHEN TG_ARGV[2] = '' THEN a.j ELSE {schema}.capture_pick(a.j, TG_ARGV[2]::text[]) END,
               CASE WHEN TG_ARGV[2] = '' THEN b.j ELSE {schema}.capture_pick(b.j, TG_ARGV[2]::text[]) END
        FROM (SELECT row_number() OVER () AS rn, to_jsonb(n.*) AS j FROM new_rows AS n) a
        JOIN (SELECT row_number() OVER () AS rn, to_jsonb(o.*) AS j FROM old_rows AS o) b
          ON a.rn = b.rn;
    END IF;
    IF FOUND AND TG_ARGV[1] <> '' THEN
        PERFORM pg_notify(TG_ARGV[1], '');
    END IF;
    RETURN NULL;
END
$fn$;
