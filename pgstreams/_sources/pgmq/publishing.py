"""Sending messages to a pgmq queue, alone or joining the caller's transaction."""

from __future__ import annotations

from typing import TypeVar

from ..._core.publisher import Publisher, Sending
from ..._pg import calls
from .core import QueueCore

__all__ = ["Publishing"]

T = TypeVar("T")


class Publishing(QueueCore, Publisher[T]):
    """``publish`` and ``publish_batch``: one statement each (``pgmq.send``/``send_batch``)."""

    async def _send(self, payload: str, how: Sending) -> int:
        params = {"queue": self.name, "msg": payload, "headers": how.headers, "delay": how.delay}
        row = await self._fetchone(self._sql["send"], params, how.conn)
        return int(row[0])

    async def _send_batch(self, payloads: list[str], how: Sending) -> list[int]:
        msgs = "[" + ",".join(payloads) + "]"
        params = {"queue": self.name, "msgs": msgs, "headers": how.headers, "delay": how.delay}
        rows = await calls.fetchall(self._db, self._sql["send_batch"], params, how.conn)
        return sorted(int(r[0]) for r in rows)
