"""``pgstreams demo``: every part of the library in about 20 seconds, on an embedded
PostgreSQL (no server needed). ``--keep`` leaves the server running afterwards and prints
its DSN for the other commands.

On a terminal it pauses ``--pace`` seconds (2.5) between parts, so there is time to read;
into a pipe or a file it runs straight through (about 3 s)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio

from .._core.envelope import Envelope
from .._core.stream import Stream
from .._pg.database import Database, embedded
from .._sources.changes.stream import Change, PgChangeStream
from .._sources.pgmq.queue import PgmqQueue
from .._sources.queue.queue import PgQueue
from .._sources.scheduler.scheduler import Scheduler
from .._workflows.engine import WorkflowEngine
from .._workflows.trigger import trigger
from .._workflows.workflow import Workflow, WorkflowContext
from .output import UsageError

__all__ = ["demo"]


def say(title: str, line: str = "") -> None:
    print(f"{title:<10} {line}" if line else f"\n== {title}", flush=True)


async def demo(args: argparse.Namespace) -> int:
    if args.pace is not None and not args.pace >= 0:
        raise UsageError(f"--pace must be 0 or more seconds, got {args.pace}")
    async with embedded() as db:
        say("PostgreSQL 17, embedded, wal_level=logical")
        await db.migrate()
        pace = args.pace if args.pace is not None else (2.5 if sys.stdout.isatty() else 0.0)
        for part in (_queue, _pgmq, _changes, _schedule, _workflow):
            await anyio.sleep(pace)
            await part(db)
        say("done")
        if args.keep:
            print(f"\nthe server keeps running: export PGSTREAMS_DSN='{db.dsn}'", flush=True)
            print("then try `pgstreams status`; Ctrl-C stops it", flush=True)
            await anyio.sleep_forever()
    return 0


async def _queue(db: Database) -> None:
    say("PgQueue: manual ack and nack, a dead letter")
    jobs: PgQueue[dict[str, Any]] = await PgQueue.create(db, "demo_emails", max_attempts=2)
    await jobs.publish_batch([{"to": f"user{i}@example.com"} for i in range(3)])

    async def handle(env: Envelope[dict[str, Any]]) -> None:
        if env.value["to"].startswith("user1"):
            say("queue", f"nack {env.value['to']} (attempt {env.attempts}): mailbox full")
            await env.nack(error="mailbox full")
        else:
            say("queue", f"ack  {env.value['to']}")
            await env.ack()

    await jobs.subscribe_ack(visibility=30).take(4).for_each(handle)
    dead = await jobs.dead_letters()
    say("queue", f"dead letters: {[d.value['to'] for d in dead]}; {await jobs.metrics()}")


async def _pgmq(db: Database) -> None:
    say("PgmqQueue: the pgmq extension, installed as plain SQL")
    orders: PgmqQueue[dict[str, Any]] = await PgmqQueue.create(db, "demo_orders")
    await orders.publish({"order": 42, "total": 19.9})
    first = await orders.subscribe_ack().first()
    say("pgmq", f"read {first.value}, attempt {first.attempts}")
    await first.ack()
    say("pgmq", f"{await orders.metrics()}")


async def _changes(db: Database) -> None:
    say("PgChangeStream: table changes, by trigger and from the WAL")
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE demo_users (id int PRIMARY KEY, email text)")
    by_trigger: PgChangeStream[dict[str, Any]] = PgChangeStream(db, "demo_users")
    await by_trigger.install_trigger()
    from_wal: PgChangeStream[dict[str, Any]] = PgChangeStream(db, "demo_users", capture="wal")
    await from_wal.add_consumer("demo")
    await by_trigger.add_consumer("demo")
    async with db.connection() as conn:
        await conn.execute("INSERT INTO demo_users VALUES (1, 'ada@example.com')")
        await conn.execute("UPDATE demo_users SET email = 'ada@example.org' WHERE id = 1")
        await conn.execute("DELETE FROM demo_users WHERE id = 1")
    for label, stream in (
        ("trigger", by_trigger.subscribe(consumer="demo")),
        ("wal", from_wal.subscribe(consumer="demo")),
    ):
        for change in await stream.take(3).collect():
            say(label, _line(change))
    await from_wal.drop_consumer("demo")


def _line(change: Change[Any]) -> str:
    return f"{change.op:<7} new={change.new} old={change.old}"


async def _schedule(db: Database) -> None:
    say("Scheduler: durable ticks with leader election")
    sched = Scheduler(db)
    await sched.register("demo_heartbeat", interval=1)
    async with sched.running():
        tick = await sched.stream("demo_heartbeat").first()
    say("schedule", f"tick of {tick.schedule_id} at {tick.scheduled_at:%H:%M:%S}")
    await sched.unregister("demo_heartbeat")


async def _workflow(db: Database) -> None:
    say("Workflows: a change starts a run; a worker crashes mid-run; another resumes it")
    executed: dict[str, int] = {}
    crash = anyio.Event()
    onboard: Workflow[dict[str, Any], str] = Workflow("demo_onboard")

    async def step(name: str, user: dict[str, Any]) -> str:
        executed[name] = executed.get(name, 0) + 1
        if name == "welcome" and executed[name] == 1:
            crash.set()  # the first worker dies here
            await anyio.sleep_forever()
        return f"{name} {user['email']}"

    @onboard.run
    async def _(ctx: WorkflowContext, user: dict[str, Any]) -> str:
        await ctx.step("profile", step, "profile", user)
        return await ctx.step("welcome", step, "welcome", user)

    engine = WorkflowEngine(db, workflows=[onboard])
    signups: PgChangeStream[dict[str, Any]] = PgChangeStream(db, "demo_users")
    async with db.connection() as conn:
        await conn.execute("INSERT INTO demo_users VALUES (2, 'bob@example.com')")
    started: Stream[Any] = (
        signups.subscribe_from(0)
        .filter(lambda c: c.op == "insert" and c.new is not None and c.new["id"] == 2)
        .take(1)
        .through(
            trigger(
                workflow=onboard,
                engine=engine,
                to_input=lambda c: c.new,
                to_workflow_id=lambda c: f"onboard-{c.new['id']}",
            )
        )
    )
    await started.drain()
    run = engine.handle("onboard-2")
    async with anyio.create_task_group() as tg:

        async def first_worker() -> None:
            async with engine.worker():
                await anyio.sleep_forever()

        tg.start_soon(first_worker)
        await crash.wait()
        say("workflow", "worker 1 crashed inside step 'welcome' (its run is handed back)")
        tg.cancel_scope.cancel()
    async with engine.worker():
        result = await run.result()
    say("workflow", f"worker 2 finished it: {result!r}; steps executed: {executed}")
