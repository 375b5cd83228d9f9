"""The NATS bridge's errors (all ``PgStreamsError``s)."""

from __future__ import annotations

from .._core.errors import InvalidArgumentError, PgStreamsError

__all__ = ["NatsConnectError", "NatsError", "NatsPublishError", "SubjectError"]


class NatsError(PgStreamsError):
    """Something went wrong between pgstreams and NATS."""


class NatsConnectError(NatsError):
    """The server could not be reached (the message names the URL)."""


class NatsPublishError(NatsError):
    """JetStream did not store a message: no stream takes its subject, or the server stayed
    away past the retry budget. Nothing from that message on was acked upstream."""


class SubjectError(InvalidArgumentError):
    """A subject (or a stream name) NATS would refuse."""
