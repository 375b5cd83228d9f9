"""What the ``otel`` extra costs the hot paths: throughput with OpenTelemetry's API installed
and no SDK configured, against the same code with telemetry off.

Run::

    python benchmarks/otel.py [--dsn DSN] [--embedded] [--messages N] [--runs N] [--rounds R]
        [--rows 1,6] [--verbose]

"Off" is what runs when ``opentelemetry`` cannot be imported: ``pgstreams._core.telemetry``
is None and every instrumented path skips its one test per batch. It is set in-process (the
untimed ``prepare`` of each run switches the module's ``otel`` between None and the
instruments), so both sides share one process, one server, one pool and warm caches, and
their runs interleave in every round; a subprocess per side would add the noise of two
processes to a difference of a few per cent. What the switch leaves out is only the import
of ``opentelemetry`` at ``import pgstreams`` (tens of milliseconds, once) -- the hot paths
never look at it. "No SDK" is the default state with the extra installed: instruments and
tracer made from the global providers, which are the API's no-op proxies. "Off again" is
"off" once more: a control, whose ratio to "off" shows what the machine's noise alone does to
a row. "SDK (info)" installs an SDK ``MeterProvider`` (an in-memory reader, never read
during the run) and a ``TracerProvider`` without exporter, both through the same switch:
what recording costs.

Each round runs the sides in the order off, no SDK, off again, SDK -- every other round in
reverse -- each from the same starting state. "No SDK" thus always runs between the round's
two "off" runs, and its ratio is to their mean (which cancels a drift across the round);
"SDK (info)" is compared with the same mean. The table reports medians: of each side's
rates, and of the per-round ratios. Rows:

1. PgQueue: publish one at a time, then consume with manual ack one at a time.
2. PgQueue: ``publish_batch`` x100, then ``subscribe_ack(prefetch=100)`` + ``ack_many``.
3. PgQueue: ``publish_batch`` x100, then auto-ack ``subscribe(prefetch=100)`` (a latency
   value per message, from the text timestamp the auto-ack read returns).
4. Trigger capture: a replay (``subscribe_from``) of N changes written 100 per statement.
5. WAL capture: a durable consumer reading N changes written 100 per transaction.
6. Workflows: N runs of a 3-step no-op workflow (started untimed), executed by one worker
   at concurrency 16: a run span, three step spans and their counters per run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# See benchmarks/queue.py: keep this folder from shadowing the standard library.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import itertools
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg import sql

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
from pgstreams._core import telemetry

BATCH = 100
BODY = "lorem ipsum dolor sit amet, consectetur adipiscing elit"

Step = Callable[[int], Awaitable[None]]


def message(seq: int) -> dict[str, Any]:
    return {"seq": seq, "kind": "bench", "body": BODY}


# -- the sides ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    name: str
    tel: telemetry.Telemetry | None
    """What ``telemetry.otel`` is while this side runs."""


def sides() -> list[Side]:
    # "No SDK" runs between the two "off" runs of a round (in either order).
    found = [Side("off", None), Side("no SDK", telemetry.Telemetry()), Side("off again", None)]
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return found
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    tracers = TracerProvider(shutdown_on_exit=False)
    found.append(Side("SDK (info)", telemetry.Telemetry(meters, tracers)))
    return found


# -- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    n: int
    warmup: int
    make: Callable[[Side], Contender]


_tags = itertools.count()


def queue_row(db: ps.Database, label: str, n: int, consume: str) -> Row:
    """Publish ``n`` messages, then consume them; each run on a fresh queue, made untimed."""

    def make(side: Side) -> Contender:
        state: dict[str, ps.PgQueue[Any]] = {}

        async def prepare(n: int) -> None:
            telemetry.restore(side.tel)
            state["q"] = await ps.PgQueue.create(db, f"otel_{next(_tags)}")

        async def run(n: int) -> None:
            q = state["q"]
            values = [message(i) for i in range(n)]
            done = 0
            if consume == "one":
                for value in values:
                    await q.publish(value)
                async with q.subscribe_ack() as envelopes:
                    async for env in envelopes:
                        await env.ack()
                        done += 1
                        if done >= n:
                            break
                return
            for start in range(0, n, BATCH):
                await q.publish_batch(values[start : start + BATCH])
            if consume == "batches":
                stream = q.subscribe_ack(prefetch=BATCH).batch(BATCH)
                async with stream as batches:
                    async for batch in batches:
                        done += await q.ack_many(batch)
                        if done >= n:
                            break
            else:
                async with q.subscribe(prefetch=BATCH) as messages:
                    async for _ in messages:
                        done += 1
                        if done >= n:
                            break

        async def check(n: int) -> None:
            q = state.pop("q")
            m = await q.metrics()
            if (m.completed, m.total) != (n, n):
                raise RuntimeError(f"{side.name}: {m} after a run of {n}")
            await q.drop()

        return Contender(side.name, prepare, run, check)

    return Row(label, n, max(BATCH * 2, n // 10), make)


async def _table(db: ps.Database) -> str:
    name = f"otel_t{next(_tags)}"
    async with db.connection() as conn:
        await conn.execute(
            sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, body text)").format(
                sql.Identifier(name)
            )
        )
    return name


async def _write(db: ps.Database, table: str, first: int, n: int) -> None:
    """Rows ``first`` .. ``first + n - 1``, 100 per statement, each its own transaction."""
    insert = sql.SQL(
        "INSERT INTO {} SELECT g, %s FROM generate_series(%s::bigint, %s::bigint) AS g"
    ).format(sql.Identifier(table))
    async with db.connection() as conn:
        for start in range(first, first + n, BATCH):
            await conn.execute(insert, (BODY, start, min(start + BATCH, first + n) - 1))


def changes_row(
    db: ps.Database, label: str, n: int, capture: str, slots: list[ps.PgChangeStream[Any]]
) -> Row:
    """Write ``n`` changes (untimed), then read them; a table and stream per side, kept
    across runs (a WAL side's durable consumer goes on from where it was)."""

    def make(side: Side) -> Contender:
        state: dict[str, Any] = {"next": 1}

        async def prepare(n: int) -> None:
            telemetry.restore(side.tel)
            if "cs" not in state:
                state["table"] = table = await _table(db)
                if capture == "wal":
                    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, table, capture="wal")
                    await cs.add_consumer("bench")
                    slots.append(cs)
                else:
                    cs = ps.PgChangeStream(db, table)
                    await cs.install_trigger()
                state["cs"] = cs
            async with db.connection() as conn:
                row = await (await conn.execute("SELECT now()")).fetchone()
            assert row is not None
            state["since"] = row[0]
            await _write(db, state["table"], state["next"], n)
            state["next"] += n

        async def run(n: int) -> None:
            cs = state["cs"]
            if capture == "wal":
                stream = cs.subscribe(consumer="bench")
            else:
                stream = cs.subscribe_from(state["since"])
            state["got"] = len(await stream.take(n).collect())

        async def check(n: int) -> None:
            if state.pop("got") != n:
                raise RuntimeError(f"{side.name}: fewer than {n} changes")

        return Contender(side.name, prepare, run, check)

    return Row(label, n, max(BATCH * 2, n // 10), make)


noop = ps.Workflow[int, int]("otel-noop3")


async def one(x: int) -> int:
    return x + 1


@noop.run
async def _noop(ctx: ps.WorkflowContext, n: int) -> int:
    a = await ctx.step("a", one, n)
    b = await ctx.step("b", one, a)
    return await ctx.step("c", one, b)


def workflow_row(db: ps.Database, dsn: str, label: str, n: int) -> Row:
    def make(side: Side) -> Contender:
        state: dict[str, Any] = {}

        async def prepare(n: int) -> None:
            telemetry.restore(side.tel)
            storage = ps.PgWorkflowStorage(db, table_prefix=f"o{next(_tags)}_")
            await storage.migrate()
            engine = ps.WorkflowEngine(storage=storage, workflows=[noop])
            for i in range(n):
                await engine.start(noop, i, workflow_id=f"run-{i}")
            state["engine"] = engine

        async def run(n: int) -> None:
            engine = state["engine"]
            async with engine.worker(concurrency=16):
                await _until_done(dsn, f"{engine.storage.table_prefix}runs")

        async def check(n: int) -> None:
            engine = state.pop("engine")
            last = await engine.storage.get_run(f"run-{n - 1}")
            if last is None or last.output != n + 2:
                raise RuntimeError(f"{side.name}: the last run did not complete: {last}")
            await engine.storage.close()

        return Contender(side.name, prepare, run, check)

    return Row(label, n, max(50, n // 10), make)


async def _until_done(dsn: str, table: str) -> None:
    query = sql.SQL(
        "SELECT EXISTS (SELECT FROM pgstreams.{} WHERE status IN ('queued', 'running'))"
    ).format(sql.Identifier(table))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            row = await (await conn.execute(query)).fetchone()
            if row is None or not row[0]:
                return
            await anyio.sleep(0.005)


# -- main ---------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    before = telemetry.otel
    the_sides = sides()
    table: list[list[str]] = []
    slots: list[ps.PgChangeStream[Any]] = []
    async with (
        server(args.dsn, embedded=args.embedded) as srv,
        fresh_database(srv.dsn, "pgstreams_bench_otel") as dsn,
    ):
        facts = await server_facts(dsn)
        async with ps.connect(dsn, max_size=20) as db:
            await db.migrate()
            n = args.messages
            rows = [
                queue_row(db, "1. PgQueue publish + consume/ack, one at a time", n // 10, "one"),
                queue_row(
                    db, f"2. PgQueue publish_batch + consume/ack_many, x{BATCH}", n, "batches"
                ),
                queue_row(db, f"3. PgQueue publish_batch + auto-ack, prefetch {BATCH}", n, "auto"),
                changes_row(db, "4. changes, trigger capture (replay)", n, "trigger", slots),
                changes_row(db, "5. changes, WAL capture (durable consumer)", n, "wal", slots),
                workflow_row(db, dsn, "6. workflow runs, 3 steps, concurrency 16", args.runs),
            ]
            try:
                for row in [rows[i - 1] for i in args.rows]:
                    contenders = [row.make(side) for side in the_sides]
                    rates = await interleaved(
                        contenders, n=row.n, warmup=row.warmup, rounds=args.rounds, alternate=True
                    )
                    if args.verbose:
                        runs = "  ".join(
                            "/".join(rate(r) for r in rnd) for rnd in zip(*rates, strict=True)
                        )
                        print(f"{row.label}: per round: {runs}", file=sys.stderr)
                    off, nosdk, again, *info = rates
                    base = [(a + b) / 2 for a, b in zip(off, again, strict=True)]
                    cells = [row.label, rate(statistics.median(off))]
                    cells += [rate(statistics.median(again)), median_ratio(again, off)]
                    for other in (nosdk, *info):
                        cells += [rate(statistics.median(other)), median_ratio(other, base)]
                    table.append(cells)
            finally:
                telemetry.restore(before)
                for cs in slots:  # a database with replication slots cannot be dropped
                    await cs.drop_consumer("bench")
    header = ["operation (per second)", "off", "off again", "control", "no SDK", "ratio"]
    if len(the_sides) > 3:
        header += ["SDK (info)", "ratio (info)"]
    print(markdown_table(header, table, numeric_from=1))
    print()
    print(
        f"{facts} ({srv.label}); N={args.messages:,} per run of rows 2-5, "
        f"{args.messages // 10:,} of row 1, {args.runs:,} runs in row 6; medians of "
        f"{args.rounds} interleaved rounds (order reversed every other round) after a "
        "warm-up. 'off' = telemetry as without opentelemetry installed (switched in-process); "
        "'off again' = the same once more, control = its per-round ratio to 'off' (noise "
        "alone); 'no SDK' = opentelemetry-api installed, no SDK configured; ratio = median "
        "of per-round side / mean of the round's two 'off' runs."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_server_options(parser)
    parser.add_argument(
        "--messages", type=int, default=20_000, help="messages or changes per run (20000)"
    )
    parser.add_argument("--runs", type=int, default=1000, help="workflow runs per run (1000)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per row (9)")
    parser.add_argument("--verbose", action="store_true", help="print every run's rate")
    parser.add_argument(
        "--rows",
        type=lambda text: [int(r) for r in text.split(",")],
        default=list(range(1, 7)),
        help="which rows to run, e.g. 1,6 (all)",
    )
    args = parser.parse_args(argv)
    if not set(args.rows) <= set(range(1, 7)):
        parser.error("--rows are numbers from 1 to 6")
    if args.messages < 10 * BATCH or args.messages % (10 * BATCH):
        parser.error(f"--messages must be a multiple of {10 * BATCH}")
    return args


if __name__ == "__main__":
    anyio.run(main, parse_args())
