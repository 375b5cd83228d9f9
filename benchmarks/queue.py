"""PgQueue throughput against a "floor": the same SQL work written by hand on psycopg.

Run::

    python benchmarks/queue.py [--dsn DSN] [--messages N] [--embedded]

The floor is one autocommit ``psycopg.AsyncConnection`` running hand-written statements on
a table of the same shape as a PgQueue table (same columns, same partial ready index):
publish = INSERT with ``pg_notify`` in the same statement; consume = ``UPDATE ... WHERE id =
ANY(ARRAY(SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)) RETURNING`` to lease (the same
cheap-to-plan shape PgQueue uses); ack = DELETE by id and attempts (the lease) for one
message, by ``id = ANY(...)`` alone for a batch; auto-ack consume = ``DELETE ... WHERE id =
ANY(ARRAY(SELECT ... SKIP LOCKED LIMIT n)) RETURNING payload``. JSON goes in as text
parameters cast with ``::jsonb`` and comes out decoded, as with PgQueue. The floor does not
keep PgQueue's completed counter (one ``queue_stats`` row update per ack or pop statement):
that is the extra server-side work PgQueue does.

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
from psycopg import sql
from psycopg.rows import TupleRow

import pgstreams as ps
from benchmarks._common import (
    Contender,
    add_server_options,
    fresh_database,
    interleaved,
    markdown_table,
    server,
    server_facts,
)
from pgstreams import _queue_sql as Q

Conn = psycopg.AsyncConnection[TupleRow]

BATCH = 100
VISIBILITY = 30.0
QUEUE = "bench"
QUEUE_TABLE = f"pgstreams.q_{QUEUE}"
QUEUE_STATS = "pgstreams.queue_stats"
FLOOR_TABLE = "public.floor_queue"
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

# The very table PgQueue creates for a queue, so the two shapes cannot drift apart.
FLOOR_CREATE = sql.SQL(Q.CREATE).format(  # type: ignore[arg-type,unused-ignore]
    table=sql.Identifier("public", "floor_queue"), ready_idx=sql.Identifier("floor_queue_ready")
)

FLOOR_PUBLISH = """
WITH ins AS (
    INSERT INTO public.floor_queue (payload, headers) VALUES (%s::jsonb, %s::jsonb)
    RETURNING id
)
SELECT id, pg_notify(%s, '') FROM ins
"""

FLOOR_PUBLISH_BATCH = """
WITH ins AS (
    INSERT INTO public.floor_queue (payload, headers)
    SELECT p, %s::jsonb FROM unnest(%s::jsonb[]) AS u(p)
    RETURNING id
)
SELECT array_agg(id), pg_notify(%s, '') FROM ins
"""

_FLOOR_PICK = """ARRAY(
    SELECT id FROM public.floor_queue
    WHERE dead_at IS NULL AND visible_at <= now()
    ORDER BY visible_at, id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)"""

FLOOR_LEASE = f"""
UPDATE public.floor_queue
SET attempts = attempts + 1,
    lease = attempts + 1,
    visible_at = now() + %s * interval '1 second'
WHERE id = ANY({_FLOOR_PICK})
RETURNING id, payload, headers, attempts, enqueued_at
"""

# A lease-checked ack, as any visibility-timeout queue needs: (id, attempts) names the lease.
FLOOR_ACK = "DELETE FROM public.floor_queue WHERE id = %s AND attempts = %s"

FLOOR_ACK_MANY = "DELETE FROM public.floor_queue WHERE id = ANY(%s::bigint[])"

FLOOR_POP = f"""
DELETE FROM public.floor_queue WHERE id = ANY({_FLOOR_PICK})
RETURNING payload
"""


def _some(rows: list[TupleRow]) -> list[TupleRow]:
    if not rows:  # the run was prefilled with exactly what it consumes
        raise RuntimeError("floor: the queue ran dry before the run was done")
    return rows


class Floor:
    """The floor's side of every row, on its own autocommit connection."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.values: list[dict[str, Any]] = []

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
            await conn.execute(FLOOR_ACK, (rows[0][0], rows[0][3]))
            done += 1

    async def consume_ack_batch(self, n: int) -> None:
        conn = self.conn
        done = 0
        while done < n:
            cur = await conn.execute(FLOOR_LEASE, (VISIBILITY, BATCH))
            rows = _some(await cur.fetchall())
            await conn.execute(FLOOR_ACK_MANY, ([r[0] for r in rows],))
            done += len(rows)

    async def pop(self, n: int) -> None:
        conn = self.conn
        done = 0
        while done < n:
            cur = await conn.execute(FLOOR_POP, (BATCH,))
            done += len(_some(await cur.fetchall()))


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


class Bench:
    def __init__(self, maint: Conn, floor: Floor, queue: Queue) -> None:
        self.maint = maint
        self.floor = floor
        self.queue = queue

    async def _reset(self, table: str, prefill: int, extra_vacuum: str | None) -> None:
        m = self.maint
        await m.execute(f"TRUNCATE {table} RESTART IDENTITY")
        if prefill:
            await m.execute(PREFILL.format(table=table), (BODY, prefill))
            await m.execute(f"VACUUM (ANALYZE) {table}")
        if extra_vacuum:
            await m.execute(f"VACUUM {extra_vacuum}")

    async def _expect(self, table: str, rows: int) -> None:
        cur = await self.maint.execute(f"SELECT count(*) FROM {table}")
        got = await cur.fetchone()
        if got is None or got[0] != rows:
            raise RuntimeError(f"{table}: expected {rows} rows after the run, found {got}")

    def contenders(self, row: Row) -> tuple[Contender, Contender]:
        def side(
            name: str,
            table: str,
            holder: Floor | Queue,
            run: Callable[[int], Awaitable[None]],
            extra_vacuum: str | None,
        ) -> Contender:
            async def prepare(n: int) -> None:
                await self._reset(table, n if row.consume else 0, extra_vacuum)
                holder.values = [] if row.consume else [message(i) for i in range(n)]

            async def check(n: int) -> None:
                await self._expect(table, 0 if row.consume else n)

            return Contender(name, prepare, run, check)

        # The floor has no counter table; PgQueue's counter rows are vacuumed like its table.
        return (
            side("floor", FLOOR_TABLE, self.floor, row.floor, None),
            side("PgQueue", QUEUE_TABLE, self.queue, row.pgqueue, QUEUE_STATS),
        )


def rows(floor: Floor, queue: Queue, n: int) -> list[Row]:
    single = n // 10
    return [
        Row("1. single publish", single, 50, False, floor.publish, queue.publish),
        Row(
            f"2. publish_batch \N{MULTIPLICATION SIGN}{BATCH}",
            n,
            10 * BATCH,
            False,
            floor.publish_batch,
            queue.publish_batch,
        ),
        Row("3. consume+ack one at a time", single, 50, True, floor.consume_ack, queue.consume_ack),
        Row(
            f"4. consume+ack batches of {BATCH}",
            n,
            10 * BATCH,
            True,
            floor.consume_ack_batch,
            queue.consume_ack_batch,
        ),
        Row(
            f"5. auto-ack consume, prefetch {BATCH} (info)",
            n,
            10 * BATCH,
            True,
            floor.pop,
            queue.pop,
        ),
    ]


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_server_options(parser)
    parser.add_argument(
        "--messages",
        type=int,
        default=20_000,
        metavar="N",
        help="messages per run of the batched rows (a multiple of 100); "
        "the one-message-per-statement rows use N/10 (default: 20000)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per row (default 5)")
    parser.add_argument("--verbose", action="store_true", help="print every run's rate")
    args = parser.parse_args(argv)
    if args.messages < 10 * BATCH or args.messages % BATCH:
        parser.error(f"--messages must be a multiple of {BATCH} and at least {10 * BATCH}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def rate(value: float) -> str:
    return f"{value:,.0f}"


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
            await maint.execute(FLOOR_CREATE)
            queue = Queue(await ps.PgQueue.create(db, QUEUE))
            bench = Bench(maint, Floor(floor_conn), queue)
            table: list[list[str]] = []
            for row in rows(bench.floor, queue, args.messages):
                floor_rates, queue_rates = await interleaved(
                    bench.contenders(row), n=row.n, warmup=row.warmup, rounds=args.rounds
                )
                if args.verbose:
                    runs = "  ".join(
                        f"{rate(f)}/{rate(q)}"
                        for f, q in zip(floor_rates, queue_rates, strict=True)
                    )
                    print(f"{row.label}: floor/PgQueue per round: {runs}", file=sys.stderr)
                # Each round times the floor and PgQueue back to back, so the ratio of one
                # round is immune to the machine's slow drifts; report the median ratio.
                ratios = [q / f for f, q in zip(floor_rates, queue_rates, strict=True)]
                table.append(
                    [
                        row.label,
                        rate(statistics.median(floor_rates)),
                        rate(statistics.median(queue_rates)),
                        f"{statistics.median(ratios):.2f}",
                    ]
                )
    header = ["operation", "floor msgs/s", "PgQueue msgs/s", "ratio"]
    print(markdown_table(header, table, numeric_from=1))
    print()
    print(
        f"{facts} ({srv.label}); N={args.messages:,} msgs per run of rows 2/4/5, "
        f"{args.messages // 10:,} of rows 1/3; medians of {args.rounds} interleaved rounds "
        "(floor, PgQueue) after a warm-up; ratio = median of per-round PgQueue/floor; the "
        "floor skips PgQueue's "
        "completed counter (one queue_stats row update per ack or pop statement), the extra "
        "work PgQueue does."
    )


if __name__ == "__main__":
    anyio.run(main, parse_args())
