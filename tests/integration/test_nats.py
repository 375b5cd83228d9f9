"""The NATS JetStream bridge against a real nats-server: the sink stores each change once
and in commit order, acks upstream only what JetStream stored (a relay killed mid-stream,
a server killed mid-stream), the source's redelivery, nack and dead letters, and bad input
refused before anything is acked."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import pytest
from nats.js import JetStreamContext
from psycopg import sql

import pgstreams as ps
from pgstreams import nats as psn
from pgstreams.nats import pubacks
from pgstreams.testing import NatsServer

from .test_changes import execute, make_table

pytestmark = pytest.mark.anyio

RELAY = Path(__file__).parents[1] / "_nats_relay.py"


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    context = await psn.connect(nats_server.url)
    yield context
    await psn.close(context)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def stream_messages(js: JetStreamContext, stream: str) -> list[Any]:
    """Every message of ``stream``, in stream order."""
    info = await js.stream_info(stream)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        found.append(await js.get_msg(stream, seq))
    return found


async def stream_count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def durable(
    db: ps.Database, table: str, capture: str, consumer: str
) -> ps.PgChangeStream[Any]:
    """A change stream of ``table`` by ``capture`` (trigger or wal) with ``consumer`` made."""
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(
        db, table, capture="wal" if capture == "wal" else "statement"
    )
    if capture == "trigger":
        await cs.install_trigger()
    await cs.add_consumer(consumer)
    return cs


async def logged_for_sink(
    db: ps.Database, js: JetStreamContext, consumer: str, rows: int
) -> tuple[str, str, ps.PgChangeStream[Any]]:
    """A JetStream stream taking ``<prefix>.>``, and a trigger-captured table with ``rows``
    changes waiting for ``consumer``: (stream name, subject prefix, change stream)."""
    name, prefix = unique("S"), unique("sub")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
    table = await make_table(db)
    cs = await durable(db, table, "trigger", consumer)
    await insert_rows(db, table, range(0, rows))
    return name, prefix, cs


async def insert_rows(db: ps.Database, table: str, ids: range) -> None:
    await execute(
        db,
        sql.SQL(
            "INSERT INTO {} (id, v) SELECT g, g FROM generate_series(%s::int, %s::int) g"
        ).format(sql.Identifier(table)),
        ids.start,
        ids.stop - 1,
    )


# -- the sink --------------------------------------------------------------------------


@pytest.mark.parametrize("capture", ["trigger", "wal"])
async def test_changes_from_four_writers_are_stored_once_in_delivery_order(
    capture: str, dsn: str, wal_dsn: str, js: JetStreamContext
) -> None:
    """10,000 changes from 4 writers whose transactions interleave. The stream holds each
    once, in the order the change stream delivered them: per-row order for trigger
    capture, commit order (whole transactions) for WAL capture."""
    async with ps.connect(wal_dsn if capture == "wal" else dsn, max_size=10) as db:
        await db.migrate()
        table = await make_table(db)
        name, prefix = unique("S"), unique("db")
        await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
        cs = await durable(db, table, capture, "to_nats")
        total = 10_000

        async def writer(w: int) -> None:
            for start in range(w * 2500, (w + 1) * 2500, 50):  # transactions of 50 rows
                await insert_rows(db, table, range(start, start + 50))

        delivered: list[int] = []
        async with anyio.create_task_group() as tg:
            for w in range(4):
                tg.start_soon(writer, w)
            sink = psn.publish(js, subject=lambda c: f"{prefix}.{c.op}")
            changes = cs.subscribe(consumer="to_nats").take(total)
            tapped = changes.tap(lambda c: delivered.append(c.id))
            assert await tapped.through(sink).drain() == total
        documents = [json.loads(m.data) for m in await stream_messages(js, name)]
        stored = [d["id"] for d in documents]
        assert len(stored) == len(set(stored)) == total  # each change exactly once
        assert stored == delivered
        rows = [d["new"]["id"] for d in documents]
        assert sorted(rows) == list(range(total))
        if capture == "wal":  # whole transactions, one after the other, in commit order
            assert stored == sorted(stored)  # a WAL change id leads with its commit LSN
            ended: set[int] = set()
            for before, after in itertools.pairwise(documents):
                if after["txid"] != before["txid"]:
                    assert after["txid"] not in ended
                    ended.add(before["txid"])
            await cs.drop_consumer("to_nats")
        else:
            assert (await cs.lag("to_nats")).changes == 0  # all committed upstream


async def _wait_for(check: Any, what: str, seconds: float = 30) -> None:
    """Poll ``check()`` (JetStream's and the database's state: nothing to wait on)."""
    with anyio.fail_after(seconds):
        while not await check():  # noqa: ASYNC110 - server state, no event to await
            await anyio.sleep(0.05)
    del what


async def _start_relay(
    dsn: str, table: str, url: str, prefix: str, capture: str = "trigger"
) -> anyio.abc.Process:
    proc = await anyio.open_process(
        [sys.executable, str(RELAY), dsn, table, "relay", url, prefix, capture],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    with anyio.fail_after(20):
        output = b""
        async for chunk in proc.stdout:
            output += chunk
            if b"ready" in output:
                break
    return proc


async def _kill(proc: anyio.abc.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await proc.aclose()


@pytest.mark.parametrize("capture", ["trigger", "wal"])
async def test_a_relay_killed_mid_stream_and_restarted_stores_each_change_once(
    capture: str, dsn: str, wal_dsn: str, js: JetStreamContext, nats_server: NatsServer
) -> None:
    url = wal_dsn if capture == "wal" else dsn
    async with ps.connect(url) as db:
        await db.migrate()
        table = await make_table(db)
        name, prefix = unique("K"), unique("kill")
        await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
        cs = await durable(db, table, capture, "relay")
        total = 6000
        await insert_rows(db, table, range(0, 3000))
        proc = await _start_relay(url, table, nats_server.url, prefix, capture)
        try:

            async def some_stored() -> bool:
                return await stream_count(js, name) >= 500

            await _wait_for(some_stored, "the relay to store some")
            await insert_rows(db, table, range(3000, 6000))
            await _kill(proc)  # mid-stream: messages in flight, positions not all committed
            assert await stream_count(js, name) < total
            proc = await _start_relay(url, table, nats_server.url, prefix, capture)

            async def all_stored() -> bool:
                return await stream_count(js, name) >= total

            await _wait_for(all_stored, "the restarted relay to store the rest")
            await anyio.sleep(0.5)  # a duplicate would land now
        finally:
            await _kill(proc)
        documents = [json.loads(m.data) for m in await stream_messages(js, name)]
        assert len(documents) == total
        assert sorted(d["new"]["id"] for d in documents) == list(range(total))  # once each
        if capture == "wal":
            await cs.drop_consumer("relay")


async def test_a_server_killed_mid_stream_loses_nothing_and_the_cursor_waits(
    db: ps.Database, dsn: str, tmp_path: Path
) -> None:
    """The NATS server is SIGKILLed twice mid-stream (same store when it comes back). The
    first time the relay rides it out. The second time the relay is SIGKILLed too while the
    server is down: had its position passed a change JetStream had not acked, that change
    would be missing in the end."""
    table = await make_table(db)
    server = NatsServer(_binary(), str(tmp_path))
    server.start()
    name, prefix = unique("R"), unique("restart")
    js = await psn.connect(server.url)
    try:
        await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
        cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, table)
        await cs.install_trigger()
        await cs.add_consumer("relay")
        proc = await _start_relay(dsn, table, server.url, prefix)
        try:
            written = 0
            for round_ in range(2):
                await insert_rows(db, table, range(written, written + 2000))
                written += 2000
                target = written - 1000

                async def partly(target: int = target) -> bool:
                    return await stream_count(js, name) >= target

                await _wait_for(partly, "part of the round stored")
                server.stop(signal.SIGKILL)
                await insert_rows(db, table, range(written, written + 500))  # while down
                written += 500
                await anyio.sleep(1.0)  # the relay retries meanwhile
                if round_ == 1:
                    await _kill(proc)  # its cursor must not be past what was acked
                server.start()
                if round_ == 1:
                    proc = await _start_relay(dsn, table, server.url, prefix)

            async def complete(total: int = written) -> bool:
                return await stream_count(js, name) >= total

            await _wait_for(complete, "the stream to be complete", seconds=40)
            await anyio.sleep(0.5)
        finally:
            await _kill(proc)
        stored = [json.loads(m.data)["id"] for m in await stream_messages(js, name)]
        logged = [c.id for c in await cs.subscribe_from(0).take(written).collect()]
        assert sorted(stored) == sorted(logged)  # every change, each once
    finally:
        await psn.close(js)
        server.stop()


def _binary() -> str:
    from pgstreams.testing import find_nats_server

    found = find_nats_server()
    assert found is not None
    return found


# -- the source ------------------------------------------------------------------------


async def test_source_redelivers_after_ack_wait_naks_with_delay_and_dead_letters(
    js: JetStreamContext,
) -> None:
    name, prefix = unique("Q"), unique("jobs")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
    for i in range(3):
        await js.publish(f"{prefix}.work", json.dumps({"n": i}).encode())

    def source() -> ps.Stream[ps.Envelope[Any]]:
        return psn.subscribe(js, name, durable="workers", ack_wait=1.0, max_deliver=2, batch=3)

    # A consumer takes all three and dies holding them (never settles, no nak on close).
    async with source() as envelopes:
        held = [await anext(envelopes) for _ in range(3)]
    assert [e.attempts for e in held] == [1, 1, 1]

    # Redelivered after ack_wait: attempt 2, the last. n=0 is acked; n=1 nacked (its last
    # attempt: dead-lettered at once); n=2's consumer dies again holding it.
    started = anyio.current_time()
    async with source() as envelopes:
        again = [await anext(envelopes) for _ in range(3)]
        assert anyio.current_time() - started >= 0.5  # held back until ack_wait ran out
        assert sorted((e.value["n"], e.attempts) for e in again) == [(0, 2), (1, 2), (2, 2)]
        by_n = {e.value["n"]: e for e in again}
        await by_n[0].ack()
        await by_n[1].nack(error="poison")

    # Its third delivery is past max_deliver: dead-lettered, never handed to a handler.
    with anyio.move_on_after(2.5):
        async with source() as envelopes:
            async for env in envelopes:
                pytest.fail(f"delivered past max_deliver: {env!r}")

    dead = await stream_messages(js, f"{name}_DLQ")
    assert [json.loads(m.data) for m in dead] == [{"n": 1}, {"n": 2}]
    assert dead[0].headers["Pgstreams-Dead-Error"] == "poison"
    assert dead[0].headers["Pgstreams-Dead-Deliveries"] == "2"
    assert dead[1].headers["Pgstreams-Dead-Deliveries"] == "3"
    info = await js.consumer_info(name, "workers")
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_source_nack_with_delay_redelivers_later(js: JetStreamContext) -> None:
    name, prefix = unique("N"), unique("nak")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
    await js.publish(f"{prefix}.x", b'"once"')
    source = psn.subscribe(js, name, durable="d", ack_wait=30, max_deliver=5)
    async with source as envelopes:
        first = await anext(envelopes)
        await first.nack(delay=0.6)
        nacked_at = anyio.current_time()
        second = await anext(envelopes)
        assert anyio.current_time() - nacked_at >= 0.5
        assert (second.value, second.attempts) == ("once", 2)
        await second.ack()


async def test_source_extend_keeps_a_message_held_past_ack_wait(js: JetStreamContext) -> None:
    name, prefix = unique("E"), unique("slow")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
    await js.publish(f"{prefix}.x", b'"long job"')
    source = psn.subscribe(js, name, durable="slow", ack_wait=2.0, max_deliver=5, batch=1)
    async with source as envelopes:
        env = await anext(envelopes)
        with pytest.raises(ps.InvalidArgumentError, match="at most that"):
            await env.extend(5)  # refused before anything is sent
        other = await js.pull_subscribe_bind("slow", name)  # another consumer of it
        for _ in range(5):  # 4 s of work, twice ack_wait, the lease never running out
            await anyio.sleep(0.5)
            await env.extend(2.0)
            with pytest.raises(nats.errors.TimeoutError):
                await other.fetch(1, timeout=0.3)
        await env.ack()
        await other.unsubscribe()
    info = await js.consumer_info(name, "slow")
    assert (info.num_redelivered, info.num_ack_pending, info.num_pending) == (0, 0, 0)


async def test_source_redelivery_while_an_earlier_delivery_is_held(js: JetStreamContext) -> None:
    """Each delivery is its own envelope: acking the first does not settle the second."""
    name, prefix = unique("R"), unique("held")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
    await js.publish(f"{prefix}.x", b'"job"')
    async with psn.subscribe(js, name, durable="d", ack_wait=0.5, batch=1) as envelopes:
        first = await anext(envelopes)
        second = await anext(envelopes)  # redelivered after ack_wait, the first still held
        assert (second.id, second.attempts) == (first.id, 2)
        assert await first.ack()
        assert await second.ack()


async def test_dead_letters_of_two_consumers_of_one_message_are_both_kept(
    js: JetStreamContext,
) -> None:
    name, prefix = unique("D"), unique("dl")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
    await js.publish(f"{prefix}.x", b'"poison"')
    for durable in ("one", "two"):
        async with psn.subscribe(js, name, durable=durable, max_deliver=1) as envelopes:
            await (await anext(envelopes)).nack(error=f"failed in {durable}")
    dead = await stream_messages(js, f"{name}_DLQ")
    assert sorted(m.subject for m in dead) == [
        f"pgstreams.dlq.{name}.one",
        f"pgstreams.dlq.{name}.two",
    ]


async def test_envelopes_of_two_sources_get_distinct_default_ids(js: JetStreamContext) -> None:
    """The default Nats-Msg-Id names the envelope's source: two NATS streams relayed into
    one keep both messages (the same id would drop one as a duplicate, acked upstream)."""
    a, b, out = unique("A"), unique("B"), unique("C")
    pa, pb, pc = unique("a"), unique("b"), unique("c")
    for stream, subject in ((a, pa), (b, pb), (out, pc)):
        await psn.ensure_stream(js, stream, subjects=[f"{subject}.>"])
    await js.publish(f"{pa}.x", b'"from A"')
    await js.publish(f"{pb}.x", b'"from B"')
    for stream in (a, b):
        sink = psn.publish(js, subject=f"{pc}.x")
        await psn.subscribe(js, stream, durable="r").through(sink).take(1).drain()
    stored = [json.loads(m.data) for m in await stream_messages(js, out)]
    assert sorted(stored) == ["from A", "from B"]
    with pytest.raises(ps.InvalidArgumentError, match="no default Nats-Msg-Id"):
        psn.codec.default_msg_id(
            ps.Envelope(
                object(),  # type: ignore[arg-type]  # a holder naming no source
                id=1,
                value=1,
                headers={},
                attempts=1,
                enqueued_at=datetime.now(UTC),
            )
        )


async def _numbers() -> AsyncIterator[int]:
    for n in (1, 2, 3):
        yield n


async def test_a_stream_named_error_is_published_to(js: JetStreamContext) -> None:
    """A PubAck from a stream named "error" holds the text '"error"': it is still a PubAck."""
    prefix = unique("e")
    await psn.ensure_stream(js, "error", subjects=[f"{prefix}.>"])
    try:
        sink = psn.publish(js, subject=f"{prefix}.x", msg_id=str)
        assert await ps.Stream(_numbers).through(sink).collect() == [1, 2, 3]
    finally:
        await js.delete_stream("error")


# -- the outbox relay ------------------------------------------------------------------


async def test_relay_moves_an_outbox_queue_acking_only_what_was_stored(
    db: ps.Database, js: JetStreamContext
) -> None:
    name, prefix = unique("O"), unique("outbox")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
    queue: ps.PgQueue[dict[str, Any]] = await ps.PgQueue.create(db, unique("outbox_"))
    async with db.connection() as conn, conn.transaction():
        await queue.publish_batch([{"order": i} for i in range(300)], conn=conn)
    relayed = await psn.relay(queue, js, subject=f"{prefix}.orders").take(300).drain()
    assert relayed == 300
    assert (await queue.metrics()).pending == 0
    stored = await stream_messages(js, name)
    assert [json.loads(m.data)["order"] for m in stored] == list(range(300))
    assert (
        stored[0].headers["Nats-Msg-Id"]
        == f"{queue.name}:{stored[0].headers['Pgstreams-Queue-Id']}"
    )


# -- bad input -------------------------------------------------------------------------


async def test_an_unreachable_server_is_a_clear_error_naming_it() -> None:
    with pytest.raises(psn.NatsConnectError, match=r"nats://127\.0\.0\.1:9"):
        await psn.connect("nats://127.0.0.1:9", connect_timeout=1)


async def test_bad_subjects_are_refused_before_anything_is_sent(js: JetStreamContext) -> None:
    for bad in ("", "a..b", "a.*", "a b", "orders.>"):
        with pytest.raises(psn.SubjectError):
            psn.publish(js, subject=bad)
    with pytest.raises(psn.SubjectError):
        await psn.ensure_stream(js, "bad.name", subjects=["x.>"])
    with pytest.raises(psn.SubjectError):
        await psn.ensure_stream(js, unique("S"), subjects=["x.>.y"])
    with pytest.raises(ps.InvalidArgumentError):
        psn.publish(js, subject="ok", window=0)


async def test_a_subject_no_stream_takes_acks_nothing_upstream(
    db: ps.Database, js: JetStreamContext
) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    await cs.add_consumer("nowhere")
    await insert_rows(db, table, range(0, 5))
    sink = psn.publish(js, subject=f"{unique('unbound')}.x")
    with pytest.raises(psn.NatsPublishError, match="no JetStream stream takes subject"):
        await cs.subscribe(consumer="nowhere").through(sink).drain()
    assert (await cs.lag("nowhere")).changes == 5


async def test_a_payload_the_serializer_refuses_acks_nothing_upstream(
    db: ps.Database, js: JetStreamContext
) -> None:
    name, prefix, cs = await logged_for_sink(db, js, "picky", 5)

    def refuse(change: ps.Change[Any]) -> bytes:
        raise ValueError("not this one")

    sink = psn.publish(js, subject=f"{prefix}.x", serializer=refuse)
    with pytest.raises(ps.PayloadError, match="the serializer refused"):
        await cs.subscribe(consumer="picky").through(sink).drain()
    assert (await cs.lag("picky")).changes == 5
    assert await stream_count(js, name) == 0
    queue: ps.PgQueue[Any] = await ps.PgQueue.create(db, unique("q_"))
    await queue.publish({"fine": True})
    with pytest.raises(ps.PayloadError):
        await (
            queue.subscribe_ack()
            .through(psn.publish(js, subject=f"{prefix}.q", serializer=refuse))
            .drain()
        )
    # Not acked: nacked with the reason (a message that can never be sent ends dead).
    assert (await queue.metrics()).pending == 1


async def test_an_unfinished_wal_snapshot_is_not_read_ahead(
    wal_dsn: str, js: JetStreamContext
) -> None:
    """A WAL consumer's snapshot progress is saved as its rows are handed out, so the sink
    must not read one ahead: a consumer whose snapshot was interrupted is refused before
    anything is read, and with snapshot=True it goes one change at a time, losing none."""
    async with ps.connect(wal_dsn) as db:
        await db.migrate()
        table = await make_table(db)
        await insert_rows(db, table, range(1, 51))
        cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, table, capture="wal")
        first = await cs.subscribe(consumer="c", snapshot=True, chunk_size=10).take(3).collect()
        assert [(c.new or {})["id"] for c in first] == [1, 2, 3]
        name, prefix = unique("W"), unique("snap")
        await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
        with pytest.raises(ps.InvalidArgumentError, match="unfinished snapshot"):
            await cs.subscribe(consumer="c").through(psn.publish(js, subject=f"{prefix}.x")).drain()
        assert await stream_count(js, name) == 0
        sink = psn.publish(js, subject=f"{prefix}.x", msg_id=lambda c: str(c.new["id"]))
        await cs.subscribe(consumer="c", snapshot=True).take(50).through(sink).drain()
        stored = sorted(json.loads(m.data)["new"]["id"] for m in await stream_messages(js, name))
        assert stored == list(range(1, 51))  # the chunk cut short comes again, whole
        await cs.drop_consumer("c")


async def test_a_message_is_written_as_nats_py_publish_writes_it(js: JetStreamContext) -> None:
    """The sink writes messages itself (nats-py's header loop was its largest cost): what
    arrives is what ``Client.publish`` sends -- header values stripped, line breaks made
    spaces, non-ASCII kept -- and a client without the internals this takes gets the plain
    ``publish``."""
    client = js._nc
    subject = unique("direct.")
    sub = await client.subscribe(subject)
    headers = {"Pgstreams-Table": " public.t ", "X-Odd": "a\r\nb", "X-Text": "ünï 𝄞"}
    body = '{"ünï":1}'.encode()
    writer = pubacks.Publisher(client)
    assert writer._direct
    await writer._write(subject, "reply.direct", body, dict(headers))
    await client.publish(subject, body, reply="reply.publish", headers=dict(headers))
    direct, published = await sub.next_msg(timeout=5), await sub.next_msg(timeout=5)
    await sub.unsubscribe()
    assert (direct.reply, published.reply) == ("reply.direct", "reply.publish")
    assert direct.data == published.data == body
    assert direct.headers == published.headers
    assert direct.headers == {"Pgstreams-Table": "public.t", "X-Odd": "a  b", "X-Text": "ünï 𝄞"}
    assert not pubacks.writes_directly(object())  # type: ignore[arg-type]


async def test_the_sink_without_direct_writes_stores_everything(
    db: ps.Database, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pubacks, "writes_directly", lambda client: False)
    name, prefix, cs = await logged_for_sink(db, js, "plain", 300)
    sink = psn.publish(js, subject=f"{prefix}.x", window=32)
    await cs.subscribe(consumer="plain").take(300).through(sink).drain()
    assert (await pubacks.publisher(js))._direct is False  # the one the sink used
    stored = [json.loads(m.data)["new"]["id"] for m in await stream_messages(js, name)]
    assert stored == list(range(300))
    assert (await cs.lag("plain")).changes == 0


async def test_a_bad_extra_header_name_is_refused_before_sending(
    db: ps.Database, js: JetStreamContext
) -> None:
    name, prefix, cs = await logged_for_sink(db, js, "headers", 3)
    sink = psn.publish(js, subject=f"{prefix}.x", headers=lambda c: {"Bad Name": "x"})
    with pytest.raises(ps.PayloadError, match="not a valid header name"):
        await cs.subscribe(consumer="headers").through(sink).drain()
    assert await stream_count(js, name) == 0
    assert (await cs.lag("headers")).changes == 3


async def test_a_queue_header_name_nats_cannot_take_is_refused(
    db: ps.Database, js: JetStreamContext
) -> None:
    """A queue header name becomes a NATS header name: one with a line break would write
    a header of its own (here a Nats-Msg-Id, making the next message a duplicate). It is
    refused: the message is nacked with the reason, nothing is stored."""
    name, prefix = unique("I"), unique("inject")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
    queue: ps.PgQueue[Any] = await ps.PgQueue.create(db, unique("q_"))
    await queue.publish({"n": 0}, headers={"x\r\nNats-Msg-Id": "same"})
    with pytest.raises(ps.PayloadError, match="cannot be a NATS header name"):
        await psn.relay(queue, js, subject=f"{prefix}.x").take(1).drain()
    assert await stream_count(js, name) == 0
    assert (await queue.metrics()).pending == 1  # nacked, not acked


async def test_the_tail_of_a_burst_is_committed_while_the_stream_is_idle(
    db: ps.Database, js: JetStreamContext
) -> None:
    """Upstream is told within about commit_every of the last item, not only when the
    next one comes: a durable consumer's lag reaches 0 while nothing new arrives."""
    name, prefix, cs = await logged_for_sink(db, js, "idle", 50)
    sink = psn.publish(js, subject=f"{prefix}.x", commit_every=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cs.subscribe(consumer="idle").through(sink).drain)
        await _wait_for(lambda: _stored_all(js, name, 50), "the burst stored")
        await _wait_for(lambda: _caught_up(cs, "idle"), "the tail committed", seconds=5)
        tg.cancel_scope.cancel()


async def _stored_all(js: JetStreamContext, name: str, n: int) -> bool:
    return await stream_count(js, name) >= n


async def _caught_up(cs: ps.PgChangeStream[Any], consumer: str) -> bool:
    return (await cs.lag(consumer)).changes == 0


async def test_a_message_jetstream_refuses_raises_at_once(
    db: ps.Database, js: JetStreamContext
) -> None:
    """JetStream's answer for a message it will not store raises at once, naming it --
    not after retrying it as if lost -- and the envelopes read ahead go back."""
    name, prefix = unique("Z"), unique("big")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"], max_msg_size=100)
    queue: ps.PgQueue[Any] = await ps.PgQueue.create(db, unique("q_"))
    await queue.publish_batch([{"n": i} for i in range(20)])

    def body(env: ps.Envelope[Any]) -> bytes:  # message 10 is too large for the stream
        return b"x" * (500 if env.value["n"] == 10 else 10)

    sink = psn.publish(js, subject=f"{prefix}.x", serializer=body, timeout=5, retry_for=30)
    with anyio.fail_after(4), pytest.raises(psn.NatsPublishError, match="refused"):
        await queue.subscribe_ack().through(sink).drain()
    m = await queue.metrics()
    assert (m.pending, m.processing) == (10, 0)  # 0-9 stored and acked, 10-19 back
    assert await stream_count(js, name) >= 10


async def test_an_outage_past_retry_for_spends_no_attempt(db: ps.Database, tmp_path: Path) -> None:
    """NATS away past retry_for: NatsPublishError, and the queue message is not nacked --
    with max_attempts=1 a nack would have sent a healthy message to the dead set."""
    server = NatsServer(_binary(), str(tmp_path))
    server.start()
    js = await psn.connect(server.url)
    try:
        name, prefix = unique("O"), unique("out")
        await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
        queue: ps.PgQueue[Any] = await ps.PgQueue.create(db, unique("q_"), max_attempts=1)
        await queue.publish({"fine": True})
        server.stop(signal.SIGKILL)
        with anyio.fail_after(30), pytest.raises(psn.NatsPublishError):
            await psn.relay(queue, js, subject=f"{prefix}.x", retry_for=1.0).drain()
        m = await queue.metrics()
        assert (m.pending, m.dead) == (1, 0)
    finally:
        await psn.close(js)
        server.stop()


async def test_wal_durable_consumer_through_the_sink(
    wal_db: ps.Database, js: JetStreamContext
) -> None:
    table = await make_table(wal_db)
    name, prefix = unique("W"), unique("wal")
    await psn.ensure_stream(js, name, subjects=[f"{prefix}.>"])
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(wal_db, table, capture="wal")
    await cs.add_consumer("to_nats")
    await insert_rows(wal_db, table, range(0, 200))
    sink = psn.publish(js, subject=lambda c: f"{prefix}.{c.op}")
    assert await cs.subscribe(consumer="to_nats").take(200).through(sink).drain() == 200
    stored = await stream_messages(js, name)
    assert [json.loads(m.data)["new"]["id"] for m in stored] == list(range(200))
    assert all(m.headers["Pgstreams-Lsn"] for m in stored)
    await cs.drop_consumer("to_nats")


@pytest.mark.parametrize("capture", ["trigger", "wal"])
async def test_deferred_commits_resume_after_the_last_committed_change(
    capture: str, dsn: str, wal_dsn: str
) -> None:
    """What the sink relies on: with commits deferred, reading ahead commits nothing; a
    stream closed after committing its 5th change resumes at the 6th."""
    async with ps.connect(wal_dsn if capture == "wal" else dsn) as db:
        await db.migrate()
        table = await make_table(db)
        cs = await durable(db, table, capture, "ahead")
        for i in range(10):  # ten transactions
            await insert_rows(db, table, range(i, i + 1))
        deferring = cs.subscribe(consumer="ahead")._deferring()
        assert deferring is not None
        free, checkpoint = deferring
        async with free:
            read = [await anext(free) for _ in range(8)]
            await checkpoint.commit(read[4])
        again = await cs.subscribe(consumer="ahead").take(5).collect()
        rows = [(c.new or {})["id"] for c in again]
        assert rows == [5, 6, 7, 8, 9]
        if capture == "wal":
            await cs.drop_consumer("ahead")
