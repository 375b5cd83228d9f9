"""Changes from the write-ahead log: two tables in one stream, no triggers, a durable
consumer that starts with a snapshot of the existing rows and resumes where it stopped.

Run: python examples/wal_changes.py   (no server needed: the embedded one has
wal_level=logical)
"""

from __future__ import annotations

from typing import Any

import anyio

import pgstreams as ps


async def main() -> None:
    async with ps.embedded() as db:
        async with db.connection() as conn:
            await conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
            await conn.execute(
                "CREATE TABLE orders (id int PRIMARY KEY, user_id int, total numeric)"
            )
            await conn.execute("INSERT INTO users VALUES (1, 'ada@example.com')")
        changes: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(
            db, ["users", "orders"], capture="wal"
        )

        # First run: the existing row (op="snapshot"), then what is written meanwhile.
        async def write() -> None:
            async with db.connection() as conn:
                await conn.execute("INSERT INTO users VALUES (2, 'bob@example.com')")
                async with conn.transaction():  # one transaction: one commit LSN
                    await conn.execute("INSERT INTO orders VALUES (10, 2, 25.50)")
                    await conn.execute("UPDATE users SET email = 'bob@example.org' WHERE id = 2")
            await changes.notify({"batch": "done"})  # delivered in commit order

        async with anyio.create_task_group() as tg:
            stream = changes.subscribe(consumer="indexer", snapshot=True)
            async with stream:
                async for change in stream:
                    print(f"{change.lsn} {change.op:<8} {change.table:<13} {change.new}")
                    if change.op == "snapshot" and change.new == {
                        "id": 1,
                        "email": "ada@example.com",
                    }:
                        tg.start_soon(write)  # the slot exists: nothing written is missed
                    if change.op == "notify":
                        break

        # The consumer stopped; writes go on; the next run starts where it left off.
        async with db.connection() as conn:
            await conn.execute("DELETE FROM orders WHERE id = 10")
        (deleted,) = await changes.subscribe(consumer="indexer").take(1).collect()
        print(f"run 2: {deleted.op} {deleted.table} old={deleted.old}")

        for info in await changes.consumers():
            print(
                f"consumer {info.name}: slot {info.slot}, confirmed {info.confirmed_lsn},"
                f" retains {info.retained_bytes} bytes of WAL ({info.wal_status})"
            )
        await changes.drop_consumer("indexer")  # drops its replication slot


if __name__ == "__main__":
    anyio.run(main)
