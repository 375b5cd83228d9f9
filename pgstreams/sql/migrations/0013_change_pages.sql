-- A round's next page of a change stream: the rows with ids in (after, top], in id order,
-- read as an ordered scan of the primary key that stops after n rows -- whatever the
-- statistics say. Planned without statistics (a change log autovacuum has not analysed
-- yet, say just after a bulk load), the plain query became a bitmap scan of the whole rest
-- of the round and a sort, so each page read the round again: a backlog of N changes cost
-- N^2/n rows read. The function's settings rule that plan out. {schema} is substituted as
-- a quoted identifier.
CREATE OR REPLACE FUNCTION {schema}.change_page(
    p_stream text, p_after bigint, p_top bigint, p_since_at timestamptz, p_since_id bigint,
    p_n integer
) RETURNS TABLE (id bigint, txid text, op text, pk text, new text, old text, at timestamptz)
LANGUAGE sql STABLE
SET enable_sort = off
SET enable_bitmapscan = off
AS $fn$
    SELECT c.id, c.txid::text, c.op, c.pk::text, c.new::text, c.old::text, c.at
    FROM {schema}.changes c
    WHERE c.stream = p_stream AND c.id > p_after AND c.id <= p_top
      AND c.at >= p_since_at AND c.id >= p_since_id
    ORDER BY c.id
    LIMIT p_n
$fn$;
