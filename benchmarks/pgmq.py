"""PgmqQueue throughput against pgmq's SQL called directly (the floor) and against the
official ``pgmq`` Python client (the peer).

Run::

    python benchmarks/pgmq.py [--dsn DSN] [--messages N] [--embedded]

The floor is one autocommit ``psycopg.AsyncConnection`` calling pgmq's functions by hand,
one statement per operation: ``pgmq.send``, ``pgmq.send_batch``, ``pgmq.read`` then
``pgmq.delete`` (by id, or by an id array for a batch). JSON goes in as text cast to
``jsonb`` and comes out decoded. The peer is ``pgmq.SyncPGMQueue`` (the package's psycopg
client) with its own one-connection pool, run in a worker thread; each of its calls is a
transaction (BEGIN, the statement, COMMIT). PgmqQueue does what the public API does,
including its lease check on every ack (``(msg_id, read_ct)`` must still match).

Each side has its own queue. Every run starts from a purged queue (prefilled through
``pgmq.send_batch`` and vacuumed for the consume rows); rounds interleave floor, PgmqQueue
and peer after an untimed warm-up. The table reports medians of the rates and of the
per-round ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path

# See benchmarks/queue.py: keep this folder from shadowing the standard library.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import psycopg
from pgmq import SyncPGMQueue
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

Conn = psycopg.AsyncConnection[TupleRow]

BATCH = 100
VT = 30
BODY = "lorem ipsum dolor sit amet, consectetur adipiscing elit"
QUEUES = {"floor": "bench_floor", "PgmqQueue": "bench_pgstreams", "peer": "bench_peer"}


def message(seq: int) -> dict[str, Any]:
    return {"seq": seq, "kind": "bench", "body": BODY}


PREFILL = """
SELECT count(*) FROM pgmq.send_batch(%s, ARRAY(
    SELECT jsonb_build_object('seq', g, 'kind', 'bench', 'body', %s::text)
    FROM generate_series(1, %s) AS g))
"""


def _some(rows: list[Any]) -> list[Any]:
    if not rows:
        raise RuntimeError("the queue ran dry before the run was done")
    return rows


class Floor:
    """pgmq's functions called by hand on one autocommit connection."""

    def __init__(self, conn: Conn, queue: str) -> None:
        self.conn = conn
        self.queue = queue
        self.values: list[dict[str, Any]] = []

    async def publish(self, n: int) -> None:
        for value in self.values:
            cur = await self.conn.execute(
                "SELECT * FROM pgmq.send(%s, %s::jsonb)", (self.queue, json.dumps(value))
            )
            await cur.fetchone()

    async def publish_batch(self, n: int) -> None:
        for start in range(0, n, BATCH):
            msgs = [json.dumps(v) for v in self.values[start : start + BATCH]]
            cur = await self.conn.execute(
                "SELECT * FROM pgmq.send_batch(%s, %s::jsonb[])", (self.queue, msgs)
            )
            await cur.fetchall()

    async def consume_ack(self, n: int) -> None:
        for _ in range(n):
            cur = await self.conn.execute(
                "SELECT msg_id, read_ct, message FROM pgmq.read(%s, %s, 1)", (self.queue, VT)
            )
            row = _some(await cur.fetchall())[0]
            await self.conn.execute("SELECT pgmq.delete(%s, %s::bigint)", (self.queue, row[0]))

    async def consume_ack_batch(self, n: int) -> None:
        done = 0
        while done < n:
            cur = await self.conn.execute(
                "SELECT msg_id, read_ct, message FROM pgmq.read(%s, %s, %s)",
                (self.queue, VT, BATCH),
            )
            rows = _some(await cur.fetchall())
            await self.conn.execute(
                "SELECT pgmq.delete(%s, %s::bigint[])", (self.queue, [r[0] for r in rows])
            )
            done += len(rows)


class Ours:
    """PgmqQueue through its public API."""

    def __init__(self, queue: ps.PgmqQueue[Any]) -> None:
        self.q = queue
        self.values: list[dict[str, Any]] = []

    async def publish(self, n: int) -> None:
        for value in self.values:
            await self.q.publish(value)

    async def publish_batch(self, n: int) -> None:
        for start in range(0, n, BATCH):
            await self.q.publish_batch(self.values[start : start + BATCH])

    async def consume_ack(self, n: int) -> None:
        done = 0
        async with self.q.subscribe_ack(read_mode=ps.ReadMode.standard(vt=VT)) as stream:
            async for env in stream:
                await env.ack()
                done += 1
                if done >= n:
                    break

    async def consume_ack_batch(self, n: int) -> None:
        done = 0
        mode = ps.ReadMode.standard(vt=VT, qty=BATCH)
        async with self.q.subscribe_ack(read_mode=mode).batch(BATCH) as stream:
            async for batch in stream:
                await self.q.ack_many(batch)
                done += len(batch)
                if done >= n:
                    break


class Peer:
    """The official client (synchronous), each run in one worker-thread call."""

    def __init__(self, client: SyncPGMQueue, queue: str) -> None:
        self.client = client
        self.queue = queue
        self.values: list[dict[str, Any]] = []

    async def publish(self, n: int) -> None:
        def run() -> None:
            for value in self.values:
                self.client.send(self.queue, value)

        await anyio.to_thread.run_sync(run)

    async def publish_batch(self, n: int) -> None:
        def run() -> None:
            for start in range(0, n, BATCH):
                self.client.send_batch(self.queue, self.values[start : start + BATCH])

        await anyio.to_thread.run_sync(run)

    async def consume_ack(self, n: int) -> None:
        def run() -> None:
            for _ in range(n):
                msg = self.client.read(self.queue, vt=VT)
                if msg is None or isinstance(msg, list):
                    raise RuntimeError("peer: the queue ran dry before the run was done")
                self.client.delete(self.queue, msg.msg_id)

        await anyio.to_thread.run_sync(run)

    async def consume_ack_batch(self, n: int) -> None:
        def run() -> None:
            done = 0
            while done < n:
                msgs = self.client.read_batch(self.queue, vt=VT, batch_size=BATCH)
                if not msgs:
                    raise RuntimeError("peer: the queue ran dry before the run was done")
                self.client.delete_batch(self.queue, [m.msg_id for m in msgs])
                done += len(msgs)

        await anyio.to_thread.run_sync(run)


Side = Floor | Ours | Peer
Run = Callable[[Side, int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    n: int
    warmup: int
    consume: bool
    run: Run


def rows(n: int) -> list[Row]:
    single = n // 10
    return [
        Row("1. single publish", single, 50, False, lambda s, k: s.publish(k)),
        Row(
            f"2. publish_batch \N{MULTIPLICATION SIGN}{BATCH}",
            n,
            10 * BATCH,
            False,
            lambda s, k: s.publish_batch(k),
        ),
        Row("3. consume+ack one at a time", single, 50, True, lambda s, k: s.consume_ack(k)),
        Row(
            f"4. consume+ack batches of {BATCH}",
            n,
            10 * BATCH,
            True,
            lambda s, k: s.consume_ack_batch(k),
        ),
    ]


class Bench:
    def __init__(self, maint: Conn, sides: dict[str, Side]) -> None:
        self.maint = maint
        self.sides = sides

    async def _reset(self, queue: str, prefill: int) -> None:
        m = self.maint
        await m.execute("SELECT pgmq.purge_queue(%s)", [queue])
        if prefill:
            await m.execute(PREFILL, (queue, BODY, prefill))
        await m.execute(
            psycopg.sql.SQL("VACUUM ANALYZE {}").format(
                psycopg.sql.Identifier("pgmq", f"q_{queue}")
            )
        )

    async def _expect(self, queue: str, rows: int) -> None:
        cur = await self.maint.execute("SELECT queue_length FROM pgmq.metrics(%s)", [queue])
        got = await cur.fetchone()
        if got is None or got[0] != rows:
            raise RuntimeError(f"{queue}: expected {rows} messages after the run, found {got}")

    def contenders(self, row: Row) -> list[Contender]:
        def contender(name: str, side: Side) -> Contender:
            queue = QUEUES[name]

            async def prepare(n: int) -> None:
                await self._reset(queue, n if row.consume else 0)
                side.values = [] if row.consume else [message(i) for i in range(n)]

            async def run(n: int) -> None:
                await row.run(side, n)

            async def check(n: int) -> None:
                await self._expect(queue, 0 if row.consume else n)

            return Contender(name, prepare, run, check)

        return [contender(name, side) for name, side in self.sides.items()]


async def main(args: argparse.Namespace) -> None:
    async with (
        server(args.dsn, embedded=args.embedded) as srv,
        fresh_database(srv.dsn, "pgstreams_bench_pgmq") as dsn,
    ):
        facts = await server_facts(dsn)
        async with (
            ps.connect(dsn) as db,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as maint,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as floor_conn,
        ):
            ours = await ps.PgmqQueue.create(db, QUEUES["PgmqQueue"])  # installs pgmq
            for name in (QUEUES["floor"], QUEUES["peer"]):
                await ps.PgmqQueue.create(db, name)
            client = SyncPGMQueue(conn_string=dsn, init_extension=False, pool_size=1)
            try:
                sides: dict[str, Side] = {
                    "floor": Floor(floor_conn, QUEUES["floor"]),
                    "PgmqQueue": Ours(ours),
                    "peer": Peer(client, QUEUES["peer"]),
                }
                bench = Bench(maint, sides)
                table: list[list[str]] = []
                for row in rows(args.messages):
                    rates = await interleaved(
                        bench.contenders(row), n=row.n, warmup=row.warmup, rounds=args.rounds
                    )
                    if args.verbose:
                        runs = "  ".join(
                            "/".join(rate(r) for r in rnd) for rnd in zip(*rates, strict=True)
                        )
                        print(
                            f"{row.label}: floor/PgmqQueue/peer per round: {runs}", file=sys.stderr
                        )
                    floor, mine, peer = rates
                    table.append(
                        [
                            row.label,
                            rate(statistics.median(floor)),
                            rate(statistics.median(mine)),
                            rate(statistics.median(peer)),
                            median_ratio(mine, floor),
                            median_ratio(mine, peer),
                        ]
                    )
            finally:
                client.close()
    header = [
        "operation",
        "floor msgs/s",
        "PgmqQueue msgs/s",
        "pgmq client msgs/s",
        "vs floor",
        "vs client",
    ]
    print(markdown_table(header, table, numeric_from=1))
    print()
    print(
        f"{facts} ({srv.label}); N={args.messages:,} msgs per run of rows 2/4, "
        f"{args.messages // 10:,} of rows 1/3; medians of {args.rounds} interleaved rounds "
        "after a warm-up; ratios = medians of per-round PgmqQueue/floor and "
        "PgmqQueue/official client (pgmq.SyncPGMQueue)."
    )


if __name__ == "__main__":
    anyio.run(main, queue_args(__doc__, BATCH))
