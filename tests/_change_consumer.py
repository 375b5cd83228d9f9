"""A durable change consumer for the kill test: prints each change id it is handed, and
after ``hold`` of them keeps the last one unfinished until it is killed. A fifth argument
"wal" makes it a WAL-capture consumer (printing each row's ``id`` column instead)."""

from __future__ import annotations

import sys

import anyio

import pgstreams as ps


async def main(dsn: str, table: str, consumer: str, hold: int, capture: str) -> None:
    async with ps.connect(dsn) as db:
        if capture == "wal":
            cs: ps.PgChangeStream[dict[str, int]] = ps.PgChangeStream(db, table, capture="wal")
            stream = cs.subscribe(consumer=consumer)
        else:
            cs = ps.PgChangeStream(db, table)
            stream = cs.subscribe(consumer=consumer, poll_interval=0.1, page_size=7)
        async with stream:
            handed = 0
            async for change in stream:
                handed += 1
                wal_id = change.new["id"] if capture == "wal" and change.new else None
                print(change.id if wal_id is None else wal_id, flush=True)
                if handed == hold:
                    print("ready", flush=True)
                    await anyio.sleep_forever()


if __name__ == "__main__":
    capture = sys.argv[5] if len(sys.argv) > 5 else "statement"
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), capture)
