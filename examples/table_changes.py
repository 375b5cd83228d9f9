"""Table changes as a stream: capture a table, follow it live, resume a durable consumer.

Run: python examples/table_changes.py   (no server needed: it starts an embedded one)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import anyio

import pgstreams as ps


async def main() -> None:
    async with ps.embedded() as db:
        async with db.connection() as conn:
            await conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text, plan text)")
        users: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(db, "users")
        await users.install_trigger()
        await users.add_consumer("search-indexer")  # durable position: from now on

        async def write() -> None:
            async with db.connection() as conn:
                await conn.execute(
                    "INSERT INTO users VALUES (1, 'ada@example.com', 'free'),"
                    " (2, 'bob@example.com', 'free')"
                )
                await conn.execute("UPDATE users SET plan = 'pro' WHERE id = 1")
                await conn.execute("DELETE FROM users WHERE id = 2")
            await users.notify({"reindex": "all"})

        # subscribe() follows changes from the moment it starts; subscribe_from(t) also
        # replays the log from t first, so here nothing written after t can be missed.
        async with db.connection() as conn:
            cur = await conn.execute("SELECT statement_timestamp()")
            row = await cur.fetchone()
            assert row is not None
            start: datetime = row[0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            async for change in users.subscribe_from(start).take(5):
                print(f"#{change.id} {change.op:<6} old={change.old} new={change.new}")

        # The indexer was not running: it picks up everything since it was registered,
        # and resumes after the last change it finished with.
        first = await users.subscribe(consumer="search-indexer").take(2).collect()
        print("indexer, run 1:", [f"{c.op} {c.pk}" for c in first])
        rest = await users.subscribe(consumer="search-indexer").take(3).collect()
        print("indexer, run 2:", [f"{c.op} {c.pk or c.new}" for c in rest])
        print(await users.lag("search-indexer"))


if __name__ == "__main__":
    anyio.run(main)
