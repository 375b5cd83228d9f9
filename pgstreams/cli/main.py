"""``pgstreams``: look at and operate what the library keeps in a database.

Connection: ``--dsn``, else ``$PGSTREAMS_DSN``, else libpq's ``PG*`` variables. Read
commands (``status``, ``queue list|stats|peek``, ``consumers list``, ``tail``) write
nothing. Exit codes: 0 ok, 1 failure (the server, the connection), 2 usage (bad
arguments, an unknown name). Errors are one line on stderr; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence

import anyio
import psycopg

from .._core.errors import DatabaseError, InvalidArgumentError, PgStreamsError
from .._pg.database import Database, connect
from . import changes, demo, inspect, operate, queues, worker
from .output import UsageError

__all__ = ["main"]

OK, FAILURE, USAGE = 0, 1, 2

Command = Callable[[Database, argparse.Namespace], Awaitable[int]]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="pgstreams", description="Look at and operate pgstreams in a PostgreSQL database."
    )
    top.add_argument("--dsn", help="connection string (default: $PGSTREAMS_DSN, else PG* vars)")
    top.add_argument("--schema", default="pgstreams", help="the library's schema (pgstreams)")
    top.add_argument("--json", action="store_true", help="machine-readable output")
    top.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    top.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="every part, on an embedded PostgreSQL (~20 s)")
    demo.add_argument("--keep", action="store_true", help="leave the server running after")
    demo.add_argument(
        "--pace",
        type=float,
        help="seconds between parts (2.5 on a terminal, else 0)",
    )
    commands.add_parser("migrate", help="install or upgrade the library's tables")
    commands.add_parser("status", help="schema version and one table per source")

    tail = commands.add_parser("tail", help="print a table's changes as they commit")
    tail.add_argument("table")
    tail.add_argument("--capture", choices=("trigger", "wal"), default="trigger")
    tail.add_argument("--since", help="replay from a time first: ISO 8601, or 30s/5m/2h/1d ago")
    tail.add_argument("--op", help="only these operations, comma-separated")

    queue = _actions(commands, "queue", "PgQueue and pgmq queues", "every queue")
    for name, text in (
        ("stats", "a queue's counts"),
        ("requeue-dead", "make dead messages deliverable again"),
        ("purge", "delete every message"),
        ("peek", "the next messages, without taking them"),
    ):
        action = queue.add_parser(name, help=text)
        action.add_argument("name")
        if name == "peek":
            action.add_argument("-n", type=int, default=10, help="how many (10)")
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="do not ask")

    consumers = _actions(
        commands, "consumers", "durable change consumers", "every durable consumer and WAL slot"
    )
    drop = consumers.add_parser("drop", help="forget a consumer (WAL: drop its slot)")
    drop.add_argument("name")
    drop.add_argument("--table", required=True, help="the stream's table(s), comma-separated")
    drop.add_argument("--capture", choices=("trigger", "wal"), default="trigger")

    sched = _actions(commands, "schedules", "cron and interval schedules", "every schedule")
    for name, text in (
        ("pause", "stop firing"),
        ("resume", "fire again"),
        ("trigger", "fire once now"),
        ("next", "the next fire times"),
        ("backfill", "ticks for the past fire times between --start and --end"),
    ):
        action = sched.add_parser(name, help=text)
        action.add_argument("id")
        if name == "next":
            action.add_argument("-n", type=int, default=5, help="how many (5)")
        if name == "backfill":
            action.add_argument(
                "--start", required=True, help="ISO 8601, or 30s/5m/2h/1d ago (inclusive)"
            )
            action.add_argument("--end", help="the same; inclusive (default: now)")

    flows = commands.add_parser("workflows", help="durable workflow runs")
    flows.add_argument("--prefix", default="wf_", help="the storage's table prefix (wf_)")
    runs = flows.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = runs.add_parser("list", help="recent runs")
    listing.add_argument(
        "--status", choices=("queued", "running", "completed", "failed", "cancelled")
    )
    listing.add_argument("--limit", type=int, default=20, help="how many (20)")
    for name, text in (
        ("show", "a run and its step history"),
        ("cancel", "ask a run to stop"),
        ("retry", "queue a failed or cancelled run again (finished steps are kept)"),
    ):
        runs.add_parser(name, help=text).add_argument("id")

    work = commands.add_parser("worker", help="run a workflow worker until SIGTERM/SIGINT")
    work.add_argument("target", help="MODULE:OBJECT, a WorkflowEngine or a callable making one")
    work.add_argument("--concurrency", type=int, default=1, help="runs at a time (1)")
    work.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds runs in flight get to finish on SIGTERM/SIGINT before they are"
        " handed back (30)",
    )
    return top


def _actions(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    text: str,
    listing: str,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command made of actions, ``list`` first."""
    actions = commands.add_parser(name, help=text).add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    actions.add_parser("list", help=listing)
    return actions


COMMANDS: dict[str, Command] = {
    "migrate": inspect.migrate,
    "status": inspect.status,
    "tail": changes.tail,
    "queue": queues.run,
    "consumers": changes.consumers,
    "schedules": operate.schedules,
    "workflows": operate.workflows,
    "worker": worker.worker,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("psycopg").setLevel(logging.ERROR)
    try:
        return anyio.run(_run, args)
    except KeyboardInterrupt:
        return OK
    except (UsageError, InvalidArgumentError) as exc:
        return _fail(args, exc, USAGE)
    except (PgStreamsError, psycopg.Error, OSError) as exc:
        return _fail(args, exc, FAILURE)


async def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return await _until_signal(lambda: demo.demo(args))
    dsn = args.dsn or os.environ.get("PGSTREAMS_DSN") or ""
    try:
        db = await connect(dsn, schema=args.schema, min_size=1, max_size=4, timeout=10.0)
    except (DatabaseError, psycopg.Error) as exc:
        raise DatabaseError(
            f"cannot connect ({_first_line(exc)}): check --dsn, $PGSTREAMS_DSN or the PG*"
            " variables, and that the server is running"
        ) from exc
    async with db:
        if args.command == "worker":  # its own signal handling: a graceful stop
            return await worker.worker(db, args)
        return await _until_signal(lambda: COMMANDS[args.command](db, args))


async def _until_signal(command: Callable[[], Awaitable[int]]) -> int:
    """``command()``'s exit code; Ctrl-C or a SIGTERM ends it cleanly (exit 0), even where
    the shell started it with SIGINT ignored."""
    result = OK
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            nonlocal result, failure
            try:
                result = await command()
            except Exception as exc:  # raised as itself below, not in an ExceptionGroup
                failure = exc
            tg.cancel_scope.cancel()

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(run)
        tg.start_soon(stop_on_signal)
    if failure is not None:
        raise failure
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fail(args: argparse.Namespace, exc: BaseException, code: int) -> int:
    if args.verbose:
        traceback.print_exception(exc)
    print(f"pgstreams: {_first_line(exc)}", file=sys.stderr)
    return code
