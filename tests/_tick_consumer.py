"""A tick consumer for the kill test: prints the id of the tick it holds, then hangs.

Arguments: DSN, schedule id.
"""

from __future__ import annotations

import sys

import anyio

import pgstreams as ps


async def main(dsn: str, schedule_id: str) -> None:
    async with ps.connect(dsn) as db:
        sched = ps.Scheduler(db, lease=1.0)
        async with sched.running(), sched.stream(schedule_id) as ticks:
            async for tick in ticks:
                print(tick.id, flush=True)
                print("ready", flush=True)
                await anyio.sleep(60)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
