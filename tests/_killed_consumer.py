"""A consumer process for the kill test: leases a batch, acks part of it, then hangs."""

from __future__ import annotations

import sys

import anyio

import pgstreams as ps


async def main(dsn: str, queue: str, ack: int) -> None:
    async with ps.connect(dsn) as db:
        q: ps.PgQueue[int] = ps.PgQueue(db, queue)
        async with q.subscribe_ack(visibility=2, prefetch=10) as envelopes:
            handled = 0
            async for env in envelopes:
                if handled < ack:
                    await env.ack()
                handled += 1
                print(env.value, flush=True)
                if handled == 10:
                    print("ready", flush=True)
                    await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
