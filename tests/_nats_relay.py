"""A change relay process for the NATS kill tests: a durable consumer's changes of a table
into JetStream through ``psn.publish``, for ever.

Arguments: DSN, table, consumer name, NATS URL, subject prefix, capture (trigger or wal).
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

import pgstreams as ps
from pgstreams import nats as psn


async def main(dsn: str, table: str, consumer: str, url: str, prefix: str, capture: str) -> None:
    async with ps.connect(dsn) as db:
        js = await psn.connect(url)
        changes: ps.PgChangeStream[Any] = ps.PgChangeStream(
            db, table, capture="wal" if capture == "wal" else "statement"
        )
        sink = psn.publish(js, subject=lambda c: f"{prefix}.{c.op}", window=64, retry_for=120)
        print("ready", flush=True)
        await changes.subscribe(consumer=consumer).through(sink).drain()


if __name__ == "__main__":
    dsn, table, consumer, url, prefix, capture = sys.argv[1:7]
    anyio.run(main, dsn, table, consumer, url, prefix, capture)
