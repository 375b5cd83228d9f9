"""A durable change consumer for the kill test: prints each change id it is handed, and
after ``hold`` of them keeps the last one unfinished until it is killed."""

from __future__ import annotations

import sys

import anyio

import pgstreams as ps


async def main(dsn: str, table: str, consumer: str, hold: int) -> None:
    async with ps.connect(dsn) as db:
        cs: ps.PgChangeStream[dict[str, int]] = ps.PgChangeStream(db, table)
        async with cs.subscribe(consumer=consumer, poll_interval=0.1, page_size=7) as stream:
            handed = 0
            async for change in stream:
                handed += 1
                print(change.id, flush=True)
                if handed == hold:
                    print("ready", flush=True)
                    await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
