"""Log output: lifecycle at INFO, nothing per message at INFO, warnings for dead letters
and for consumers that fall behind."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import anyio
import pytest
from psycopg import sql

import pgstreams as ps
from pgstreams._core import lag

from .test_changes import execute, make_table

pytestmark = pytest.mark.anyio


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("pgstreams") and r.levelno == level]


async def test_consuming_many_messages_logs_lifecycle_not_messages(
    db: ps.Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgstreams")
    queue: ps.PgQueue[int] = await ps.PgQueue.create(db, f"log_{uuid.uuid4().hex[:6]}")
    await queue.publish_batch(list(range(200)))

    async def ack(env: ps.Envelope[int]) -> None:
        await env.ack()

    assert await queue.subscribe_ack(prefetch=10).take(100).for_each(ack) == 100
    assert await queue.subscribe(prefetch=10).take(100).drain() == 100
    info = [r.getMessage() for r in records(caplog, logging.INFO)]
    assert any("consumer started (manual ack" in m for m in info)
    assert any("consumer started (auto-ack)" in m for m in info)
    assert len(info) < 10, info  # 200 messages, a handful of lifecycle lines
    assert not records(caplog, logging.WARNING)


async def test_dead_letters_are_a_warning_naming_the_way_back(
    db: ps.Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgstreams")
    name = f"log_{uuid.uuid4().hex[:6]}"
    queue: ps.PgQueue[int] = await ps.PgQueue.create(db, name, max_attempts=1)
    await queue.publish(1)

    async def fail(env: ps.Envelope[int]) -> None:
        await env.nack(error="boom")

    await queue.subscribe_ack().take(1).for_each(fail)
    with anyio.move_on_after(0.5) as waited:  # nothing to deliver: the read finds it dead
        await queue.subscribe_ack(poll_interval=0.05).first()
    assert waited.cancelled_caught
    warnings = [r.getMessage() for r in records(caplog, logging.WARNING)]
    assert any(f"queue {name}: 1 message(s) used up max_attempts" in m for m in warnings)
    assert (await queue.metrics()).dead == 1


async def test_a_consumer_far_behind_its_changes_warns(
    db: ps.Database, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lag, "LAG_WARNING", 0.0)  # any delay counts as behind
    caplog.set_level(logging.INFO, logger="pgstreams")
    table = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    await cs.add_consumer("slow")
    await execute(db, sql.SQL("INSERT INTO {} (id) VALUES (1), (2)").format(sql.Identifier(table)))
    assert len(await cs.subscribe(consumer="slow").take(2).collect()) == 2
    warnings = [r.getMessage() for r in records(caplog, logging.WARNING)]
    assert any("(consumer slow):" in m and "s behind" in m for m in warnings), warnings
    info = [r.getMessage() for r in records(caplog, logging.INFO)]
    assert any("capture trigger installed" in m for m in info)
    assert any("(consumer slow): subscribed" in m for m in info)
    assert any("(consumer slow): unsubscribed" in m for m in info)


async def test_wal_capture_logs_its_slot_lifecycle_and_lag(
    wal_db: ps.Database, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lag, "LAG_WARNING", 0.0)
    caplog.set_level(logging.INFO, logger="pgstreams")
    table = await make_table(wal_db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(wal_db, table, capture="wal")
    await cs.add_consumer("behind")
    await execute(
        wal_db, sql.SQL("INSERT INTO {} (id) VALUES (1), (2)").format(sql.Identifier(table))
    )
    assert len(await cs.subscribe(consumer="behind").take(2).collect()) == 2
    await cs.drop_consumer("behind")
    info = [r.getMessage() for r in records(caplog, logging.INFO)]
    slot = [m.split()[-1] for m in info if m.startswith("created replication slot")]
    assert len(slot) == 1 and f"dropped replication slot {slot[0]}" in info
    assert any(f"reading slot {slot[0]}" in m for m in info)
    warnings = [r.getMessage() for r in records(caplog, logging.WARNING)]
    assert any("WAL changes of" in m and "s behind" in m for m in warnings), warnings
