"""Workflows started and completed per second: a 3-step no-op workflow, 1 and 4 workers.

Run::

    python benchmarks/workflows.py [--dsn DSN] [--embedded] [--runs N] [--rounds R]

Each timed run starts N runs (4 concurrent starters) while the workers execute them, and
ends when all N are completed. WorkflowEngine uses PgWorkflowStorage. The floor sends the
same statements by hand -- PgWorkflowStorage's own SQL, one psycopg connection per worker
and per starter: create; claim and run lock (one statement); three times (start attempt,
mark succeeded); complete and unlock (one statement) -- with no engine around them.
Ratio = engine ÷ floor, per round.
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
from typing import Any

import anyio
import psycopg

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


async def completed(conn: psycopg.AsyncConnection[Any], table: str) -> int:
    cur = await conn.execute(
        psycopg.sql.SQL("SELECT count(*) FROM pgstreams.{} WHERE status = 'completed'").format(
            psycopg.sql.Identifier(table)
        )
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def until_completed(dsn: str, table: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while await completed(conn, table) < n:  # noqa: ASYNC110 - polling the database
            await anyio.sleep(0.005)


def engine_contender(db: ps.Database, dsn: str, workers: int) -> Contender:
    state: dict[str, Any] = {}

    async def prepare(n: int) -> None:
        storage = ps.PgWorkflowStorage(db, table_prefix=f"e{next(_tags)}_")
        await storage.migrate()
        state["storage"] = storage

    async def run(n: int) -> None:
        storage: ps.PgWorkflowStorage = state["storage"]
        engine = ps.WorkflowEngine(storage=storage, workflows=[noop])

        async def starter(k: int) -> None:
            for i in range(k, n, STARTERS):
                await engine.start(noop, i, workflow_id=f"run-{i}")

        async with engine.worker(concurrency=workers):
            async with anyio.create_task_group() as tg:
                for k in range(STARTERS):
                    tg.start_soon(starter, k)
            await until_completed(dsn, f"{storage.table_prefix}runs", n)

    async def check(n: int) -> None:
        storage: ps.PgWorkflowStorage = state["storage"]
        run = await storage.get_run(f"run-{n - 1}")
        assert run is not None and run.status == "completed" and run.output == n + 2

    return Contender("engine", prepare, run, check)


def floor_contender(db: ps.Database, dsn: str, workers: int) -> Contender:
    state: dict[str, Any] = {}

    async def prepare(n: int) -> None:
        storage = ps.PgWorkflowStorage(db, table_prefix=f"f{next(_tags)}_")
        await storage.migrate()
        state["storage"] = storage

    async def run(n: int) -> None:
        storage: ps.PgWorkflowStorage = state["storage"]
        q = storage._sql
        ns = f"{storage.schema}.{storage.table_prefix}:"
        done = anyio.Event()

        async def starter(k: int) -> None:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                for i in range(k, n, STARTERS):
                    params = {"id": f"run-{i}", "workflow": "noop3", "input": json.dumps(i)}
                    await conn.execute(q["CREATE"], params)

        async def worker() -> None:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                while not done.is_set():
                    cur = await conn.execute(
                        q["CLAIM_LOCK"],
                        {"workflows": ["noop3"], "owner": "floor", "lease": 30.0, "ns": ns},
                    )
                    row = await cur.fetchone()
                    if row is None:
                        await anyio.sleep(0.001)
                        continue
                    wid, value, key = row[0], row[3], row[-1]
                    for step in ("a", "b", "c"):
                        cur = await conn.execute(q["ATTEMPT"], {"id": wid, "name": step})
                        attempt = (await cur.fetchone() or (1,))[0]
                        value += 1
                        await conn.execute(
                            q["MARK"],
                            {
                                "id": wid,
                                "name": step,
                                "status": "succeeded",
                                "attempt": attempt,
                                "output": json.dumps(value),
                                "error": None,
                            },
                        )
                    await conn.execute(
                        q["FINISH"],
                        {
                            "id": wid,
                            "status": "completed",
                            "owner": "floor",
                            "output": json.dumps(value),
                            "error": None,
                            "key": key,
                        },
                    )

        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker)
            async with anyio.create_task_group() as starters:
                for k in range(STARTERS):
                    starters.start_soon(starter, k)
            await until_completed(dsn, f"{storage.table_prefix}runs", n)
            done.set()

    async def check(n: int) -> None:
        storage: ps.PgWorkflowStorage = state["storage"]
        run = await storage.get_run(f"run-{n - 1}")
        assert run is not None and run.status == "completed" and run.output == n + 2

    return Contender("floor", prepare, run, check)


async def main(args: argparse.Namespace) -> None:
    rows = []
    async with (
        server(args.dsn, embedded=args.embedded) as srv,
        fresh_database(srv.dsn, "pgstreams_bench_workflows") as dsn,
    ):
        facts = await server_facts(dsn)
        async with ps.connect(dsn, max_size=20) as db:
            await db.migrate()
            for workers in (1, 4):
                rates = await interleaved(
                    [floor_contender(db, dsn, workers), engine_contender(db, dsn, workers)],
                    n=args.runs,
                    warmup=max(50, args.runs // 10),
                    rounds=args.rounds,
                )
                rows.append(
                    [
                        f"3-step no-op workflow, {workers} worker{'s' if workers > 1 else ''}",
                        rate(sorted(rates[0])[len(rates[0]) // 2]),
                        rate(sorted(rates[1])[len(rates[1]) // 2]),
                        median_ratio(rates[1], rates[0]),
                    ]
                )
    print(
        markdown_table(["workflows started+completed", "floor /s", "engine /s", "ratio"], rows, 1)
    )
    print()
    print(
        f"{facts} ({srv.label}); {args.runs} runs per timed run, {STARTERS} starters,"
        f" medians of {args.rounds} interleaved rounds."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_server_options(parser)
    parser.add_argument("--runs", type=int, default=2000, help="runs per timed run (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (3)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    anyio.run(main, parse_args())
