"""Workflows started and completed per second: a 3-step no-op workflow, 1 and 4 workers;
and how soon an idle worker starts a new run.

Run::

    python benchmarks/workflows.py [--dsn DSN] [--embedded] [--runs N] [--rounds R]
        [--samples S]

Each timed run starts N runs (4 concurrent starters, each awaiting one start at a time)
while the workers execute them, and ends when none is left queued or running. A worker is
one ``engine.worker(concurrency=C)`` block with its own engine and PgWorkflowStorage, as a
separate process would have; the rows give C = 1 (one run at a time), 16 and 64.

The floor sends PgWorkflowStorage's own statements by hand, with no engine around them:
each starter inserts its runs one statement each; each floor worker, on its own
connection, claims up to C runs in one statement (taking their locks), then moves them
through the steps in lockstep -- one statement starts an attempt of every claimed run, one
records every result -- and finishes them (and unlocks) in one statement. Ratio = engine ÷
floor, per round.

Latency: a worker (its own engine and storage, as another process would have, default
poll interval) sits idle; a starter calls ``start`` and the time to the first step's
function being called is measured, S times, the worker idle again before each start (the
starter waits for the run's end only after the step has been called). A wake-up (NOTIFY)
brings the worker; polling alone would take up to its poll interval.
"""

from __future__ import annotations

import sys
from pathlib import Path

# See benchmarks/queue.py: keep this folder from shadowing the standard library.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import itertools
import json
import statistics
import time
from typing import Any

import anyio
import psycopg
from psycopg.types.json import Jsonb

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

STARTERS = 4

noop = ps.Workflow[int, int]("noop3")


async def one(x: int) -> int:  # a coroutine step runs on the loop (sync ones go to a thread)
    return x + 1


@noop.run
async def _noop(ctx: ps.WorkflowContext, n: int) -> int:
    a = await ctx.step("a", one, n)
    b = await ctx.step("b", one, a)
    return await ctx.step("c", one, b)


_tags = itertools.count()

first_step = ps.Workflow[int, int]("first-step")
_first_called: dict[int, float] = {}
_first_events: dict[int, anyio.Event] = {}


async def mark(n: int) -> int:
    _first_called[n] = time.perf_counter()
    _first_events[n].set()
    return n


@first_step.run
async def _first_step(ctx: ps.WorkflowContext, n: int) -> int:
    return await ctx.step("first", mark, n)


async def start_latencies(db: ps.Database, samples: int) -> list[float]:
    """Seconds from ``start`` to the first step's call, with the worker idle before each.
    The starter does nothing else meanwhile; it waits for the run's end afterwards."""
    prefix = f"l{next(_tags)}_"
    working = ps.PgWorkflowStorage(db, table_prefix=prefix)
    starting = ps.PgWorkflowStorage(db, table_prefix=prefix)
    worker = ps.WorkflowEngine(storage=working, workflows=[first_step])
    starter = ps.WorkflowEngine(storage=starting, workflows=[first_step])
    latencies = []
    async with worker.worker():
        for i in range(-10, samples):  # the first ten warm up (untimed)
            _first_events[i] = anyio.Event()
            began = time.perf_counter()
            run = await starter.start(first_step, i, workflow_id=f"latency-{i}")
            await _first_events[i].wait()
            if i >= 0:
                latencies.append(_first_called[i] - began)
            await run.result()
            await anyio.sleep(0.02)  # the worker goes back to sleep
    await working.close()
    await starting.close()
    return latencies


async def until_done(dsn: str, table: str) -> None:
    """Until no run is queued or running (the open-runs index keeps this cheap)."""
    query = psycopg.sql.SQL(
        "SELECT EXISTS (SELECT FROM pgstreams.{} WHERE status IN ('queued', 'running'))"
    ).format(psycopg.sql.Identifier(table))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            row = await (await conn.execute(query)).fetchone()
            if row is None or not row[0]:
                return
            await anyio.sleep(0.005)


def engine_contender(db: ps.Database, dsn: str, workers: int, concurrency: int) -> Contender:
    state: dict[str, Any] = {}

    async def prepare(n: int) -> None:
        storage = ps.PgWorkflowStorage(db, table_prefix=f"e{next(_tags)}_")
        await storage.migrate()
        state["prefix"] = storage.table_prefix

    async def run(n: int) -> None:
        engines = [
            ps.WorkflowEngine(
                storage=ps.PgWorkflowStorage(db, table_prefix=state["prefix"]), workflows=[noop]
            )
            for _ in range(workers)
        ]

        async def starter(k: int) -> None:
            for i in range(k, n, STARTERS):
                await engines[0].start(noop, i, workflow_id=f"run-{i}")

        async def work(engine: ps.WorkflowEngine, stop: anyio.Event) -> None:
            async with engine.worker(concurrency=concurrency):
                await stop.wait()

        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for engine in engines:
                tg.start_soon(work, engine, stop)
            async with anyio.create_task_group() as starters:
                for k in range(STARTERS):
                    starters.start_soon(starter, k)
            await until_done(dsn, f"{state['prefix']}runs")
            stop.set()
        for engine in engines:
            await engine.storage.close()

    return Contender("engine", prepare, run, checker(db, state))


def checker(db: ps.Database, state: dict[str, Any]) -> Any:
    async def check(n: int) -> None:
        storage = ps.PgWorkflowStorage(db, table_prefix=state["prefix"])
        async with db.connection() as conn:
            cur = await conn.execute(
                psycopg.sql.SQL(
                    "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FROM {}"
                ).format(storage._names["runs"])
            )
            assert await cur.fetchone() == (n, n)
        run = await storage.get_run(f"run-{n - 1}")
        assert run is not None and run.output == n + 2
        history = await storage.run_history(f"run-{n - 1}")
        assert [(h.step, h.attempt, h.status) for h in history] == [
            (step, 1, "succeeded") for step in "abc"
        ]

    return check


def floor_contender(db: ps.Database, dsn: str, workers: int, concurrency: int) -> Contender:
    state: dict[str, Any] = {}

    async def prepare(n: int) -> None:
        storage = ps.PgWorkflowStorage(db, table_prefix=f"f{next(_tags)}_")
        await storage.migrate()
        state["prefix"] = storage.table_prefix
        state["sql"] = storage._sql

    async def run(n: int) -> None:
        q = state["sql"]
        ns = f"pgstreams.{state['prefix']}:"
        done = anyio.Event()

        async def starter(k: int) -> None:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                for i in range(k, n, STARTERS):
                    run = {"i": f"run-{i}", "w": "noop3", "n": json.dumps(i)}
                    await conn.execute(q["create"], {"batch": Jsonb([run])})

        async def worker() -> None:
            claim = {"workflows": ["noop3"], "owner": "floor", "lease": 30.0, "ns": ns}
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                while not done.is_set():
                    cur = await conn.execute(q["claim"], {**claim, "n": concurrency})
                    rows = await cur.fetchall()
                    if not rows:
                        await anyio.sleep(0.001)
                        continue
                    ids = [r[0] for r in rows]
                    values = {r[0]: r[3] for r in rows}
                    for step in ("a", "b", "c"):
                        cur = await conn.execute(
                            q["attempt"], {"ids": ids, "names": [step] * len(ids)}
                        )
                        attempts = {r[0]: r[2] for r in await cur.fetchall()}
                        marks = []
                        for i in ids:
                            values[i] += 1
                            marks.append(
                                {
                                    "i": i,
                                    "n": step,
                                    "s": "succeeded",
                                    "a": attempts[i],
                                    "o": json.dumps(values[i]),
                                }
                            )
                        await conn.execute(q["mark"], {"batch": Jsonb(marks)})
                    ends = [
                        {
                            "i": r[0],
                            "s": "completed",
                            "w": "floor",
                            "o": json.dumps(values[r[0]]),
                            "k": r[-1],
                        }
                        for r in rows
                    ]
                    await conn.execute(q["finish"], {"batch": Jsonb(ends)})

        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker)
            async with anyio.create_task_group() as starters:
                for k in range(STARTERS):
                    starters.start_soon(starter, k)
            await until_done(dsn, f"{state['prefix']}runs")
            done.set()

    return Contender("floor", prepare, run, checker(db, state))


CONFIGS = [(1, 1), (1, 16), (1, 64), (4, 16)]
"""(workers, concurrency per worker) of each row."""


async def main(args: argparse.Namespace) -> None:
    rows = []
    latencies: list[float] = []
    async with (
        server(args.dsn, embedded=args.embedded) as srv,
        fresh_database(srv.dsn, "pgstreams_bench_workflows") as dsn,
    ):
        facts = await server_facts(dsn)
        async with ps.connect(dsn, max_size=20) as db:
            await db.migrate()
            if args.samples:
                latencies = await start_latencies(db, args.samples)
            for workers, concurrency in CONFIGS:
                contenders = [
                    floor_contender(db, dsn, workers, concurrency),
                    engine_contender(db, dsn, workers, concurrency),
                ]
                rates = await interleaved(
                    contenders, n=args.runs, warmup=max(50, args.runs // 10), rounds=args.rounds
                )
                rows.append(
                    [
                        f"{workers} worker{'s' if workers > 1 else ''}, concurrency {concurrency}",
                        rate(sorted(rates[0])[len(rates[0]) // 2]),
                        rate(sorted(rates[1])[len(rates[1]) // 2]),
                        median_ratio(rates[1], rates[0]),
                    ]
                )
    print(
        markdown_table(
            ["3-step no-op workflows started+completed", "floor /s", "engine /s", "ratio"],
            rows,
            1,
        )
    )
    if latencies:
        cuts = statistics.quantiles(latencies, n=10)
        print()
        print(
            markdown_table(
                ["idle worker (PgWorkflowStorage)", "ms"],
                [
                    [f"start -> first step latency p{p}, idle worker", f"{cuts[i] * 1000:.1f}"]
                    for p, i in ((50, 4), (90, 8))
                ],
                1,
            )
        )
    print()
    print(
        f"{facts} ({srv.label}); {args.runs} runs per timed run, {STARTERS} starters,"
        f" medians of {args.rounds} interleaved rounds; latency over {args.samples} starts."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_server_options(parser)
    parser.add_argument("--runs", type=int, default=2000, help="runs per timed run (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (3)")
    parser.add_argument(
        "--samples", type=int, default=200, help="starts timed for the latency (200; 0: skip)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    anyio.run(main, parse_args())
