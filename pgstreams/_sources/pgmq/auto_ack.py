"""``subscribe()``: message values popped from a pgmq queue (deleted as they are read)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, Generic, TypeVar

from ..._core import telemetry
from ..._core.source import Handed, Retry, Waiting
from ..._core.stream import Stream
from ..._core.validate import check_positive_int, check_seconds
from .core import Idle, QueueCore, logger

__all__ = ["DEFAULT_POLL_INTERVAL", "AutoAck", "msg_id"]

T = TypeVar("T")

DEFAULT_POLL_INTERVAL = 1.0


def msg_id(row: Sequence[Any]) -> int:
    return int(row[0])


class AutoAck(QueueCore, Generic[T]):
    """The auto-ack subscription: at-most-once, and nothing popped is lost unread.

    Messages popped but not delivered when the stream closes, and values an operator gives
    back, return to the queue exactly as they were (same msg_id, place in line, headers).
    """

    def subscribe(
        self, *, prefetch: int = 1, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> Stream[T]:
        """Stream message values, popping each as it is read (auto-ack, at-most-once).

        Messages read but never delivered when the stream closes go back exactly as they
        were (same msg_id, place in line and headers).
        """
        check_positive_int("prefetch", prefetch)
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        handed = Handed()

        async def putback(values: list[Any]) -> None:
            await self._give_back_values(handed, values)

        return Stream(lambda: self._pop_loop(prefetch, poll, handed), putback=putback)

    async def _pop_loop(self, prefetch: int, poll: float, handed: Handed) -> AsyncIterator[T]:
        await self._db.ensure_migrated()
        params = {"queue": self.name, "qty": prefetch}
        retry = Retry(logger, f"pgmq queue {self.name}")
        async with self._db.wakeups(self._channel) as wakeup:
            idle = Idle()
            while True:
                rows, _ = await self._read_standard(
                    self._sql["pop"], params, Waiting(wakeup, poll, retry), idle
                )
                rows.sort(key=msg_id)  # pgmq returns what it took in no set order
                values: list[Any] = [None if r[1] is None else json.loads(r[1]) for r in rows]
                slots = handed.add(values, rows)
                delivered = 0
                if (tel := telemetry.otel) is not None:
                    read_at = tel.now()
                try:
                    for value in values:
                        delivered += 1
                        yield value
                finally:
                    if tel is not None:
                        enqueued = [r[3] for r in rows[:delivered]]
                        tel.delivered(self._kind, self.name, enqueued, read_at)
                    if delivered < len(rows):
                        for i in range(delivered, len(rows)):
                            slots[i] = None
                        await self._unpop(rows[delivered:])

    async def _unpop(self, rows: Sequence[Sequence[Any]]) -> None:
        params = {
            "ids": [r[0] for r in rows],
            "msgs": [r[1] for r in rows],
            "read_cts": [r[2] for r in rows],
            "enqueued": [r[3] for r in rows],
            "headers": [r[4] for r in rows],
            "vts": [r[5] for r in rows],
            "last_reads": [r[6] for r in rows],
        }
        await self._cleanup(self._sql["unpop"], params, "put back unread messages")

    async def _give_back_values(self, handed: Handed, values: list[Any]) -> None:
        rows, unknown = handed.split(values, f"pgmq {self.name}", logger)
        if rows:
            await self._unpop(rows)
        if unknown:
            params = {"queue": self.name, "msgs": unknown}
            await self._cleanup(self._sql["send_back"], params, "send back given-back messages")
