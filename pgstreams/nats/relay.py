"""``relay``: a transactional outbox into JetStream.

Write messages to a ``PgQueue`` inside your own transactions (``queue.publish(value,
conn=conn)``); ``relay`` moves them to JetStream with the sink's guarantees: each is acked
in the queue only once JetStream stored it (and every earlier one), with ``Nats-Msg-Id``
``<queue>:<message id>``, so a relay killed at any point and started again neither loses
nor duplicates a message in the stream (within its duplicate window).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from nats.js import JetStreamContext

from .._core.envelope import Envelope
from .._core.stream import Stream
from .._sources.queue.queue import PgQueue
from .sink import publish

__all__ = ["relay"]


def relay(
    queue: PgQueue[Any],
    js: JetStreamContext,
    *,
    subject: str | Callable[[Envelope[Any]], str],
    window: int = 256,
    visibility: float = 120.0,
    headers: Callable[[Envelope[Any]], Mapping[str, str]] | None = None,
    **options: Any,
) -> Stream[Envelope[Any]]:
    """The queue's messages into JetStream: a stream of the envelopes relayed (drain it).
    ``visibility``: their lease, which must outlast a retried publish (``retry_for``)."""
    sink = publish(js, subject=subject, window=window, headers=headers, **options)
    return queue.subscribe_ack(visibility=visibility, prefetch=min(window, 500)).through(sink)
