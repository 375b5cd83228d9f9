"""Scaling out with NATS JetStream (extra ``nats``): a sink that publishes any stream into
JetStream and acks upstream only what JetStream stored, a source that reads a durable
JetStream consumer as a stream of envelopes, and an outbox relay from a ``PgQueue``.

    from pgstreams import nats as psn

    js = await psn.connect("nats://127.0.0.1:4222")
    await psn.ensure_stream(js, "DB", subjects=["db.>"], duplicate_window=120)
    await cs.subscribe(consumer="to-nats").through(
        psn.publish(js, subject=lambda c: f"db.{c.table}.{c.op}")
    ).drain()
    users = psn.subscribe(js, "DB", durable="indexer", filter_subject="db.public.users.*")
    await users.for_each(handle)

Nothing here is imported by ``import pgstreams``.
"""

from __future__ import annotations

try:
    import nats as _client  # noqa: F401  (the nats-py package)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pgstreams.nats needs the nats-py client: pip install 'pgstreams[nats]'"
    ) from exc

from .codec import change_document
from .connection import close, connect, ensure_stream
from .errors import NatsConnectError, NatsError, NatsPublishError, SubjectError
from .relay import relay
from .sink import publish
from .source import subscribe

__all__ = [
    "NatsConnectError",
    "NatsError",
    "NatsPublishError",
    "SubjectError",
    "change_document",
    "close",
    "connect",
    "ensure_stream",
    "publish",
    "relay",
    "subscribe",
]
