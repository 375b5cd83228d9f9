"""Bad input is rejected with a clear error before anything is written."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest

import pgstreams as ps


async def count_tables(db: ps.Database) -> int:
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s", [db.schema]
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "must not be empty"),
        ("x" * 49, "limit is 48"),
        ("Jobs", "lowercase"),
        ("jobs-1", "lowercase"),
        ('a"; drop table x; --', "lowercase"),
        ("é", "lowercase"),
    ],
)
async def test_invalid_queue_names(db: ps.Database, name: str, match: str) -> None:
    before = await count_tables(db)
    with pytest.raises(ps.InvalidArgumentError, match=match):
        await ps.PgQueue.create(db, name)
    assert await count_tables(db) == before


async def test_non_string_name(db: ps.Database) -> None:
    with pytest.raises(ps.InvalidArgumentError, match="must be a str"):
        await ps.PgQueue.create(db, 42)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
async def test_invalid_max_attempts(db: ps.Database, bad: Any) -> None:
    before = await count_tables(db)
    with pytest.raises(ps.InvalidArgumentError, match="max_attempts"):
        await ps.PgQueue.create(db, "never_created", max_attempts=bad)
    assert await count_tables(db) == before


@pytest.mark.parametrize(
    "payload", [object(), {1, 2}, {"f": math.nan}, {"x": b"bytes"}, "nul\x00char"]
)
async def test_unserialisable_payloads_are_rejected_before_writing(
    db: ps.Database, payload: Any
) -> None:
    q = await ps.PgQueue.create(db, "payloads")
    with pytest.raises(ps.PayloadError):
        await q.publish(payload)
    with pytest.raises(ps.PayloadError):
        await q.publish_batch([1, payload])
    assert (await q.metrics()).total == 0


async def test_bad_headers(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, "headers")
    with pytest.raises(ps.PayloadError):
        await q.publish(1, headers={1: "x"})  # type: ignore[dict-item]
    with pytest.raises(ps.PayloadError):
        await q.publish(1, headers={"x": object()})
    assert (await q.metrics()).total == 0


@pytest.mark.parametrize("bad", [-1, -0.001, math.inf, math.nan, "5"])
async def test_bad_delays_and_visibility(db: ps.Database, bad: Any) -> None:
    q = await ps.PgQueue.create(db, f"durations_{uuid.uuid4().hex[:8]}")
    with pytest.raises(ps.InvalidArgumentError):
        await q.publish(1, delay=bad)
    with pytest.raises(ps.InvalidArgumentError):
        await q.publish_batch([1], delay=bad)
    with pytest.raises(ps.InvalidArgumentError):
        q.subscribe_ack(visibility=bad)
    assert (await q.metrics()).total == 0
    await q.publish(1)
    env = await q.subscribe_ack().first()
    with pytest.raises(ps.InvalidArgumentError):
        await env.nack(delay=bad)
    assert not env.settled
    assert await env.ack()


async def test_zero_visibility_and_prefetch_rejected(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, "zeroes")
    with pytest.raises(ps.InvalidArgumentError):
        q.subscribe_ack(visibility=0)
    with pytest.raises(ps.InvalidArgumentError):
        q.subscribe(prefetch=0)


def test_errors_share_one_base() -> None:
    for err in (
        ps.InvalidArgumentError,
        ps.PayloadError,
        ps.DatabaseError,
        ps.LeaseLostError,
        ps.EmptyStreamError,
        ps.EmbeddedPostgresError,
    ):
        assert issubclass(err, ps.PgStreamsError)
    assert issubclass(ps.InvalidArgumentError, ValueError)
    assert issubclass(ps.PayloadError, TypeError)


def test_bad_schema_name() -> None:
    with pytest.raises(ps.InvalidArgumentError):
        ps.connect("postgresql://x", schema="Bad-Schema")


async def test_escaped_nul_text_is_a_valid_payload(db: ps.Database) -> None:
    q = await ps.PgQueue.create(db, "nul_text")
    await q.publish(r"C:\u0000dir")
    assert await q.subscribe().first() == r"C:\u0000dir"
