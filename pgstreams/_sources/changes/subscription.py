"""Reading a change stream: live, durable and replay subscriptions are one cursor.

A change's id is assigned before its transaction commits, so a reader that remembers "the
last id I saw" skips changes whose transaction commits late. A reader here goes in rounds:
each delivers, in id order, the changes of the transactions that committed between the
previous round's snapshot and this one's. A transaction's changes become visible all at
once, at commit, so none can appear behind a finished round; and a later change of a row is
made after the earlier one's transaction committed, so it comes in the same round with a
later id, or in a later round -- changes of one row come out in the order they were made. A
long-running transaction holds up nothing but its own changes. Each change is delivered
once per subscription: rounds do not overlap, and a page read by id skips rows of other
rounds.

A live subscription starts at the current snapshot; a replay (``since``) starts from a
snapshot that sees nothing, its first round being every matching change visible now; a
durable consumer starts from its stored position. All of them then wait for the next round
on the stream's NOTIFY -- which carries no data, so rows of any size are fine -- and poll
every ``poll`` seconds, so a lost notification costs latency only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.lowlevel

from ..._core import telemetry
from ..._core.errors import DatabaseError
from ..._core.lag import LagWatch
from ..._core.source import Retry, Waiting
from ..._core.stream import closing_cleanly
from ..._pg import calls
from . import consumers
from .change import Change, change_from_row
from .log import Log

__all__ = ["run"]

logger = logging.getLogger("pgstreams.changes")

_EPOCH = datetime(1, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """A pg_snapshot: every transaction below xmin had ended, none from xmax on had, and
    those in ``xip`` were in progress."""

    text: str
    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> _Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(text, int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def sees(self, txid: int) -> bool:
        """Whether a transaction that committed is visible in this snapshot."""
        return txid < self.xmin or (txid < self.xmax and txid not in self.xip)


_NOTHING = _Snapshot("0:0:", 0, 0, frozenset())
"""A snapshot that sees nothing: a replay's first round takes every visible change."""


@dataclass(slots=True)
class _Cursor:
    prev: _Snapshot
    cur: _Snapshot
    """The round delivers changes visible in ``cur`` and not in ``prev``, in id order."""
    after: int
    """The last id delivered in this round."""
    top: int
    """The highest id in this round."""
    exhausted: bool
    """True once the round has been read to its end."""

    def in_round(self, txid: int) -> bool:
        return self.cur.sees(txid) and not self.prev.sees(txid)


async def run(
    log: Log,
    stream_key: Callable[[], Awaitable[str]],
    consumer: str | None,
    since: datetime | int | None,
    poll: float,
    n: int,
    progress: consumers.Progress,
) -> AsyncIterator[Change[Any]]:
    """The changes of the stream ``stream_key()`` names: from now on, from ``consumer``'s
    position, or from ``since`` (a time or a change id); ``n`` rows per page."""
    await log.db.ensure_migrated()
    key = await stream_key()
    filters = {
        "stream": key,
        "since_at": since if isinstance(since, datetime) else _EPOCH,
        "since_id": since if isinstance(since, int) else 0,
        "n": n,
    }
    cursor = await _open(log, key, consumer, since is not None, filters)
    retry = Retry(logger, f"changes of {key}")
    name = f"changes of {key}" + (f" (consumer {consumer})" if consumer else "")
    lag = None if since is not None else LagWatch(logger, name)  # a replay lags by design
    lifecycle = logging.INFO if consumer else logging.DEBUG  # durable consumers at INFO
    logger.log(lifecycle, "%s: subscribed", name)
    unsaved: consumers.Position | None = None  # the last item handed out
    try:
        async with log.db.wakeups(log.channel(key)) as wake:
            while True:
                rows = await _next_rows(log, cursor, filters, Waiting(wake, poll, retry))
                if rows and lag is not None:
                    lag.check(rows[0][-1])
                if (tel := telemetry.otel) is not None:
                    read_at = tel.now()
                handed = 0
                try:
                    for row in rows:
                        cursor.after = max(cursor.after, row[0])
                        unsaved = (cursor.prev.text, cursor.cur.text, row[0], cursor.top)
                        handed += 1
                        if progress.deferred:  # its checkpoint commits, not the next ask
                            progress.handed(row[0], unsaved)
                            unsaved = None
                        elif consumer is not None:  # for a rewind (none when deferred)
                            progress.remember(row[0], unsaved)
                        yield change_from_row(key, row)
                        # Asked for the next item: the downstream is done with this one.
                        if consumer is not None and unsaved is not None:
                            await consumers.save(log, key, consumer, unsaved)
                        unsaved = None
                finally:
                    if tel is not None:  # rows end with the change's time (Change.at)
                        tel.changes("trigger", key, [r[-1] for r in rows[:handed]], read_at)
    finally:
        logger.log(lifecycle, "%s: unsubscribed", name)
        # A clean close finishes the last item -- unless an operator gave items back.
        if (
            consumer is not None
            and unsaved is not None
            and not progress.rewound
            and closing_cleanly()
        ):
            await consumers.save_on_close(log, key, consumer, unsaved)


async def _open(
    log: Log, key: str, consumer: str | None, replay: bool, filters: dict[str, Any]
) -> _Cursor:
    if consumer is not None:
        row = await consumers.open_position(log, key, consumer)
        prev, cur = _Snapshot.parse(row[0]), _Snapshot.parse(row[1])
        _check_server(bool(row[5]), _Snapshot.parse(row[4]), cur)
        return _Cursor(prev, cur, int(row[2]), int(row[3]), exhausted=False)
    row = await calls.fetchone(
        log.db, log.sql["start"], {**filters, "replay": replay}, owner=f"changes of {key}"
    )
    cur = _Snapshot.parse(row[0])
    _check_server(bool(row[3]), cur, cur)
    if replay:  # first round: every matching change visible now, by id
        return _Cursor(_NOTHING, cur, int(row[1]), int(row[2]), exhausted=False)
    return _Cursor(cur, cur, 0, 0, exhausted=True)  # from now on


async def _next_rows(
    log: Log, cursor: _Cursor, filters: dict[str, Any], waiting: Waiting
) -> list[Any]:
    """The next rows in delivery order, waiting while there are none."""
    wake, retry = waiting.wakeup, waiting.retry
    while True:
        await anyio.lowlevel.checkpoint_if_cancelled()
        wake.arm()
        try:
            if not cursor.exhausted and cursor.after < cursor.top:
                params = {**filters, "after": cursor.after, "top": cursor.top}
                rows = await calls.fetchall_shielded(log.db, log.sql["page"], params)
                retry.reset()
                cursor.exhausted = len(rows) < filters["n"]
                if rows:
                    cursor.after = int(rows[-1][0])
                    mine = [r for r in rows if cursor.in_round(int(r[1]))]
                    if mine:
                        return mine
                continue
            cursor.exhausted = True
            params = {
                **filters,
                "prev_xmax": cursor.cur.xmax,
                "prev_xip": [str(x) for x in sorted(cursor.cur.xip)],
            }
            result = await calls.fetchall_shielded(log.db, log.sql["advance"], params)
            retry.reset()
        except DatabaseError as exc:
            await retry.after(exc)
            continue
        cur, top = _Snapshot.parse(result[0][0]), int(result[0][1])
        _check_server(bool(result[0][2]), cur, cursor.cur)
        rows = [r[3:] for r in result if r[3] is not None]
        cursor.prev, cursor.cur, cursor.after, cursor.top = cursor.cur, cur, 0, top
        cursor.exhausted = len(rows) < filters["n"]
        if rows:
            return rows
        await wake.wait(waiting.poll)


def _check_server(in_recovery: bool, now: _Snapshot, seen: _Snapshot) -> None:
    """Refuse what would make snapshot rounds skip changes: a hot standby (its snapshots
    list running transactions where pg_current_snapshot() does not show them), and
    transaction ids that went backwards (a failover to a replica that lagged, a restore)."""
    if in_recovery:
        raise DatabaseError("change streams must read from the primary: this server is a standby")
    if now.xmax < seen.xmax:
        raise DatabaseError(
            f"the server's transaction ids went backwards ({now.xmax} < {seen.xmax}):"
            " a failover or a restore? Positions taken before it no longer apply"
        )
