"""Progress of long operations: ``progress=`` callbacks (sync or async) on migrate,
requeue_dead (PgQueue and pgmq), backfill and WAL snapshots get monotonic reports that end
at their total; INFO log lines are rate-limited; bad input is refused before anything is
written; requeue_dead works in batches without losing or duplicating a message while
consumers run."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from psycopg import sql

import pgstreams as ps
from pgstreams._core.progress import LOG_EVERY
from pgstreams._pg.migrate import MIGRATIONS, SNAPSHOTS, WORKFLOWS

from ..scheduling import scheduler
from .test_changes import execute, make_table

pytestmark = pytest.mark.anyio


class Reports:
    """A progress callback that keeps what it gets (as a sync or an async function)."""

    def __init__(self) -> None:
        self.got: list[ps.Progress] = []

    def __call__(self, report: ps.Progress) -> None:
        self.got.append(report)

    async def later(self, report: ps.Progress) -> None:
        await anyio.lowlevel.checkpoint()
        self.got.append(report)

    @property
    def done(self) -> list[int]:
        return [r.done for r in self.got]

    def check_monotonic(self, operation: str, total: int) -> None:
        assert {r.operation for r in self.got} == {operation}
        assert self.done == sorted(self.done) and self.done[0] == 0
        assert (self.got[-1].done, self.got[-1].total) == (total, total)


def progress_lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == logger and getattr(r, "pgstreams_progress", False)
    ]


# -- migrate -----------------------------------------------------------------------------


async def test_migrate_reports_each_migration_of_a_fresh_schema(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    schema = f"fresh_{uuid.uuid4().hex[:8]}"
    every = len(MIGRATIONS) + len(WORKFLOWS.migrations) + len(SNAPSHOTS.migrations)
    reports = Reports()
    caplog.set_level(logging.INFO, logger="pgstreams.migrate")
    try:
        async with ps.connect(dsn, schema=schema) as db:
            began = time.monotonic()
            await db.migrate(progress=reports.later)
            took = time.monotonic() - began
            assert reports.done == list(range(every + 1))  # one report per migration
            reports.check_monotonic("migrate", every)
            assert reports.got[0].total == every
            assert reports.got[1].detail == f"{MIGRATIONS[0].version:04d}_{MIGRATIONS[0].name}"
            assert reports.got[-1].detail.startswith("snapshots snapshots: ")
            lines = progress_lines(caplog, "pgstreams.migrate")
            assert lines[0] == f"migrate {schema}: starting, {every} migrations"
            assert lines[-1].startswith(f"migrate {schema}: done, {every} migrations in ")
            assert len(lines) <= 2 + took / LOG_EVERY  # start, end and one per 2 s at most

            # A queue makes an instance to upgrade; nothing else is pending.
            await ps.PgQueue.create(db, "jobs")
            async with db.connection() as conn:
                await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE migration_set = 'queue' AND version = 2").format(
                        sql.Identifier(schema, "instance_version")
                    )
                )
            again = Reports()
            await db.migrate(progress=again)
            assert [(r.done, r.total, r.detail) for r in again.got] == [
                (0, 1, ""),
                (1, 1, "queue jobs: 0002_dead_index"),
            ]
            caplog.clear()
            nothing = Reports()
            await db.migrate(progress=nothing)
            assert [(r.done, r.total) for r in nothing.got] == [(0, 0)]
            assert progress_lines(caplog, "pgstreams.migrate") == []  # nothing to do: quiet
    finally:
        async with ps.connect(dsn) as admin:
            await execute(admin, sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def test_a_progress_that_is_not_callable_is_refused_before_anything_is_written(
    dsn: str,
) -> None:
    schema = f"refused_{uuid.uuid4().hex[:8]}"
    async with ps.connect(dsn, schema=schema) as db:
        with pytest.raises(ps.InvalidArgumentError, match="progress must be a callable"):
            await db.migrate(progress=42)  # type: ignore[arg-type]
        async with db.connection() as conn:
            cur = await conn.execute("SELECT to_regnamespace(%s) IS NULL", [schema])
            assert await cur.fetchone() == (True,)


async def test_a_failing_callback_stops_the_operation(db: ps.Database) -> None:
    q: ps.PgQueue[Any] = await ps.PgQueue.create(db, f"f_{uuid.uuid4().hex[:8]}")
    await q.publish_batch([{"n": i} for i in range(3)])
    await kill_all(db, q)

    def boom(report: ps.Progress) -> None:
        if report.done:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        await q.requeue_dead(progress=boom)
    assert (await q.metrics()).pending == 3  # the batch that was reported had committed
    await q.drop()


# -- requeue_dead ------------------------------------------------------------------------


async def kill_all(db: ps.Database, q: ps.PgQueue[Any]) -> None:
    """Every message of ``q`` into the dead set (as expiring the last attempt would)."""
    await execute(
        db,
        sql.SQL(
            "UPDATE {} SET dead_at = now() - (id || ' ms')::interval, attempts = 1,"
            " last_error = 'boom'"
        ).format(sql.Identifier("pgstreams", f"q_{q.name}")),
    )


async def test_requeue_dead_reports_each_batch(
    db: ps.Database, caplog: pytest.LogCaptureFixture
) -> None:
    q: ps.PgQueue[dict[str, int]] = await ps.PgQueue.create(db, f"r_{uuid.uuid4().hex[:8]}")
    await q.publish_batch([{"n": i} for i in range(2500)])
    await kill_all(db, q)
    reports = Reports()
    caplog.set_level(logging.INFO, logger="pgstreams.queue")
    assert await q.requeue_dead(progress=reports) == 2500
    assert reports.done == [0, 1000, 2000, 2500]  # three batches
    reports.check_monotonic("requeue_dead", 2500)
    assert {r.detail for r in reports.got} == {q.name}
    lines = progress_lines(caplog, "pgstreams.queue")
    assert lines[0] == f"requeue_dead {q.name}: starting, 2500 messages"
    assert lines[-1].startswith(f"requeue_dead {q.name}: done, 2500 messages in ")
    m = await q.metrics()
    assert (m.pending, m.dead) == (2500, 0)
    values = [v["n"] for v in await q.subscribe(prefetch=500).take(2500).collect()]
    assert sorted(values) == list(range(2500))
    nothing = Reports()
    assert await q.requeue_dead(progress=nothing) == 0
    assert [(r.done, r.total) for r in nothing.got] == [(0, 0)]
    await q.drop()


async def test_requeue_dead_while_a_consumer_acks_loses_and_duplicates_nothing(
    db: ps.Database,
) -> None:
    q: ps.PgQueue[dict[str, int]] = await ps.PgQueue.create(db, f"c_{uuid.uuid4().hex[:8]}")
    await q.publish_batch([{"n": i} for i in range(2500)])
    await kill_all(db, q)
    await q.publish_batch([{"n": i} for i in range(2500, 2700)])  # live ones, consumed meanwhile
    seen: list[int] = []
    requeued_acked = anyio.Event()

    async def report(progress: ps.Progress) -> None:
        if progress.done == 1000:  # two batches to go: the consumer acks some of this one
            await requeued_acked.wait()

    async def consume() -> None:
        async with q.subscribe_ack(prefetch=50, poll_interval=0.05) as envelopes:
            async for env in envelopes:
                seen.append(env.value["n"])
                assert await env.ack()
                if env.value["n"] < 2500:
                    requeued_acked.set()
                if len(seen) >= 2700:
                    return

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            assert await q.requeue_dead(progress=report) == 2500
    assert sorted(seen) == list(range(2700))  # each exactly once
    m = await q.metrics()
    assert (m.pending, m.processing, m.dead) == (0, 0, 0)
    await q.drop()


async def test_requeue_dead_leaves_messages_that_die_after_it_began(db: ps.Database) -> None:
    q: ps.PgQueue[dict[str, int]] = await ps.PgQueue.create(db, f"d_{uuid.uuid4().hex[:8]}")
    await q.publish_batch([{"n": i} for i in range(1500)])
    await kill_all(db, q)
    table = sql.Identifier("pgstreams", f"q_{q.name}")

    async def die_again(report: ps.Progress) -> None:
        if report.done == 1000:  # the first batch, requeued: it dies again at once
            await execute(
                db,
                sql.SQL("UPDATE {} SET dead_at = clock_timestamp() WHERE dead_at IS NULL").format(
                    table
                ),
            )

    assert await q.requeue_dead(progress=die_again) == 1500
    m = await q.metrics()
    assert (m.pending, m.dead) == (500, 1000)  # the second death waits for the next call
    await q.drop()


async def test_requeue_dead_refuses_a_bad_progress_before_touching_anything(
    db: ps.Database,
) -> None:
    q: ps.PgQueue[Any] = await ps.PgQueue.create(db, f"b_{uuid.uuid4().hex[:8]}")
    await q.publish({"n": 1})
    await kill_all(db, q)
    with pytest.raises(ps.InvalidArgumentError, match="progress"):
        await q.requeue_dead(progress="yes")  # type: ignore[arg-type]
    assert (await q.metrics()).dead == 1
    await q.drop()


async def test_pgmq_requeue_dead_reports_each_chunk(db: ps.Database) -> None:
    q: ps.PgmqQueue[dict[str, int]] = await ps.PgmqQueue.create(
        db, f"p_{uuid.uuid4().hex[:8]}", max_attempts=1
    )
    dlq: ps.PgmqQueue[dict[str, int]] = ps.PgmqQueue(db, q.dead_letter_queue)
    await dlq.publish_batch([{"n": i} for i in range(1200)])
    reports = Reports()
    assert await q.requeue_dead(progress=reports.later) == 1200
    assert reports.done == [0, 1000, 1200]
    reports.check_monotonic("requeue_dead", 1200)
    assert (await q.metrics()).queue_length == 1200
    with pytest.raises(ps.InvalidArgumentError, match="progress"):
        await q.requeue_dead(progress=1)  # type: ignore[arg-type]
    await q.drop()  # and its dead-letter queue


async def test_pgmq_requeue_dead_ends_while_messages_keep_dying(db: ps.Database) -> None:
    """Messages that die again while requeue_dead runs wait for the next call: it moves as
    many as the DLQ held when it began (before, it popped until the DLQ was empty -- here,
    for ever)."""
    q: ps.PgmqQueue[dict[str, int]] = await ps.PgmqQueue.create(
        db, f"k_{uuid.uuid4().hex[:8]}", max_attempts=1
    )
    dlq: ps.PgmqQueue[dict[str, int]] = ps.PgmqQueue(db, q.dead_letter_queue)
    await dlq.publish_batch([{"n": i} for i in range(2500)])

    async def more_die(progress: ps.Progress) -> None:
        if progress.done:  # after each chunk, as many die again
            await dlq.publish_batch([{"n": -1}] * (progress.done % 1000 or 1000))

    with anyio.fail_after(30):
        assert await q.requeue_dead(progress=more_die) == 2500
    values = [v["n"] for v in await q.subscribe().take(2500).collect()]
    assert sorted(values) == list(range(2500))  # the ones dead at the start, each once
    assert (await dlq.metrics()).queue_length == 2500  # the late ones wait
    await q.drop()


# -- backfill ----------------------------------------------------------------------------


async def test_backfill_reports_fire_times_per_statement(
    db: ps.Database, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ps.ManualClock(datetime(2026, 3, 10, 12, tzinfo=UTC))
    sched = scheduler(db, clock)
    sid = f"m_{uuid.uuid4().hex[:6]}"
    await sched.register(sid, cron="* * * * *")
    start = datetime(2026, 3, 8, tzinfo=UTC)
    end = start + timedelta(minutes=2499)
    reports = Reports()
    caplog.set_level(logging.INFO, logger="pgstreams.scheduler")
    made = await sched.backfill(sid, start=start, end=end, progress=reports.later)
    assert len(made) == 2500
    assert reports.done == [0, 1000, 2000, 2500]
    reports.check_monotonic("backfill", 2500)
    assert {r.detail for r in reports.got} == {sid}
    lines = progress_lines(caplog, "pgstreams.scheduler")
    assert lines[0] == f"backfill {sid}: starting, 2500 fire times"
    assert lines[-1].startswith(f"backfill {sid}: done, 2500 fire times in ")
    # Again: every fire time is done, none makes a tick.
    again = Reports()
    assert await sched.backfill(sid, start=start, end=end, progress=again) == []
    assert again.done == [0, 1000, 2000, 2500]
    await sched.unregister(sid, keep_history=False)


async def test_bad_backfill_with_progress_is_refused_before_anything_is_written(
    db: ps.Database,
) -> None:
    clock = ps.ManualClock(datetime(2026, 3, 10, 12, tzinfo=UTC))
    sched = scheduler(db, clock)
    sid = f"b_{uuid.uuid4().hex[:6]}"
    await sched.register(sid, cron="* * * * *")
    start = datetime(2026, 3, 8, tzinfo=UTC)
    reports = Reports()
    with pytest.raises(ps.InvalidArgumentError, match="after end"):
        await sched.backfill(sid, start=start, end=start - timedelta(hours=1), progress=reports)
    with pytest.raises(ps.InvalidArgumentError, match="progress"):
        await sched.backfill(sid, start=start, end=start, progress=object())  # type: ignore[arg-type]
    assert reports.got == [] and await sched.history(sid) == []
    await sched.unregister(sid, keep_history=False)


# -- WAL snapshots -----------------------------------------------------------------------


async def test_wal_snapshot_reports_rows_per_chunk(
    wal_db: ps.Database, caplog: pytest.LogCaptureFixture
) -> None:
    db = wal_db
    tables = sorted([await make_table(db), await make_table(db)])  # snapshot order: by name
    for t, n in zip(tables, (250, 120), strict=True):
        await execute(
            db,
            sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(1, %s) g").format(
                sql.Identifier(t)
            ),
            n,
        )
    await execute(db, sql.SQL("ANALYZE {}, {}").format(*map(sql.Identifier, tables)))
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, tables, capture="wal")
    reports = Reports()
    caplog.set_level(logging.INFO, logger="pgstreams.changes.wal")
    stream = cs.subscribe(consumer="prog", snapshot=True, chunk_size=100, progress=reports.later)
    got = await stream.take(370).collect()
    assert {c.op for c in got} == {"snapshot"}
    # 3 chunks of the first table, 2 of the second; the last chunk is reported when the
    # change after it is asked for: take(370) stops before that.
    assert reports.done == [0, 100, 200, 250, 350]
    assert reports.got[0].total == 370  # the estimate, from ANALYZE
    keys = [f"public.{t}" for t in tables]
    assert [r.detail for r in reports.got] == [keys[0]] * 4 + [keys[1]]
    # Resuming re-reads the unfinished last chunk: a new run of reports, from 0, with the
    # estimate of the tables left.
    ops: list[str] = []
    async with cs.subscribe(consumer="prog", progress=reports) as rest:
        async for change in rest:
            ops.append(change.op)
            if ops.count("snapshot") == 20 and "insert" not in ops:
                insert = sql.SQL("INSERT INTO {} (id) VALUES (1000)")
                await execute(db, insert.format(sql.Identifier(tables[0])))
            if change.op == "insert":
                break
    assert ops == ["snapshot"] * 20 + ["insert"]
    assert [(r.done, r.total) for r in reports.got[5:]] == [(0, 120), (20, 120), (20, 20)]
    lines = progress_lines(caplog, "pgstreams.changes.wal")
    slot = f"snapshot {(await cs.consumers())[0].slot}"
    assert f"{slot}: starting, 370 rows" in lines and f"{slot}: starting, 120 rows" in lines
    assert any(line.startswith(f"{slot}: done, 20 rows in ") for line in lines)
    await cs.drop_consumer("prog")


async def test_progress_needs_a_wal_snapshot(wal_db: ps.Database) -> None:
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(wal_db, "t", capture="wal")
    with pytest.raises(ps.InvalidArgumentError, match="durable consumer"):
        cs.subscribe(progress=print)
    with pytest.raises(ps.InvalidArgumentError, match="progress must be a callable"):
        cs.subscribe(consumer="a", snapshot=True, progress=3)  # type: ignore[arg-type]
    with pytest.raises(ps.InvalidArgumentError, match="capture='wal'"):
        ps.PgChangeStream(wal_db, "t").subscribe(progress=print)
