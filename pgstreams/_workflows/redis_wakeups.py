"""Wake-ups from one Redis pub/sub channel, for RedisWorkflowStorage's waiters.

Each ``wakeups()`` block subscribes on a connection of its own and reads that connection
only while its waiter sleeps (``wait()``), so there is no task to run beside it. The block
starts once the server has confirmed the subscription, so a message published after that
is never missed. If the connection fails, the waiter is woken (something may have been
missed) after a pause, and the client reconnects and subscribes again on the next read:
polling covers the gap.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from .storage import Wakeup

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = ["wakeups"]

logger = logging.getLogger("pgstreams.workflows")

_SLICE = 0.1
"""Longest read of the channel in one go: a wake-up fired in this process (``fire()``)
waits at most this long to be seen."""
_CONFIRM = 5.0
"""Longest wait for the server to confirm the subscription (then polling covers)."""
_PAUSE = 1.0
"""After a failed read, the waiter is woken this long later at most."""


class _ChannelWakeup:
    """A :class:`Wakeup` fired by messages on one pub/sub channel (or by ``fire()``)."""

    def __init__(self, pubsub: PubSub, channel: str) -> None:
        self._pubsub = pubsub
        self._channel = channel
        self._subscribed = False
        self._fired = False

    def arm(self) -> bool:
        fired, self._fired = self._fired, False
        return fired

    def fire(self) -> None:
        self._fired = True

    async def wait(self, seconds: float) -> bool:
        deadline = anyio.current_time() + seconds
        while not self._fired:
            left = deadline - anyio.current_time()
            if left <= 0:
                return False
            if not await self._read(min(left, _SLICE)):
                await anyio.sleep(min(left, _PAUSE))
                self._fired = True  # something may have been missed: look again
        return True

    async def _read(self, seconds: float) -> bool:
        """Read for up to ``seconds`` (subscribing first if that failed before); False if
        the connection failed. After a failure the client reconnects, and subscribes
        again, on the next read."""
        from redis.exceptions import RedisError

        if not self._subscribed:
            return await self.subscribe()
        try:
            message = await self._pubsub.get_message(timeout=seconds)
        except (RedisError, OSError) as exc:
            logger.warning("workflow wake-ups: Redis pub/sub failed (polling meanwhile): %s", exc)
            return False
        if message is not None and message.get("type") == "message":
            self._fired = True
        return True

    async def subscribe(self) -> bool:
        """Subscribe, and wait (bounded) for the server to confirm it; False on failure
        (logged: the waiter polls meanwhile, and the next read tries again)."""
        from redis.exceptions import RedisError

        try:
            await self._pubsub.subscribe(self._channel)
            self._subscribed = True
            deadline = anyio.current_time() + _CONFIRM
            while (left := deadline - anyio.current_time()) > 0:
                message = await self._pubsub.get_message(timeout=left)
                if message is None:
                    continue
                if message.get("type") != "subscribe":
                    self._fired = True  # a message on the channel already
                break
        except (RedisError, OSError) as exc:
            logger.warning("workflow wake-ups: cannot subscribe (polling meanwhile): %s", exc)
            return False
        return True


@asynccontextmanager
async def wakeups(redis: Redis, channel: str) -> AsyncIterator[Wakeup]:
    """A wake-up fired by every message published on ``channel``, until the block ends."""
    pubsub = redis.pubsub()
    try:
        wake = _ChannelWakeup(pubsub, channel)
        if not await wake.subscribe():
            wake.fire()  # the waiter looks once, then polls until a read subscribes
        yield wake
    finally:
        with anyio.CancelScope(shield=True):
            await pubsub.aclose()
