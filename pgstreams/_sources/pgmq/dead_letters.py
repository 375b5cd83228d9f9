"""The dead-letter queue ``<name>_dlq``: moving messages past ``max_attempts`` there,
reading it, and moving them back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio

from ..._core import telemetry
from ..._core.envelope import DeadMessage
from ..._core.errors import DatabaseError
from ..._core.progress import ProgressCallback, Reporter, check_progress
from ..._core.validate import check_positive_int
from ..._pg import calls
from .core import QueueCore, logger

__all__ = ["DeadLetters"]

_REQUEUE_CHUNK = 1000


class DeadLetters(QueueCore):
    """A queue's dead letters. Every move is one transaction per batch: a message is in the
    queue or in its dead-letter queue, never in both and never lost.

    A dead message keeps its payload and headers; its headers gain ``pgstreams_dead``
    (queue, msg_id, read count, enqueue and death times, the last attempt's error).
    """

    async def _dead_letter(self, rows: Sequence[Sequence[Any]]) -> None:
        """Move deliveries past max_attempts to the DLQ: lock, send, delete in one
        transaction. On failure they stay leased and are tried again when the vt ends."""
        params = {"ids": [r[0] for r in rows], "read_cts": [r[2] for r in rows], "queue": self.name}
        with anyio.CancelScope(shield=True), anyio.move_on_after(calls.CLEANUP_TIMEOUT):
            try:
                async with self._db.connection() as conn, conn.transaction():
                    cur = await conn.execute(self._sql["dead_lock"], params)
                    locked = await cur.fetchall()
                    if not locked:
                        return
                    await conn.execute(
                        self._sql["dead_send"],
                        {
                            "dlq": self.dead_letter_queue,
                            "msgs": [r[1] for r in locked],
                            "headers": [r[2] for r in locked],
                        },
                    )
                    await conn.execute(
                        self._sql["delete_many"],
                        {"queue": self.name, "ids": [r[0] for r in locked]},
                    )
                if (tel := telemetry.otel) is not None:
                    tel.settled(self._kind, self.name, dead=len(locked))
            except DatabaseError as exc:
                logger.error(
                    "pgmq %s: could not move %d messages to %s: %s",
                    self.name,
                    len(rows),
                    self.dead_letter_queue,
                    exc,
                )

    async def dead_letters(self, limit: int = 100) -> list[DeadMessage]:
        """The oldest ``limit`` messages of the dead-letter queue."""
        check_positive_int("limit", limit)
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql["exists"], {"table": self._dlq_table()})
            row = await cur.fetchone()
            if not (row and row[0]):
                return []
            cur = await conn.execute(self._sql["dead_peek"], {"limit": limit})
            rows = await cur.fetchall()
        out = []
        for msg_id, message, headers_text, enqueued_at in rows:
            headers = {} if headers_text is None else json.loads(headers_text)
            dead = headers.get("pgstreams_dead") or {}
            out.append(
                DeadMessage(
                    msg_id,
                    None if message is None else json.loads(message),
                    headers,
                    int(dead.get("read_ct", 0)) - 1,
                    enqueued_at,
                    _timestamp(dead.get("dead_at")) or enqueued_at,
                    dead.get("error"),
                )
            )
        return out

    async def requeue_dead(self, *, progress: ProgressCallback | None = None) -> int:
        """Move every dead-lettered message back to the queue; returns how many.

        Each chunk is popped from the DLQ and sent back in one transaction, so a failure
        loses nothing. Their headers lose the dead-letter record; read counts start over.
        It moves as many messages as the DLQ held when it began, oldest first -- those,
        unless another reader takes some meanwhile -- so messages that die again while it
        runs wait for the next call instead of keeping it going.
        ``progress`` gets a ``Progress`` at the start and after each chunk; progress is
        also logged on the ``pgstreams.pgmq`` logger.
        """
        check_progress(progress)
        report = Reporter("requeue_dead", progress, logger, f"requeue_dead {self.name}", "messages")
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql["exists"], {"table": self._dlq_table()})
            row = await cur.fetchone()
            if not (row and row[0]):
                await report.start(0, self.name)
                await report.finish()
                return 0
            cur = await conn.execute(self._sql["dead_count"])
            row = await cur.fetchone()
            left = int(row[0]) if row else 0
            await report.start(left, self.name)
            while left > 0:
                async with conn.transaction():
                    cur = await conn.execute(
                        self._sql["requeue_take"],
                        {"dlq": self.dead_letter_queue, "qty": min(_REQUEUE_CHUNK, left)},
                    )
                    rows = await cur.fetchall()
                    if not rows:
                        break
                    await conn.execute(
                        self._sql["requeue_send"],
                        {
                            "queue": self.name,
                            "msgs": [r[1] for r in rows],
                            "headers": [r[4] for r in rows],
                        },
                    )
                left -= len(rows)
                await report.advance(len(rows))
        await report.finish()
        return report.done


def _timestamp(text: object) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else None
