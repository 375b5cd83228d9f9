"""Plumbing shared by the benchmarks in this folder: which server, a throwaway database,
interleaved timing rounds and a markdown table.

Benchmarks are scripts (``python benchmarks/NAME.py``) that import this module as
``benchmarks._common`` after putting the repository root first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

DSN_ENV = "PGSTREAMS_BENCH_DSN"


# -- server and database -------------------------------------------------------------------


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """``--dsn`` and ``--embedded`` (mutually exclusive)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--dsn",
        help=f"an existing server to use (default: ${DSN_ENV}, else an embedded server)",
    )
    group.add_argument(
        "--embedded",
        action="store_true",
        help=f"start a throwaway embedded server even if ${DSN_ENV} is set",
    )


@dataclass(frozen=True, slots=True)
class Server:
    dsn: str
    """Admin DSN: a role allowed to CREATE and DROP DATABASE."""
    label: str
    """Where it came from, for the report."""


@asynccontextmanager
async def server(dsn: str | None, *, embedded: bool) -> AsyncIterator[Server]:
    """The server to benchmark: ``dsn``, else $PGSTREAMS_BENCH_DSN, else an embedded one."""
    if not embedded:
        chosen = dsn or os.environ.get(DSN_ENV)
        if chosen:
            yield Server(chosen, _where(chosen))
            return
    from pgstreams._pg.embedded import EmbeddedPostgres

    async with EmbeddedPostgres() as pg:
        yield Server(pg.dsn, "embedded server")


def _where(dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    host = params.get("host") or params.get("hostaddr") or "local socket"
    port = params.get("port")
    return f"{host}:{port}" if port else str(host)


@asynccontextmanager
async def fresh_database(admin_dsn: str, prefix: str) -> AsyncIterator[str]:
    """Create a uniquely named database, yield a DSN for it, and drop it afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    ident = sql.Identifier(name)
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    try:
        yield make_conninfo(admin_dsn, dbname=name)
    finally:
        with anyio.CancelScope(shield=True):
            async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
                # FORCE (PostgreSQL 13+) ends sessions a failed run may have left behind.
                force = admin.info.server_version >= 130000
                drop = "DROP DATABASE IF EXISTS {} WITH (FORCE)" if force else "DROP DATABASE {}"
                await admin.execute(sql.SQL(drop).format(ident))


async def server_facts(dsn: str) -> str:
    """``PostgreSQL 15.4, fsync=on, synchronous_commit=on`` for the footnote."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT current_setting('server_version'), current_setting('fsync'),"
            " current_setting('synchronous_commit')"
        )
        row = await cur.fetchone()
    assert row is not None
    version = str(row[0]).split()[0]
    return f"PostgreSQL {version}, fsync={row[1]}, synchronous_commit={row[2]}"


# -- timing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contender:
    """One implementation of one benchmark row."""

    name: str
    prepare: Callable[[int], Awaitable[None]]
    """Untimed, before every run: bring the state to the start line for ``n`` messages."""
    run: Callable[[int], Awaitable[None]]
    """Timed: process exactly ``n`` messages."""
    check: Callable[[int], Awaitable[None]]
    """Untimed, after every run: raise if the run did not do all of its work."""


async def _timed(contender: Contender, n: int) -> float:
    await contender.prepare(n)
    gc.collect()  # start each run with no garbage left by the previous one
    start = time.perf_counter()
    await contender.run(n)
    elapsed = time.perf_counter() - start
    await contender.check(n)
    return n / elapsed


async def interleaved(
    contenders: Sequence[Contender],
    *,
    n: int,
    warmup: int,
    rounds: int,
    alternate: bool = False,
) -> list[list[float]]:
    """Rates (messages/s) of every contender for every round, runs interleaved.

    Each contender first runs once on ``warmup`` messages (untimed: connections, prepared
    statements, caches); then each round runs every contender once, in order, so that drift
    on the machine affects all of them alike. With ``alternate``, every other round runs
    them in reverse order, so that what running first (or after a given other) does to a
    run falls on every contender alike.
    """
    for contender in contenders:
        await _timed(contender, warmup)
    rates: list[list[float]] = [[] for _ in contenders]
    for round_ in range(rounds):
        order = list(enumerate(contenders))
        if alternate and round_ % 2:
            order.reverse()
        for i, contender in order:
            rates[i].append(await _timed(contender, n))
    return rates


# -- report --------------------------------------------------------------------------------


def queue_args(doc: str | None, batch: int, argv: list[str] | None = None) -> argparse.Namespace:
    """Options of the queue benchmarks: server, ``--messages``, ``--rounds``, ``--verbose``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    add_server_options(parser)
    parser.add_argument(
        "--messages",
        type=int,
        default=20_000,
        metavar="N",
        help=f"messages per run of the batched rows (a multiple of {batch}); "
        "the one-message-per-call rows use N/10 (default: 20000)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per row (default 5)")
    parser.add_argument("--verbose", action="store_true", help="print every run's rate")
    args = parser.parse_args(argv)
    if args.messages < 10 * batch or args.messages % batch:
        parser.error(f"--messages must be a multiple of {batch} and at least {10 * batch}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def rate(value: float) -> str:
    return f"{value:,.0f}"


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> str:
    """The median of per-round ratios: each round times every side back to back, so the
    ratio of one round is immune to the machine's slow drifts."""
    ratios = [n / d for n, d in zip(numerators, denominators, strict=True)]
    return f"{statistics.median(ratios):.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> str:
    """A markdown table; columns from ``numeric_from`` on are right-aligned."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if i >= numeric_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if i >= numeric_from else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(header), line(rule), *(line(r) for r in rows)])
