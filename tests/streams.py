"""Helpers for tests that run subscribers in the background."""

from __future__ import annotations

from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream

import pgstreams as ps

T = TypeVar("T")


async def until_idle(db: ps.Database, subscribers: int) -> None:
    """Wait until that many subscribers sleep, having read everything visible."""
    with anyio.fail_after(10):
        while db.listener.idle_count() < subscribers:  # noqa: ASYNC110 - no event to await
            await anyio.sleep(0.005)


async def forward(stream: ps.Stream[T], send: MemoryObjectSendStream[T]) -> None:
    """Copy ``stream`` into ``send`` until cancelled (a subscriber run as a task)."""
    async with send, stream:
        async for item in stream:
            await send.send(item)
