-- PgStepQueue. {tasks} is the step_tasks table (sql/migrations/0005_step_queue.sql); every
-- statement is scoped to one namespace.

-- name: enqueue
INSERT INTO {tasks} (namespace, queue, workflow_id, step_name, input, prev_results, priority)
VALUES (%(ns)s, %(queue)s, %(workflow_id)s, %(step)s, %(input)s::jsonb,
        %(prev)s::jsonb, %(priority)s)
RETURNING id

-- name: _candidates
-- Up to ``limit`` candidates per queue, locked, ranked within their queue. The claim
-- blocks below pick the best ``limit`` of them by their fairness order; the others are
-- unlocked at commit.
cand AS (
    SELECT c.id, c.priority, q.pos, q.weight, q.turn
    FROM unnest(%(queues)s::text[], %(weights)s::float8[], %(turns)s::float8[])
         WITH ORDINALITY AS q(name, weight, turn, pos)
    CROSS JOIN LATERAL (
        SELECT t.id, t.priority FROM {tasks} t
        WHERE t.namespace = %(ns)s AND t.queue = q.name AND t.status = 'pending'
        ORDER BY t.priority DESC, t.id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) c
),
ranked AS (
    SELECT id, priority, pos, weight, turn,
           row_number() OVER (PARTITION BY pos ORDER BY priority DESC, id) AS rn
    FROM cand
)

-- name: _take_picked
-- Claims the picked tasks; returns each with its place in the fairness order and, on
-- every row, the positions of the queues that had candidates.
UPDATE {tasks} t
SET status = 'running', claimed_by = %(worker)s, claimed_at = now(), claims = t.claims + 1
FROM picked
WHERE t.id = picked.id
RETURNING picked.ord, (SELECT array_agg(DISTINCT pos) FROM cand),
          t.id, t.queue, t.workflow_id, t.step_name, t.input, t.prev_results, t.priority,
          t.status, t.claimed_by, t.claims, t.created_at

-- name: claim_by_priority
-- strict-priority: highest priority first across the queues, oldest first within one.
WITH {_candidates},
picked AS (
    SELECT id, row_number() OVER (ORDER BY priority DESC, id) AS ord
    FROM ranked ORDER BY priority DESC, id LIMIT %(limit)s
)
{_take_picked}

-- name: claim_by_turns
-- weighted, and round-robin (every weight 1): the queue with the fewest turns taken so far
-- (tasks claimed / weight) first, then the order the queues were given in.
WITH {_candidates},
picked AS (
    SELECT id, row_number() OVER (ORDER BY turn + rn / weight, pos, id) AS ord
    FROM ranked ORDER BY turn + rn / weight, pos, id LIMIT %(limit)s
)
{_take_picked}

-- name: finish
UPDATE {tasks}
SET status = %(status)s, result = %(result)s::jsonb, error = %(error)s::jsonb,
    duration_ms = %(duration)s, finished_at = now()
WHERE id = %(id)s AND namespace = %(ns)s AND status = 'running'
  AND claimed_by = %(worker)s
RETURNING 1

-- name: requeue
UPDATE {tasks} SET status = 'pending', claimed_by = NULL, claimed_at = NULL
WHERE namespace = %(ns)s AND status = 'running'
  AND (%(stale)s::float8 IS NULL
       OR claimed_at < now() - %(stale)s::float8 * interval '1 second')
  AND (%(by)s::text IS NULL OR claimed_by = %(by)s)
RETURNING 1

-- name: metrics
SELECT queue, status, count(*) FROM {tasks} WHERE namespace = %(ns)s
GROUP BY queue, status
