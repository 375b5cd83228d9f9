"""Durable schedules as a stream: interval and cron ticks, a manual run and a backfill.

Run: python examples/scheduled_jobs.py   (no server needed: it starts an embedded one)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio

import pgstreams as ps


async def main() -> None:
    async with ps.embedded() as db:
        sched = ps.Scheduler(db, poll_interval=0.2)
        await sched.register("heartbeat", interval=0.5, metadata={"kind": "ping"})
        await sched.register(
            "nightly-report", cron="30 2 * * *", timezone="Europe/Berlin", overlap="skip"
        )
        print("nightly-report fires next at", await sched.next_fire_times("nightly-report", 2))

        # Last three nights' reports, as ticks on the same stream (catch_up, manual).
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        await sched.backfill("nightly-report", start=today - timedelta(days=3), end=today)
        # Consuming needs no leader: any process streams the ticks that are in the table.
        async for tick in sched.stream("nightly-report").take(3):
            print(f"report for {tick.scheduled_at:%Y-%m-%d %H:%M} UTC catch_up={tick.catch_up}")

        async with sched.running():  # leader election: the leader turns fire times into ticks
            async for tick in sched.stream("heartbeat").take(3):
                print(f"heartbeat at {tick.scheduled_at:%H:%M:%S.%f} {tick.metadata}")
            await sched.trigger_now("nightly-report")  # run it now, outside its schedule
            tick = await sched.stream("nightly-report").first()
            print("manual tick:", tick.manual, "leader here:", sched.is_leader)

        await sched.unregister("heartbeat")  # its ticks stay in history() ...
        print("heartbeat ticks kept:", len(await sched.history("heartbeat")))
        await sched.unregister("nightly-report", keep_history=False)  # ... unless asked
        print("nightly-report ticks kept:", len(await sched.history("nightly-report")))


if __name__ == "__main__":
    anyio.run(main)
