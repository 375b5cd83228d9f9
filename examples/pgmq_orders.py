"""pgmq queues: install pgmq on demand, consume with leases, dead-letter a poison message.

Run: python examples/pgmq_orders.py   (no server needed: it starts an embedded one)
"""

from __future__ import annotations

from typing import Any

import anyio

import pgstreams as ps


async def main() -> None:
    async with ps.embedded() as db:
        orders = await ps.PgmqQueue.create(db, "orders", max_attempts=2)  # installs pgmq
        await orders.enable_notify()  # idle consumers wake on insert instead of polling
        await orders.publish_batch([{"order_id": f"o{i}", "total": 10 * i} for i in range(1, 4)])
        await orders.publish({"order_id": "broken"}, headers={"source": "import"})

        async def handle(env: ps.Envelope[dict[str, Any]]) -> None:
            if env.value["order_id"] == "broken":
                print(f"failing {env.value} (attempt {env.attempts})")
                await env.nack(error="missing total")
            else:
                print(f"charging {env.value['order_id']}: {env.value['total']}")
                await env.ack()

        mode = ps.ReadMode.standard(vt=30, qty=10)
        await orders.subscribe_ack(read_mode=mode, ack_mode="archive").take(5).for_each(handle)
        # The next read finds the broken order past max_attempts and moves it to orders_dlq.
        async with orders.subscribe_ack(read_mode=mode, poll_interval=0.1) as stream:
            with anyio.move_on_after(0.5):
                async for env in stream:
                    print("unexpected", env)
        print(await orders.metrics())
        for dead in await orders.dead_letters():
            print(f"dead: {dead.value} after {dead.attempts} attempts: {dead.last_error}")
        print("queues:", await ps.PgmqQueue.list(db))


if __name__ == "__main__":
    anyio.run(main)
