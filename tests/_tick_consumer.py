"""A tick consumer for the kill tests: prints the id of the tick it holds, then hangs.

Arguments: DSN, schedule id, and "running" (default: the process also takes part in leader
election and renews its leases) or "consumer" (it only streams ticks).
"""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack

import anyio

import pgstreams as ps


async def main(dsn: str, schedule_id: str, mode: str) -> None:
    async with ps.connect(dsn) as db, AsyncExitStack() as stack:
        sched = ps.Scheduler(db, lease=1.0)
        if mode == "running":
            await stack.enter_async_context(sched.running())
        async with sched.stream(schedule_id) as ticks:
            async for tick in ticks:
                print(tick.id, flush=True)
                print("ready", flush=True)
                await anyio.sleep(60)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "running")
