"""Machinery every source shares: NOTIFY channel names, header parsing, the record of
auto-acked rows that operators may give back, and the back-off a subscriber retries with."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import anyio

from .errors import DatabaseError, PayloadError
from .validate import to_json

if TYPE_CHECKING:
    from .._pg.listen import Wakeup

__all__ = [
    "UNSET",
    "HandOut",
    "Handed",
    "Retry",
    "Unset",
    "Waiting",
    "channel_for",
    "parse_headers",
]

E = TypeVar("E")

_RETRY_MIN, _RETRY_MAX = 0.1, 5.0
_HANDED_MEMORY = 4096
_HANDED_BYTES = 8 * 1024 * 1024


class Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()


def channel_for(schema: str, kind: str, name: str) -> str:
    """The NOTIFY channel of an object; hashed when it would exceed 63 bytes."""
    channel = f"pgstreams.{schema}.{kind}.{name}"
    if len(channel.encode()) > 63:
        channel = "pgstreams." + hashlib.blake2b(channel.encode(), digest_size=16).hexdigest()
    return channel


def parse_headers(text: str) -> Any:
    # Most messages carry no headers: skip the JSON parser for them.
    return {} if text == "{}" else json.loads(text)


class Handed:
    """The rows an auto-ack subscription delivered lately, found again by value identity.

    When an operator gives values back (it read them ahead and never delivered them), this
    finds their rows so they are restored exactly: same payload text, id, headers, attempts
    and place in line. Kept for the last few thousand rows (and at most a few MiB of
    payload), far more than any read-ahead holds.

    Values that Python shares between messages (small ints, True, None, one-letter strings)
    are matched newest first: the payload restored is always the right one, and in every
    FIFO chain so are the id and headers.
    """

    def __init__(self) -> None:
        self._batches: deque[tuple[list[Any], list[Sequence[Any] | None], int]] = deque()
        self._count = 0
        self._bytes = 0

    def add(self, values: list[Any], rows: list[Sequence[Any]]) -> list[Sequence[Any] | None]:
        """Remember a batch; returns its row slots (set a slot to None to forget a row)."""
        slots: list[Sequence[Any] | None] = list(rows)
        size = sum(len(r[1] or "") for r in rows)
        self._batches.append((values, slots, size))
        self._count += len(values)
        self._bytes += size
        while len(self._batches) > 1 and (
            self._count > _HANDED_MEMORY or self._bytes > _HANDED_BYTES
        ):
            old_values, _, old_size = self._batches.popleft()
            self._count -= len(old_values)
            self._bytes -= old_size
        return slots

    def split(
        self, values: list[Any], owner: str, logger: logging.Logger
    ) -> tuple[list[Sequence[Any]], list[str]]:
        """Given-back values as (rows known to this record, JSON of the rest), in order.

        The rest were held longer than this record remembers; they can only go back as new
        messages, with the value as it is now.
        """
        rows: list[Sequence[Any]] = []
        unknown: list[str] = []
        for value in reversed(values):
            row = self.take(value)
            if row is not None:
                rows.append(row)
                continue
            try:
                unknown.append(to_json("message", value))
            except PayloadError as exc:
                logger.error("%s: cannot put back a message: %s", owner, exc)
        if unknown:
            logger.warning(
                "%s: %d messages given back long after they were read go back as new messages",
                owner,
                len(unknown),
            )
        return rows[::-1], unknown[::-1]

    def take(self, value: Any) -> Sequence[Any] | None:
        # Given-back values are the most recent ones, so search from the newest.
        for values, slots, _ in reversed(self._batches):
            for i in range(len(values) - 1, -1, -1):
                row: Sequence[Any] | None = slots[i]
                if row is not None and values[i] is value:
                    slots[i] = None
                    return row
        return None


class Retry:
    """Capped exponential back-off for a subscriber riding out connection failures; logs to
    the source's own logger, naming what is retrying (``"queue jobs"``, ``"changes of t"``)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._delay = _RETRY_MIN

    async def after(self, exc: DatabaseError) -> None:
        """Sleep before the next try, or re-raise ``exc`` if it is not transient."""
        if not exc.transient:
            raise exc
        self._logger.warning("%s: %s; retrying in %.1fs", self._what, exc, self._delay)
        await anyio.sleep(self._delay)
        self._delay = min(self._delay * 2, _RETRY_MAX)

    def reset(self) -> None:
        """A try succeeded: the next failure waits the shortest time again."""
        if self._delay != _RETRY_MIN:
            self._logger.info("%s: working again", self._what)
            self._delay = _RETRY_MIN


class Waiting:
    """How a subscriber waits for more rows: woken through its NOTIFY channel, looking
    again every ``poll`` seconds at the latest, and backing off from lost connections."""

    __slots__ = ("poll", "retry", "wakeup")

    def __init__(self, wakeup: Wakeup, poll: float, retry: Retry) -> None:
        self.wakeup = wakeup
        self.poll = poll
        self.retry = retry


class HandOut(Generic[E]):
    """Items read in one go and handed out one at a time; ``rest`` is what was not handed
    out (yet), for the stream to give back when it stops early."""

    __slots__ = ("_given", "_items")

    def __init__(self, items: list[E]) -> None:
        self._items = items
        self._given = 0

    def __iter__(self) -> Iterator[E]:
        for item in self._items:
            self._given += 1
            yield item

    @property
    def given(self) -> list[E]:
        """What was handed out."""
        return self._items[: self._given]

    @property
    def rest(self) -> list[E]:
        return self._items[self._given :]
