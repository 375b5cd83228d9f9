"""PgQueue throughput against a "floor": the same SQL work written by hand on psycopg.

Run::

    python benchmarks/queue.py [--dsn DSN] [--messages N] [--embedded]

The floor is one autocommit ``psycopg.AsyncConnection`` running hand-written statements on
a table of the same shape as a PgQueue table (same columns, same partial ready index):
publish = INSERT with ``pg_notify`` in the same statement; consume = ``UPDATE ... WHERE id =
ANY(ARRAY(SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)) RETURNING`` to lease (the same
cheap-to-plan shape PgQueue uses); ack = DELETE by id and attempts (the lease) for one
message, by ``id = ANY(...)`` alone for a batch; auto-ack consume = one round trip per batch
that commits the previous batch's transaction and, in a new one left open while the batch
is handed out, deletes the next (``DELETE ... WHERE id = ANY(ARRAY(...)) RETURNING``), and a
commit at the end -- the work PgQueue's auto-ack does so that a dropped connection or a dead
consumer loses nothing (a message is deleted once the next is asked for). JSON goes in as
text parameters cast with ``::jsonb`` and comes out decoded, as with PgQueue.

``metrics()`` reports an exact count of completed messages, so every PgQueue ack or pop
statement also adds to a counter row. Doing the same work, the floor's ack and pop
statements update a counter table of the same shape in the same statement. The consume
rows also time "bare" SQL that skips the counter, and print PgQueue's ratio to it: the
price of the counter, shown rather than hidden.

Each row is measured for both in the same run, interleaved (floor, PgQueue, floor, ...),
after an untimed warm-up; every run starts from a truncated table (prefilled and vacuumed
for the consume rows). The table reports medians: of each side's rates, and of the ratio
of the two within each round.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts this folder first on sys.path, where this file would shadow
# the standard library's ``queue`` (imported by pgstreams, psycopg_pool, asyncio): put the
# repository root there instead, which also makes ``benchmarks._common`` importable.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg.rows import TupleRow

import pgstreams as ps
from benchmarks._common import (
    Contender,
    fresh_database,
    interleaved,
    markdown_table,
    median_ratio,
    queue_args,
    rate,
    server,
    server_facts,
)
from pgstreams._sources.queue.queue import SHARDS

Conn = psycopg.AsyncConnection[TupleRow]

BATCH = 100
VISIBILITY = 30.0
QUEUE = "bench"
QUEUE_TABLE = f"pgstreams.q_{QUEUE}"
QUEUE_STATS = "pgstreams.queue_stats"
FLOOR_TABLE = "pgstreams.q_floor"
FLOOR_STATS = "public.floor_stats"
FLOOR_CHANNEL = "bench.floor_queue"
BODY = "lorem ipsum dolor sit amet, consectetur adipiscing elit"


def message(seq: int) -> dict[str, Any]:
    """The payload every benchmark publishes (the prefill builds the same one in SQL)."""
    return {"seq": seq, "kind": "bench", "body": BODY}


PREFILL = """
INSERT INTO {table} (payload)
SELECT jsonb_build_object('seq', g, 'kind', 'bench', 'body', %s::text)
FROM generate_series(1, %s) AS g
"""

# -- the floor: hand-written statements on a same-shaped table -----------------------------


# PgQueue's counter table, sharded by backend as PgQueue shards it; one queue's rows.
FLOOR_STATS_CREATE = f"""
CREATE TABLE {FLOOR_STATS} (
    queue text NOT NULL, shard integer NOT NULL, completed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, shard)
);
INSERT INTO {FLOOR_STATS} (queue, shard)
SELECT 'floor', g FROM generate_series(0, {SHARDS - 1}) AS g;
"""

FLOOR_PUBLISH = """
WITH ins AS (
    INSERT INTO pgstreams.q_floor (payload, headers) VALUES (%s::jsonb, %s::jsonb)
    RETURNING id
)
SELECT id, pg_notify(%s, '') FROM ins
"""

FLOOR_PUBLISH_BATCH = """
WITH ins AS (
    INSERT INTO pgstreams.q_floor (payload, headers)
    SELECT p, %s::jsonb FROM unnest(%s::jsonb[]) AS u(p)
    RETURNING id
)
SELECT array_agg(id), pg_notify(%s, '') FROM ins
"""

_FLOOR_PICK = """ARRAY(
    SELECT id FROM pgstreams.q_floor
    WHERE dead_at IS NULL AND visible_at <= now()
    ORDER BY visible_at, id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)"""

FLOOR_LEASE = f"""
UPDATE pgstreams.q_floor
SET attempts = attempts + 1,
    lease = attempts + 1,
    visible_at = now() + %s * interval '1 second'
WHERE id = ANY({_FLOOR_PICK})
RETURNING id, payload, headers, attempts, enqueued_at
"""

# The counter update each ack or pop statement makes, given CTE ``d`` of deleted rows.
_FLOOR_COUNT = f"""
UPDATE {FLOOR_STATS} SET completed = completed + (SELECT count(*) FROM d)
WHERE queue = 'floor' AND shard = pg_backend_pid() %% {SHARDS}
"""

# A lease-checked ack, as any visibility-timeout queue needs: (id, attempts) names the lease.
BARE_ACK = "DELETE FROM pgstreams.q_floor WHERE id = %s AND attempts = %s"
FLOOR_ACK = f"WITH d AS ({BARE_ACK} RETURNING 1) {_FLOOR_COUNT}"

BARE_ACK_MANY = "DELETE FROM pgstreams.q_floor WHERE id = ANY(%s::bigint[])"
FLOOR_ACK_MANY = f"WITH d AS ({BARE_ACK_MANY} RETURNING 1) {_FLOOR_COUNT}"

# Auto-ack: take a batch by deleting it in a transaction left open while it is handed out;
# commit it (after counting it) in the same round trip as the next take.
FLOOR_TAKE = f"BEGIN; DELETE FROM pgstreams.q_floor WHERE id = ANY({_FLOOR_PICK}) RETURNING *"
FLOOR_COMMIT_COUNT = f"""
UPDATE {FLOOR_STATS} SET completed = completed + %s
WHERE queue = 'floor' AND shard = pg_backend_pid() %% {SHARDS};
COMMIT;
"""


def _some(rows: list[TupleRow]) -> list[TupleRow]:
    if not rows:  # the run was prefilled with exactly what it consumes
        raise RuntimeError("floor: the queue ran dry before the run was done")
    return rows


class Floor:
    """The floor's side of every row, on its own autocommit connection.

    ``counted=False`` is the bare variant: the same statements without the counter.
    """

    def __init__(self, conn: Conn, *, counted: bool = True) -> None:
        self.conn = conn
        self.values: list[dict[str, Any]] = []
        self.ack_sql = FLOOR_ACK if counted else BARE_ACK
        self.ack_many_sql = FLOOR_ACK_MANY if counted else BARE_ACK_MANY
        self.commit_sql = FLOOR_COMMIT_COUNT if counted else "SELECT %s; COMMIT;"

    async def publish(self, n: int) -> None:
        conn = self.conn
        for value in self.values:
            cur = await conn.execute(FLOOR_PUBLISH, (json.dumps(value), "{}", FLOOR_CHANNEL))
            await cur.fetchone()

    async def publish_batch(self, n: int) -> None:
        conn = self.conn
        values = self.values
        for start in range(0, n, BATCH):
            payloads = [json.dumps(v) for v in values[start : start + BATCH]]
            cur = await conn.execute(FLOOR_PUBLISH_BATCH, ("{}", payloads, FLOOR_CHANNEL))
            await cur.fetchone()

    async def consume_ack(self, n: int) -> None:
        conn = self.conn
        done = 0
        while done < n:
            cur = await conn.execute(FLOOR_LEASE, (VISIBILITY, 1))
            rows = _some(await cur.fetchall())
            await conn.execute(self.ack_sql, (rows[0][0], rows[0][3]))
            done += 1

    async def consume_ack_batch(self, n: int) -> None:
        conn = self.conn
        done = 0
        while done < n:
            cur = await conn.execute(FLOOR_LEASE, (VISIBILITY, BATCH))
            rows = _some(await cur.fetchall())
            await conn.execute(self.ack_many_sql, ([r[0] for r in rows],))
            done += len(rows)

    async def pop(self, n: int) -> None:
        # Several statements in one round trip need client-side binding.
        cur = psycopg.AsyncClientCursor(self.conn)
        done = taken = 0
        while done < n:
            if taken:
                await cur.execute(self.commit_sql + FLOOR_TAKE, (taken, BATCH))
                while cur.nextset():
                    pass
            else:
                await cur.execute(FLOOR_TAKE, (BATCH,))
                cur.nextset()
            rows = _some(await cur.fetchall())
            taken = len(rows)
            done += taken
        await cur.execute(self.commit_sql, (taken,))


# -- PgQueue: the same work through the public API -----------------------------------------


class Queue:
    """PgQueue's side of every row."""

    def __init__(self, queue: ps.PgQueue[Any]) -> None:
        self.q = queue
        self.values: list[dict[str, Any]] = []

    async def publish(self, n: int) -> None:
        q = self.q
        for value in self.values:
            await q.publish(value)

    async def publish_batch(self, n: int) -> None:
        q = self.q
        values = self.values
        for start in range(0, n, BATCH):
            await q.publish_batch(values[start : start + BATCH])

    async def consume_ack(self, n: int) -> None:
        done = 0
        async with self.q.subscribe_ack(visibility=VISIBILITY) as stream:
            async for env in stream:
                await env.ack()
                done += 1
                if done >= n:
                    break

    async def consume_ack_batch(self, n: int) -> None:
        q = self.q
        done = 0
        async with q.subscribe_ack(visibility=VISIBILITY, prefetch=BATCH).batch(BATCH) as stream:
            async for batch in stream:
                await q.ack_many(batch)
                done += len(batch)
                if done >= n:
                    break

    async def pop(self, n: int) -> None:
        done = 0
        async with self.q.subscribe(prefetch=BATCH) as stream:
            async for _ in stream:
                done += 1
                if done >= n:
                    break


# -- rows ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    n: int
    warmup: int
    consume: bool
    """True: each run starts with ``n`` messages waiting and must leave none."""
    floor: Callable[[int], Awaitable[None]]
    pgqueue: Callable[[int], Awaitable[None]]
    bare: Callable[[int], Awaitable[None]] | None = None
    """The floor without the completed counter (consume rows only)."""


class Bench:
    def __init__(self, maint: Conn, floor: Floor, bare: Floor, queue: Queue) -> None:
        self.maint = maint
        self.floor = floor
        self.bare = bare
        self.queue = queue

    async def _reset(self, table: str, prefill: int, counters: str) -> None:
        m = self.maint
        await m.execute(f"TRUNCATE {table} RESTART IDENTITY")
        if prefill:
            await m.execute(PREFILL.format(table=table), (BODY, prefill))
            await m.execute(f"VACUUM (ANALYZE) {table}")
        await m.execute(f"VACUUM {counters}")

    async def _expect(self, table: str, rows: int) -> None:
        cur = await self.maint.execute(f"SELECT count(*) FROM {table}")
        got = await cur.fetchone()
        if got is None or got[0] != rows:
            raise RuntimeError(f"{table}: expected {rows} rows after the run, found {got}")

    def contenders(self, row: Row) -> list[Contender]:
        def side(
            name: str,
            table: str,
            holder: Floor | Queue,
            run: Callable[[int], Awaitable[None]],
            counters: str,
        ) -> Contender:
            async def prepare(n: int) -> None:
                await self._reset(table, n if row.consume else 0, counters)
                holder.values = [] if row.consume else [message(i) for i in range(n)]

            async def check(n: int) -> None:
                await self._expect(table, 0 if row.consume else n)

            return Contender(name, prepare, run, check)

        sides = [
            side("floor", FLOOR_TABLE, self.floor, row.floor, FLOOR_STATS),
            side("PgQueue", QUEUE_TABLE, self.queue, row.pgqueue, QUEUE_STATS),
        ]
        if row.bare is not None:
            sides.append(side("bare", FLOOR_TABLE, self.bare, row.bare, FLOOR_STATS))
        return sides


def rows(floor: Floor, bare: Floor, queue: Queue, n: int) -> list[Row]:
    single = n // 10
    batch = 10 * BATCH
    times = "\N{MULTIPLICATION SIGN}"
    return [
        Row("1. single publish", single, 50, False, floor.publish, queue.publish),
        Row(
            f"2. publish_batch {times}{BATCH}",
            n,
            batch,
            False,
            floor.publish_batch,
            queue.publish_batch,
        ),
        Row(
            "3. consume+ack one at a time",
            single,
            50,
            True,
            floor.consume_ack,
            queue.consume_ack,
            bare.consume_ack,
        ),
        Row(
            f"4. consume+ack batches of {BATCH}",
            n,
            batch,
            True,
            floor.consume_ack_batch,
            queue.consume_ack_batch,
            bare.consume_ack_batch,
        ),
        Row(
            f"5. auto-ack consume, prefetch {BATCH} (info)",
            n,
            batch,
            True,
            floor.pop,
            queue.pop,
            bare.pop,
        ),
    ]


# -- main ----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    async with (
        server(args.dsn, embedded=args.embedded) as srv,
        fresh_database(srv.dsn, "pgstreams_bench") as dsn,
    ):
        facts = await server_facts(dsn)
        async with (
            ps.connect(dsn) as db,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as maint,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as floor_conn,
        ):
            # The very table PgQueue creates for a queue, so the shapes cannot drift apart;
            # the floor uses it through its own statements alone.
            await ps.PgQueue.create(db, "floor")
            await maint.execute(FLOOR_STATS_CREATE)
            queue = Queue(await ps.PgQueue.create(db, QUEUE))
            floor, bare = Floor(floor_conn), Floor(floor_conn, counted=False)
            bench = Bench(maint, floor, bare, queue)
            table: list[list[str]] = []
            for row in rows(floor, bare, queue, args.messages):
                rates = await interleaved(
                    bench.contenders(row), n=row.n, warmup=row.warmup, rounds=args.rounds
                )
                if args.verbose:
                    runs = "  ".join(
                        "/".join(rate(r) for r in rnd) for rnd in zip(*rates, strict=True)
                    )
                    names = "/".join(c.name for c in bench.contenders(row))
                    print(f"{row.label}: {names} per round: {runs}", file=sys.stderr)
                table.append(
                    [
                        row.label,
                        rate(statistics.median(rates[0])),
                        rate(statistics.median(rates[1])),
                        median_ratio(rates[1], rates[0]),
                        median_ratio(rates[1], rates[2]) if len(rates) > 2 else "",
                    ]
                )
    header = ["operation", "floor msgs/s", "PgQueue msgs/s", "ratio", "vs bare SQL (info)"]
    print(markdown_table(header, table, numeric_from=1))
    print()
    print(
        f"{facts} ({srv.label}); N={args.messages:,} msgs per run of rows 2/4/5, "
        f"{args.messages // 10:,} of rows 1/3; medians of {args.rounds} interleaved rounds "
        "after a warm-up; ratio = median of per-round PgQueue/floor. The floor does the same "
        "work as PgQueue, including its completed counter (one counter row update per ack or "
        "pop statement); 'bare SQL' is the floor without that counter."
    )


if __name__ == "__main__":
    anyio.run(main, queue_args(__doc__, BATCH))
