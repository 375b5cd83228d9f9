"""The NATS JetStream bridge against raw nats-py, measured in one run.

Run::

    python benchmarks/nats.py [--dsn DSN] [--embedded] [--changes N] [--rounds R]

It starts its own nats-server (``pgstreams.testing.nats_server``) and, unless given a DSN,
an embedded PostgreSQL.

* **sink**: changes/s of ``cs.subscribe(consumer=...).through(psn.publish(...))`` -- read
  from a durable trigger-capture consumer, encoded, published with a 256-message window,
  committed upstream -- against raw nats-py ``js.publish_async`` of the same payloads
  (the same change documents, already encoded, with their ``Nats-Msg-Id``) with the same
  window. Each run starts from an empty JetStream stream and N new changes.
* **source**: envelopes handled and acked per second through ``psn.subscribe`` against a
  raw nats-py pull consumer fetching batches of the same size and acking each message.
  Each run reads N messages published beforehand, with a fresh durable consumer.
* **latency**: a writer commits one row every 5 ms (200 changes/s) while the sink runs;
  from each commit's return to the sink handing that change on (its PubAck arrived):
  p50 and p99.

Rows run interleaved, raw first then pgstreams, after an untimed warm-up; the table shows
medians of the rates and of the per-round ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import anyio
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

import pgstreams as ps
from benchmarks._common import (
    Contender,
    add_server_options,
    fresh_database,
    interleaved,
    markdown_table,
    median_ratio,
    rate,
    server,
    server_facts,
)
from pgstreams import nats as psn
from pgstreams.testing import nats_server

WINDOW = 256
BATCH = 64


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_server_options(parser)
    parser.add_argument("--changes", type=int, default=20_000, help="per run (20000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per row (5)")
    parser.add_argument("--verbose", action="store_true", help="print every run's rate")
    return parser.parse_args()


class Sink:
    """The sink row's two contenders and their shared state."""

    def __init__(self, db: ps.Database, js: JetStreamContext) -> None:
        self.db = db
        self.js = js
        self.cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, "bench_users")
        self.next_id = 0
        self.bodies: list[tuple[bytes, str]] = []

    async def setup(self) -> None:
        async with self.db.connection() as conn:
            await conn.execute("CREATE TABLE bench_users (id int PRIMARY KEY, email text)")
        await self.cs.install_trigger()
        await self.cs.add_consumer("bench")
        await psn.ensure_stream(self.js, "BENCH", subjects=["bench.>"], duplicate_window=120)

    async def _fresh(self, n: int) -> list[ps.Change[Any]]:
        """N new changes (the durable consumer's backlog), and an empty stream."""
        await self.js.purge_stream("BENCH")
        first = self.next_id
        self.next_id += n
        async with self.db.connection() as conn:
            await conn.execute(
                "INSERT INTO bench_users SELECT g, 'user' || g || '@example.com'"
                " FROM generate_series(%s::int, %s::int) g",
                [first, first + n - 1],
            )
        return await self.cs.subscribe_from(0).skip(first).take(n).collect()

    async def prepare_raw(self, n: int) -> None:
        changes = await self._fresh(n)
        # The raw side publishes the same documents; the consumer skips them.
        self.bodies = [
            (json.dumps(psn.change_document(c)).encode(), f"{c.table}:{c.id}") for c in changes
        ]
        await self.cs.subscribe(consumer="bench").take(n).drain()

    async def run_raw(self, n: int) -> None:
        window = asyncio.Semaphore(WINDOW)
        pending = []
        for body, key in self.bodies:
            await window.acquire()
            ack = await self.js.publish_async(
                "bench.public.bench_users.insert", body, headers={"Nats-Msg-Id": key}
            )
            ack.add_done_callback(lambda _: window.release())
            pending.append(ack)
        await asyncio.gather(*pending)

    async def prepare_sink(self, n: int) -> None:
        await self._fresh(n)

    async def run_sink(self, n: int) -> None:
        sink = psn.publish(self.js, subject=lambda c: f"bench.{c.table}.{c.op}", window=WINDOW)
        await self.cs.subscribe(consumer="bench").take(n).through(sink).drain()

    async def check(self, n: int) -> None:
        stored = (await self.js.stream_info("BENCH")).state.messages
        if stored != n:
            raise AssertionError(f"{stored} messages stored, expected {n}")


class Source:
    """The source row: N messages in a stream, read and acked by a fresh durable."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.round = 0

    async def prepare(self, n: int) -> None:
        await psn.ensure_stream(self.js, "BENCHSRC", subjects=["benchsrc.>"])
        await self.js.purge_stream("BENCHSRC")
        body = json.dumps({"user": 42, "email": "user42@example.com"}).encode()
        pending = [await self.js.publish_async("benchsrc.x", body) for _ in range(n)]
        await asyncio.gather(*pending)
        self.round += 1

    async def run_raw(self, n: int) -> None:
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=60)
        sub = await self.js.pull_subscribe(
            "benchsrc.x", durable=f"raw{self.round}", stream="BENCHSRC", config=config
        )
        done = 0
        while done < n:
            for msg in await sub.fetch(min(BATCH, n - done), timeout=5):
                json.loads(msg.data)
                await msg.ack()
                done += 1
        await sub.unsubscribe()

    async def run_source(self, n: int) -> None:
        async def handle(env: ps.Envelope[Any]) -> None:
            await env.ack()

        source = psn.subscribe(
            self.js, "BENCHSRC", durable=f"ours{self.round}", ack_wait=60, batch=BATCH
        )
        await source.take(n).for_each(handle)

    async def check(self, n: int) -> None:
        del n


async def latency(db: ps.Database, js: JetStreamContext, seconds: float) -> tuple[float, float]:
    """p50 and p99 of commit -> handed on after PubAck, at 200 changes/s."""
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE bench_latency (id int PRIMARY KEY)")
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, "bench_latency")
    await cs.install_trigger()
    await cs.add_consumer("latency")
    await psn.ensure_stream(js, "BENCHLAT", subjects=["benchlat.>"])
    committed: dict[int, float] = {}
    delays: list[float] = []
    total = int(seconds * 200)

    def stored(change: ps.Change[Any]) -> None:
        assert change.new is not None
        delays.append(time.perf_counter() - committed[change.new["id"]])

    async def write() -> None:
        async with db.connection() as conn:
            start = time.perf_counter()
            for i in range(total):
                await anyio.sleep(max(0.0, start + i / 200 - time.perf_counter()))
                await conn.execute("INSERT INTO bench_latency VALUES (%s)", [i])
                committed[i] = time.perf_counter()

    sink = psn.publish(js, subject="benchlat.x", window=WINDOW)
    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        await cs.subscribe(consumer="latency").take(total).through(sink).tap(stored).drain()
    delays.sort()
    return statistics.median(delays), delays[int(len(delays) * 0.99) - 1]


async def main() -> None:
    args = arguments()
    n = args.changes
    with nats_server() as nats:
        async with (
            server(args.dsn, embedded=args.embedded) as srv,
            fresh_database(srv.dsn, "bench_nats") as dsn,
            ps.connect(dsn) as db,
        ):
            await db.migrate()
            js = await psn.connect(nats.url)
            facts = await server_facts(dsn)
            sink = Sink(db, js)
            await sink.setup()
            source = Source(js)
            sink_rates = await interleaved(
                [
                    Contender("raw", sink.prepare_raw, sink.run_raw, sink.check),
                    Contender("sink", sink.prepare_sink, sink.run_sink, sink.check),
                ],
                n=n,
                warmup=min(2000, n),
                rounds=args.rounds,
            )
            source_rates = await interleaved(
                [
                    Contender("raw", source.prepare, source.run_raw, source.check),
                    Contender("source", source.prepare, source.run_source, source.check),
                ],
                n=n,
                warmup=min(2000, n),
                rounds=args.rounds,
            )
            p50, p99 = await latency(db, js, seconds=5.0)
            await psn.close(js)
    if args.verbose:
        print("sink rounds (raw, pgstreams):", sink_rates)
        print("source rounds (raw, pgstreams):", source_rates)
    rows = [
        [
            "changes/s into JetStream (sink vs raw publish_async, window 256)",
            rate(statistics.median(sink_rates[0])),
            rate(statistics.median(sink_rates[1])),
            median_ratio(sink_rates[1], sink_rates[0]),
            ">= 0.8x, >= 20k/s",
        ],
        [
            "envelopes handled+acked/s (source vs raw pull+ack)",
            rate(statistics.median(source_rates[0])),
            rate(statistics.median(source_rates[1])),
            median_ratio(source_rates[1], source_rates[0]),
            ">= 0.8x",
        ],
        [
            "commit -> PubAck at 200 changes/s, p50 / p99 (ms)",
            "-",
            f"{p50 * 1000:.1f} / {p99 * 1000:.1f}",
            "-",
            "reported",
        ],
    ]
    print(f"{facts}; nats-server {nats.binary}; {n} per run, {args.rounds} rounds\n")
    print(markdown_table(["figure", "raw nats-py", "pgstreams", "ratio", "target"], rows, 1))


if __name__ == "__main__":
    anyio.run(main)
