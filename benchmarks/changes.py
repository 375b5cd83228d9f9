"""PgChangeStream: capture overhead, commit-to-handler latency, delivery and replay rates.

Run::

    python benchmarks/changes.py [--dsn DSN] [--embedded] [--seconds S]

1. Capture overhead: pgbench (from the same PostgreSQL build as the server when embedded,
   else the one on PATH; prepared statements) runs one-row INSERT transactions for
   ``--seconds`` against a plain
   table and against the same table with capture installed (statement-level with NOTIFY,
   statement-level without, row-level with and without), with 1 and 4 clients, rounds
   interleaved. Ratio = TPS / plain TPS. A "floor" row does the least any capture that
   logs each change in the writing transaction must do: the INSERT plus a log INSERT of
   its row image, in one statement, with no trigger and no NOTIFY.
2. Latency: a writer commits single-row inserts 3 ms apart; a subscriber (LISTEN on)
   records when each change reaches its handler. Latency = handler time - the moment the
   writer's commit returned (same process, same clock).
3. Delivery under a sustained writer: pgbench inserts 20-row transactions with 2 clients
   for ``--seconds`` while one subscriber consumes; delivered/s counts from the first
   commit to the moment the subscriber has caught up. Ratio = delivered/s ÷ written/s.
4. Replay: 200k logged changes read with ``subscribe_from(0)``, against a floor that pages
   through the same rows of the log by id with psycopg and decodes the same JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

# See benchmarks/queue.py: keep this folder from shadowing the standard library.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

import anyio
import anyio.to_thread
import psycopg

import pgstreams as ps
from benchmarks._common import (
    add_server_options,
    fresh_database,
    markdown_table,
    server,
    server_facts,
)

PLAIN, FLOOR, CAPTURED, QUIET, ROWS, ROWS_QUIET, FEED, LOG = (
    "bench_plain",
    "bench_floor",
    "bench_captured",
    "bench_quiet",
    "bench_rows",
    "bench_rows_quiet",
    "bench_feed",
    "bench_log",
)
REPLAY = 200_000


def pgbench_path() -> str:
    from pgstreams._pg.embedded import find_bindir

    try:
        candidate = Path(find_bindir()) / "pgbench"
        if candidate.exists():
            return str(candidate)
    except ps.EmbeddedPostgresError:
        pass
    found = shutil.which("pgbench")
    if found is None:
        raise SystemExit(
            "pgbench not found (install the 'embedded' extra or PostgreSQL client tools)"
        )
    return found


def pgbench(dsn: str, script: str, clients: int, seconds: int) -> float:
    """Run pgbench with a custom script; returns transactions per second."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(script)
        f.flush()
        out = subprocess.run(
            [
                pgbench_path(),
                "-n",
                "-M",
                "prepared",  # as drivers do for repeated statements (psycopg after 5 runs)
                "-c",
                str(clients),
                "-j",
                str(clients),
                "-T",
                str(seconds),
                "-f",
                f.name,
                dsn,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(f"no tps in pgbench output:\n{out}")


# The floor of any capture that logs each change in the writing transaction: the same
# INSERT plus a hand-written INSERT of its row image into a log table shaped like the
# library's, in one statement -- no trigger, no NOTIFY.
FLOOR_SCRIPT = (
    "WITH a AS (INSERT INTO bench_floor (v, body) VALUES (1, 'payload of a typical row')"
    " RETURNING *) INSERT INTO bench_floor_log (stream, op, pk, new)"
    " SELECT 'floor', 'insert', jsonb_build_object('id', a.id), to_jsonb(a) FROM a;\n"
)


def insert_script(table: str, rows: int = 1) -> str:
    if table == FLOOR:
        return FLOOR_SCRIPT
    if rows == 1:
        return f"INSERT INTO {table} (v, body) VALUES (1, 'payload of a typical row');\n"
    return (
        f"INSERT INTO {table} (v, body) SELECT g, 'payload of a typical row' "
        f"FROM generate_series(1, {rows}) g;\n"
    )


async def create_table(conn: psycopg.AsyncConnection[Any], name: str) -> None:
    await conn.execute(
        psycopg.sql.SQL(
            "CREATE TABLE {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " v int NOT NULL, body text, created_at timestamptz NOT NULL DEFAULT now())"
        ).format(psycopg.sql.Identifier(name))
    )


# -- 1. capture overhead ---------------------------------------------------------------


async def overhead(dsn: str, seconds: int, rounds: int) -> list[list[str]]:
    rows: list[list[str]] = []
    for clients in (1, 4):
        tps: dict[str, list[float]] = {
            PLAIN: [],
            FLOOR: [],
            CAPTURED: [],
            QUIET: [],
            ROWS: [],
            ROWS_QUIET: [],
        }
        for _ in range(rounds):
            for table in tps:
                tps[table].append(
                    await anyio.to_thread.run_sync(
                        pgbench, dsn, insert_script(table), clients, seconds
                    )
                )
        for table, label in (
            (PLAIN, "plain table"),
            (FLOOR, "floor: the INSERT plus a log INSERT, one statement"),
            (CAPTURED, "statement-level capture (default)"),
            (QUIET, "statement-level capture, NOTIFY off"),
            (ROWS, 'row-level capture (capture="row")'),
            (ROWS_QUIET, "row-level capture, NOTIFY off"),
        ):
            ratios = [t / p for t, p in zip(tps[table], tps[PLAIN], strict=True)]
            rows.append(
                [
                    f"{clients} writer{'s' if clients > 1 else ''}: {label}",
                    f"{statistics.median(tps[table]):,.0f} TPS",
                    f"{statistics.median(ratios):.2f}",
                ]
            )
    return rows


# -- 2. latency ------------------------------------------------------------------------


async def latency(db: ps.Database, dsn: str, count: int) -> tuple[float, float]:
    cs: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(db, CAPTURED)
    received: dict[int, float] = {}
    committed: dict[int, float] = {}
    all_received = anyio.Event()

    async def consume() -> None:
        async with cs.subscribe(poll_interval=5) as stream:
            async for change in stream:
                if change.new is not None and change.new["v"] < 0:
                    received[-change.new["v"]] = time.perf_counter()
                    if len(received) == count:
                        all_received.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.5)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for i in range(1, count + 1):
                await conn.execute(
                    psycopg.sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(
                        psycopg.sql.Identifier(CAPTURED)
                    ),
                    [-i],
                )
                committed[i] = time.perf_counter()
                await anyio.sleep(0.003)
        with anyio.fail_after(30):
            await all_received.wait()
        tg.cancel_scope.cancel()
    ms = sorted((received[i] - committed[i]) * 1000 for i in committed)
    return statistics.median(ms), ms[int(len(ms) * 0.99) - 1]


# -- 3. delivery under a sustained writer ----------------------------------------------


async def delivery(db: ps.Database, dsn: str, seconds: int) -> tuple[float, float]:
    cs: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(db, FEED)
    delivered = 0
    target: list[int] = []
    caught_up_event = anyio.Event()

    async def consume() -> None:
        nonlocal delivered
        async with cs.subscribe(poll_interval=1) as stream:
            async for _ in stream:
                delivered += 1
                if target and delivered >= target[0]:
                    caught_up_event.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.5)
        start = time.perf_counter()
        tps = await anyio.to_thread.run_sync(pgbench, dsn, insert_script(FEED, 20), 2, seconds)
        written_for = time.perf_counter() - start
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pgstreams.changes WHERE stream = %s", [await cs.key()]
            )
            row = await cur.fetchone()
        total = int(row[0]) if row else 0
        target.append(total)
        if delivered >= total:
            caught_up_event.set()
        with anyio.fail_after(120):
            await caught_up_event.wait()
        caught_up = time.perf_counter() - start
        tg.cancel_scope.cancel()
    del tps
    return total / caught_up, total / written_for


# -- 4. replay -------------------------------------------------------------------------


async def replay(db: ps.Database, dsn: str, rounds: int) -> tuple[float, float]:
    cs: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(db, LOG)
    key = await cs.key()
    page = 500

    async def ours() -> float:
        start = time.perf_counter()
        n = await cs.subscribe_from(0, page_size=page).take(REPLAY).drain()
        assert n == REPLAY
        return REPLAY / (time.perf_counter() - start)

    async def floor() -> float:
        start = time.perf_counter()
        seen, after = 0, 0
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while seen < REPLAY:
                cur = await conn.execute(
                    "SELECT id, txid::text, op, pk::text, new::text, old::text, at"
                    " FROM pgstreams.changes WHERE stream = %s AND id > %s ORDER BY id LIMIT %s",
                    [key, after, page],
                )
                for row in await cur.fetchall():
                    after = row[0]
                    json.loads(row[4])
                    json.loads(row[3])
                    seen += 1
        return REPLAY / (time.perf_counter() - start)

    mine, base = [], []
    for _ in range(rounds):
        base.append(await floor())
        mine.append(await ours())
    return statistics.median(mine), statistics.median(base)


async def main(args: argparse.Namespace) -> None:
    async with (
        server(args.dsn, embedded=args.embedded) as srv,
        fresh_database(srv.dsn, "pgstreams_bench_changes") as dsn,
    ):
        facts = await server_facts(dsn)
        async with (
            ps.connect(dsn) as db,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        ):
            for name in (PLAIN, FLOOR, CAPTURED, QUIET, ROWS, ROWS_QUIET, FEED, LOG):
                await create_table(conn, name)
            await db.migrate()
            await conn.execute(
                "CREATE TABLE bench_floor_log"
                " (LIKE pgstreams.changes INCLUDING DEFAULTS INCLUDING IDENTITY);"
                " ALTER TABLE bench_floor_log ADD PRIMARY KEY (id);"
                " CREATE INDEX ON bench_floor_log (txid)"
            )
            await ps.PgChangeStream(db, CAPTURED).install_trigger()
            await ps.PgChangeStream(db, QUIET, notify="off").install_trigger()
            await ps.PgChangeStream(db, ROWS, capture="row").install_trigger()
            await ps.PgChangeStream(db, ROWS_QUIET, capture="row", notify="off").install_trigger()
            await ps.PgChangeStream(db, FEED).install_trigger()
            await ps.PgChangeStream(db, LOG).install_trigger()
            await conn.execute(
                psycopg.sql.SQL(
                    "INSERT INTO {} (v, body) SELECT g, 'payload of a typical row'"
                    " FROM generate_series(1, %s) g"
                ).format(psycopg.sql.Identifier(LOG)),
                [REPLAY],
            )
            await conn.execute("VACUUM ANALYZE pgstreams.changes")

            capture = await overhead(dsn, args.seconds, args.rounds)
            p50, p99 = await latency(db, dsn, args.latency_samples)
            rate, written = await delivery(db, dsn, args.seconds)
            replayed, floor = await replay(db, dsn, args.rounds)

    print(
        markdown_table(
            ["writer (pgbench, one-row INSERT per transaction)", "rate", "ratio"],
            capture,
            numeric_from=1,
        )
    )
    print()
    print(
        markdown_table(
            ["delivery", "measured", "baseline", "ratio"],
            [
                ["commit → handler latency, p50", f"{p50:.2f} ms", "", ""],
                ["commit → handler latency, p99", f"{p99:.2f} ms", "", ""],
                [
                    "changes/s under a sustained writer",
                    f"{rate:,.0f}/s",
                    f"{written:,.0f}/s written",
                    f"{rate / written:.2f}",
                ],
                [
                    f"replay of {REPLAY:,} logged changes",
                    f"{replayed:,.0f}/s",
                    f"{floor:,.0f}/s raw paging",
                    f"{replayed / floor:.2f}",
                ],
            ],
            numeric_from=1,
        )
    )
    print()
    print(
        f"{facts} ({srv.label}); pgbench runs of {args.seconds:g} s, medians of {args.rounds} "
        f"interleaved rounds; latency over {args.latency_samples} inserts 3 ms apart."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_server_options(parser)
    parser.add_argument("--seconds", type=int, default=3, help="pgbench run length (3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measurement (3)")
    parser.add_argument("--latency-samples", type=int, default=500, help="inserts timed (500)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.latency_samples < 100:
        parser.error("--seconds must be positive, --rounds >= 1, --latency-samples >= 100")
    return args


if __name__ == "__main__":
    anyio.run(main, parse_args())
