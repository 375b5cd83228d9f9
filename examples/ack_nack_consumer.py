"""A manual ack/nack consumer: settle each message yourself, retry the ones that fail,
hold a slow one's lease, and look at what ended in the dead set.

Run: python examples/ack_nack_consumer.py   (no server needed: it starts an embedded one)
"""

from __future__ import annotations

from typing import Any

import anyio

import pgstreams as ps

tries: dict[str, int] = {}


async def charge(payment: dict[str, Any]) -> None:
    """A payment provider that is sometimes busy, and refuses one card every time."""
    key = payment["id"]
    tries[key] = tries.get(key, 0) + 1
    if payment["card"] == "expired":
        raise ValueError("card expired")
    if key == "p2" and tries[key] == 1:
        raise ConnectionError("provider busy")
    await anyio.sleep(0.01)


async def main() -> None:
    async with ps.embedded() as db:
        payments: ps.PgQueue[dict[str, Any]] = await ps.PgQueue.create(
            db, "payments", max_attempts=3
        )
        await payments.publish_batch(
            [
                {"id": "p1", "card": "visa"},
                {"id": "p2", "card": "visa"},  # fails once, then goes through
                {"id": "p3", "card": "expired"},  # fails every time: ends dead
                {"id": "p4", "card": "slow-visa"},
            ]
        )

        async def handle(env: ps.Envelope[dict[str, Any]]) -> None:
            payment = env.value
            if payment["card"] == "slow-visa":
                await env.extend(60)  # longer work: keep the lease so nobody else takes it
            try:
                await charge(payment)
            except Exception as exc:
                print(f"{payment['id']}: attempt {env.attempts} failed ({exc}), nack")
                await env.nack(delay=0.1, error=str(exc))  # visible again in 0.1 s
            else:
                print(f"{payment['id']}: attempt {env.attempts} charged, ack")
                await env.ack()

        # p1, p4 and p2 once; p2 again; p3 three times (max_attempts), then it is dead.
        await payments.subscribe_ack(visibility=30).take(7).for_each(handle)

        metrics = await payments.metrics()
        print(f"pending {metrics.pending}, completed {metrics.completed}, dead {metrics.dead}")
        for dead in await payments.dead_letters():
            print(f"dead: {dead.value} after {dead.attempts} attempts: {dead.last_error}")
        print(f"requeued {await payments.requeue_dead()} dead message(s) for another try")


if __name__ == "__main__":
    anyio.run(main)
