"""Durable consumers: a named position in a stream, stored in PostgreSQL.

A position is a round (see ``subscription``) -- the snapshots it lies between, the last id
finished in it, its highest id. A consumer's stream stores it after each item the
downstream has finished with (when it asks for the next one, or when the stream closes
cleanly) and resumes from it: at-least-once across crashes, duplicates only of items not
finished. Items an operator read ahead and gave back are rewound to.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ..._core.errors import DatabaseError, InvalidArgumentError
from ..._core.source import Retry
from ..._pg import calls
from .change import Change, ChangeLag, committed_id
from .log import Log

__all__ = [
    "Position",
    "Progress",
    "check_consumer",
    "lag",
    "names",
    "open_position",
    "remove",
    "rewind",
    "save",
    "save_on_close",
]

logger = logging.getLogger("pgstreams.changes")

Position = tuple[str, str, int, int]
"""(prev snapshot text, cur snapshot text, last id finished, highest id of the round)."""


class Progress:
    """What a durable consumer's stream shares with its give-back hook and its checkpoint:
    the position just before each recently delivered change, whether a rewind was stored,
    and -- once commits are deferred -- the position after each change handed out and not
    committed yet."""

    __slots__ = ("_after", "_before", "_handed", "deferred", "rewound")

    _KEEP = 4096

    def __init__(self) -> None:
        self._before: dict[int, Position] = {}
        self._after: deque[tuple[int, Position]] = deque()
        self._handed: set[int] = set()
        self.rewound = False
        self.deferred = False

    def handed(self, change_id: int, position: Position) -> None:
        """Deferred commits: ``change_id`` was handed out; ``position`` is just after it."""
        self._after.append((change_id, position))
        self._handed.add(change_id)

    def committed(self, change_id: int) -> Position | None:
        """Deferred commits: the position just after ``change_id``, if it was handed out
        and not committed yet (None: nothing new to store); it and every change handed
        out before it are committed. Delivery order, not id order: a later round may
        deliver smaller ids (a transaction that committed late), and committing a change
        must not commit those handed out after it."""
        if change_id not in self._handed:
            return None
        while True:
            handed_id, position = self._after.popleft()
            self._handed.discard(handed_id)
            if handed_id == change_id:
                return position

    def remember(self, change_id: int, position: Position) -> None:
        prev, cur, _, top = position
        self._before[change_id] = (prev, cur, change_id - 1, top)
        if len(self._before) > self._KEEP:
            del self._before[next(iter(self._before))]

    def before(self, change_id: int) -> Position | None:
        return self._before.get(change_id)


def check_consumer(name: object) -> str:
    """A consumer name is a value, not an identifier: any 1-200 printable characters."""
    if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
        raise InvalidArgumentError(f"consumer must be 1-200 printable characters, got {name!r}")
    return name


async def open_position(log: Log, key: str, consumer: str) -> Any:
    """The consumer's stored position, registering it at "now" if it is new; the row also
    carries the current snapshot and whether the server is a standby."""
    return await calls.fetchone(
        log.db,
        log.sql["consumer_open"],
        {"stream": key, "name": consumer},
        owner=f"changes of {key}",
    )


class Deferred:
    """The ``Checkpoint`` of a durable consumer's stream (see ``_core.checkpoint``)."""

    def __init__(
        self, log: Log, key: Callable[[], Awaitable[str]], consumer: str, progress: Progress
    ) -> None:
        self._log = log
        self._key = key
        self._consumer = consumer
        self._progress = progress

    def defer(self) -> None:
        self._progress.deferred = True

    async def commit(self, item: Any) -> None:
        position = self._progress.committed(committed_id(item))
        if position is not None:
            await save(self._log, await self._key(), self._consumer, position)


async def rewind(log: Log, key: str, consumer: str, progress: Progress, items: list[Any]) -> None:
    """Items an operator read but never handed on: store the position just before the
    earliest of them, so that they come again."""
    if progress.deferred:
        return  # only its checkpoint stores positions: they come again anyway
    # Given-back items come in delivery order: the first is the earliest.
    ids = [c.id for c in items if isinstance(c, Change)]
    position = progress.before(ids[0]) if ids else None
    if position is None:
        return
    progress.rewound = True
    await save_on_close(log, key, consumer, position)


async def save_on_close(log: Log, key: str, consumer: str, position: Position) -> None:
    """``save`` while a stream closes: shielded but bounded, since a database that stays
    away must not hang the close. Not saving costs duplicates after a restart, never a loss."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(calls.CLEANUP_TIMEOUT) as scope:
            await save(log, key, consumer, position)
        if scope.cancelled_caught:
            logger.error("consumer %s of %s: could not save its position", consumer, key)


async def save(log: Log, key: str, consumer: str, position: Position) -> None:
    """Store a durable consumer's position, riding out connection failures."""
    prev, cur, after, top = position
    params = {
        "stream": key,
        "name": consumer,
        "prev": prev,
        "cur": cur,
        "after": after,
        "top": top,
    }
    retry = Retry(logger, f"consumer {consumer} of {key}")
    while True:
        try:
            async with log.db.connection() as conn:
                result = await conn.execute(log.sql["consumer_save"], params)
                saved = result.rowcount == 1
            break
        except DatabaseError as exc:
            await retry.after(exc)
    if not saved:
        raise InvalidArgumentError(
            f"consumer {consumer!r} of {key} was removed while its stream ran"
        )


async def lag(log: Log, key: str, consumer: str) -> ChangeLag:
    """The committed changes a consumer has not finished with, and the age of the oldest."""
    row = await calls.fetchone(
        log.db,
        log.sql["lag_consumer"],
        {"stream": key, "name": consumer},
        owner=f"changes of {key}",
    )
    if not row[2]:
        raise InvalidArgumentError(f"no consumer {consumer!r} on {key}")
    return ChangeLag(int(row[0]), float(row[1]))


async def names(log: Log, key: str) -> list[str]:
    rows = await calls.fetchall(log.db, log.sql["consumers"], {"stream": key})
    return [str(r[0]) for r in rows]


async def remove(log: Log, key: str, consumer: str) -> None:
    async with log.db.connection() as conn:
        await conn.execute(log.sql["consumer_drop"], {"stream": key, "name": consumer})
