"""A workflow worker for the kill test: runs "effects" into its second step, says "ready"
and hangs there until it is killed.

Arguments: DSN.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import psycopg

import pgstreams as ps

effects = ps.Workflow[dict[str, Any], int]("effects")


async def effect(dsn: str, step: str) -> str:
    """A side effect the test can count across processes."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("INSERT INTO effects VALUES ('killed-1', %s)", [step])
    if step == "two" and os.environ.get("PGSTREAMS_HANG_IN_TWO"):
        print("ready", flush=True)
        await anyio.sleep_forever()
    return step


@effects.run
async def _effects(ctx: ps.WorkflowContext, input: dict[str, Any]) -> int:
    done: list[str] = [await ctx.step(s, effect, input["dsn"], s) for s in ("one", "two", "three")]
    return len(done)


async def main(dsn: str) -> None:
    os.environ["PGSTREAMS_HANG_IN_TWO"] = "1"
    async with ps.connect(dsn) as db:
        storage = ps.PgWorkflowStorage(db, table_prefix="killed_")
        engine = ps.WorkflowEngine(storage=storage, workflows=[effects], lease=1.0)
        async with engine.worker():
            await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
