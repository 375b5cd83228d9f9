"""Sending messages to a pgmq queue, alone or joining the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

from psycopg import AsyncConnection

from ..._core.errors import PayloadError
from ..._core.validate import check_seconds, headers_json, to_json
from ..._pg import calls
from .core import QueueCore

__all__ = ["Publishing", "json_array"]

T = TypeVar("T")


class Publishing(QueueCore, Generic[T]):
    """``publish`` and ``publish_batch``: one statement each (``pgmq.send``/``send_batch``).

    Bad payloads, headers or delays raise before anything is sent.
    """

    async def publish(
        self,
        value: T,
        *,
        delay: float = 0,
        headers: Mapping[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> int:
        """Send one message; returns its msg_id. With ``conn``, joins its transaction."""
        params = {
            "queue": self.name,
            "msg": to_json("message", value),
            "headers": None if headers is None else headers_json(headers),
            "delay": check_seconds("delay", delay),
        }
        row = await self._fetchone(self._sql["send"], params, conn)
        return int(row[0])

    async def publish_batch(
        self,
        values: Iterable[T],
        *,
        delay: float = 0,
        headers: Mapping[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> list[int]:
        """Send many messages in one statement (all or none); returns their ids in order."""
        batch = list(values)
        seconds = check_seconds("delay", delay)
        params = {
            "queue": self.name,
            "msgs": json_array(batch),
            "headers": None if headers is None else headers_json(headers),
            "delay": seconds,
        }
        if not batch:
            return []
        rows = await calls.fetchall(self._db, self._sql["send_batch"], params, conn)
        return sorted(int(r[0]) for r in rows)


def json_array(values: list[Any]) -> str:
    """One JSON array of every message (PayloadError names the first bad one)."""
    try:
        return to_json("messages", values)
    except PayloadError:
        for i, value in enumerate(values):
            to_json(f"message {i}", value)
        raise
