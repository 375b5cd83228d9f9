"""A consumer process for the kill tests: leases a batch, acks part of it, then hangs.

Arguments: DSN, queue name, how many to ack, and "pgqueue" (default), "pgmq" or
"pgqueue-auto" (PgQueue's auto-ack subscription, 4 messages a read: nothing to ack).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import anyio

import pgstreams as ps


async def run_and_kill(dsn: str, queue: str, ack: int, kind: str = "pgqueue") -> list[int]:
    """Run this script as a child process until it holds its batch, SIGKILL it, and
    return the values it saw."""
    return await kill_when_ready(Path(__file__), dsn, queue, str(ack), kind)


async def kill_when_ready(script: Path, *args: str) -> list[int]:
    """Run ``script`` until it prints "ready", SIGKILL it, return the numbers it printed."""
    proc = await anyio.open_process(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[1],
    )
    output = b""
    try:
        assert proc.stdout is not None
        with anyio.fail_after(30):
            async for chunk in proc.stdout:
                output += chunk
                if b"ready" in output:
                    break
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return [int(x) for x in output.split()[:-1]]


async def main(dsn: str, queue: str, ack: int, kind: str) -> None:
    async with ps.connect(dsn) as db:
        if kind == "pgqueue-auto":
            auto = ps.PgQueue[int](db, queue).subscribe(visibility=2, prefetch=4)
            async with auto as values:
                handled = 0
                async for value in values:
                    handled += 1
                    print(value, flush=True)
                    if handled == 10:
                        print("ready", flush=True)
                        await anyio.sleep_forever()
            return
        if kind == "pgmq":
            mode = ps.ReadMode.standard(vt=2, qty=10)
            stream = ps.PgmqQueue[int](db, queue).subscribe_ack(read_mode=mode)
        else:
            stream = ps.PgQueue[int](db, queue).subscribe_ack(visibility=2, prefetch=10)
        async with stream as envelopes:
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
    kind = sys.argv[4] if len(sys.argv) > 4 else "pgqueue"
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), kind)
