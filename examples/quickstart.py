"""Quickstart: a throwaway PostgreSQL, a queue, a publisher and an acking consumer.

Run: python examples/quickstart.py   (no server needed: it starts an embedded one)
"""

from __future__ import annotations

import anyio

import pgstreams as ps


async def main() -> None:
    async with ps.embedded() as db:
        jobs = await ps.PgQueue.create(db, "emails", max_attempts=3)
        await jobs.publish_batch(
            [{"to": f"user{i}@example.com", "template": "welcome"} for i in range(5)]
        )
        await jobs.publish({"to": "vip@example.com"}, headers={"x-priority": "high"})

        async def send(env: ps.Envelope[dict[str, str]]) -> None:
            print(f"sending to {env.value['to']:<20} attempt {env.attempts} {env.headers}")
            await env.ack()

        handled = await jobs.subscribe_ack(visibility=30).take(6).for_each(send)
        print(f"handled {handled} messages; {await jobs.metrics()}")


if __name__ == "__main__":
    anyio.run(main)
