"""``subscribe``: a JetStream durable pull consumer as a ``Stream`` of ``Envelope``\\ s.

The library's envelope semantics on JetStream's: a fetched message is leased for
``ack_wait`` seconds; ``ack()`` acks it, ``nack(delay)`` naks it (redelivered after
``delay``), ``extend(seconds)`` sends "in progress" (the lease restarts at ``ack_wait``, so
``seconds`` may not exceed it); a message
not settled in time is redelivered with ``attempts`` (JetStream's delivery count) grown.

``max_deliver`` is enforced here rather than by the server, so that an exhausted message is
never just dropped: a nack of its last attempt, or a delivery past the limit (its consumer
died during the last one), publishes it to the dead-letter subject and terminates it.
The dead letter keeps the body and headers, with ``Pgstreams-Dead-Subject``,
``-Dead-Sequence``, ``-Dead-Deliveries`` and ``-Dead-Error`` added, and ``Nats-Msg-Id``
``<stream>:<durable>:<sequence>``, so that a consumer dead-lettering it twice stores it
once (and each consumer of the stream its own). The default subject is
``pgstreams.dlq.<stream>.<durable>``, in a stream ``<stream>_DLQ`` made on first use.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from .._core.envelope import Envelope
from .._core.errors import InvalidArgumentError
from .._core.source import HandOut
from .._core.stream import Stream
from .._core.validate import check_positive_int, check_seconds
from . import codec
from .connection import ensure_stream
from .errors import NatsPublishError
from .subjects import check_filter, check_stream_name, check_subject

__all__ = ["subscribe"]

logger = logging.getLogger("pgstreams.nats")

_FETCH_WAIT = 5.0
"""Seconds a fetch waits for messages before it asks again."""


def subscribe(
    js: JetStreamContext,
    stream: str,
    *,
    durable: str,
    filter_subject: str | None = None,
    ack_wait: float = 30.0,
    max_deliver: int = 5,
    dead_letter_subject: str | None = None,
    batch: int = 64,
    deserializer: Callable[[bytes], Any] | None = None,
) -> Stream[Envelope[Any]]:
    """Envelopes from the durable consumer ``durable`` of ``stream`` (see module docstring);
    it is created if missing, with ``filter_subject`` and ``ack_wait``. ``batch`` messages
    are fetched per request. The value is the body decoded as JSON, or by ``deserializer``.
    """
    check_stream_name(stream)
    check_stream_name(durable)
    if filter_subject is not None:
        check_filter(filter_subject)
    wait = check_seconds("ack_wait", ack_wait, allow_zero=False)
    check_positive_int("max_deliver", max_deliver)
    check_positive_int("batch", batch)
    dead = check_subject(dead_letter_subject or f"pgstreams.dlq.{stream}.{durable}")
    source = _Source(js, stream, durable, max_deliver, dead, deserializer or codec.decode, wait)
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=wait,
        max_deliver=-1,  # enforced here, so an exhausted message is dead-lettered
        filter_subject=filter_subject,
    )
    return Stream(
        lambda: source.envelopes(config, batch, dead_letter_subject is None),
        putback=source.release,
    )


class _Source:
    """The lease holder of one subscription's envelopes (their nats-py messages)."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        max_deliver: int,
        dead_subject: str,
        decode: Callable[[bytes], Any],
        ack_wait: float,
    ) -> None:
        self.js = js
        self.ack_wait = ack_wait
        self.stream = stream
        self.durable = durable
        self.max_deliver = max_deliver
        self.dead_subject = dead_subject
        self.decode = decode
        self.msgs: dict[tuple[int, int], Msg] = {}
        """The messages of envelopes not settled, by (sequence, delivery): a redelivery
        while an earlier delivery is still held is a different envelope."""

    @property
    def msg_id_source(self) -> str:
        """What names this stream in an id unique to a message (the NATS sink's)."""
        return f"nats.{self.stream}"

    async def envelopes(
        self, config: ConsumerConfig, batch: int, own_dead_stream: bool
    ) -> AsyncIterator[Envelope[Any]]:
        if own_dead_stream:
            await ensure_stream(
                self.js, f"{self.stream}_DLQ", subjects=[f"pgstreams.dlq.{self.stream}.>"]
            )
        sub = await self.js.pull_subscribe(
            config.filter_subject or "", durable=self.durable, stream=self.stream, config=config
        )
        logger.info("NATS consumer %s of %s: started", self.durable, self.stream)
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=_FETCH_WAIT)
                except nats.errors.TimeoutError:
                    continue
                envelopes = []
                for msg in msgs:
                    envelope = await self._envelope(msg)
                    if envelope is not None:
                        envelopes.append(envelope)
                handing = HandOut(envelopes)
                try:
                    for envelope in handing:
                        yield envelope
                finally:
                    await self.release(handing.rest)
        finally:
            await sub.unsubscribe()

    async def _envelope(self, msg: Msg) -> Envelope[Any] | None:
        seq, delivered, stored_at = _delivery(msg)
        if delivered > self.max_deliver:  # its consumer died on the last attempt
            try:
                await self._dead(msg, None)
            except NatsPublishError as exc:  # it comes again after ack_wait: try then
                logger.warning("%s", exc)
            return None
        self.msgs[seq, delivered] = msg
        return Envelope(
            self,
            id=seq,
            value=self.decode(msg.data),
            headers=codec.envelope_headers(msg.headers),
            attempts=delivered,
            enqueued_at=stored_at,
        )

    async def release(self, envelopes: Sequence[Envelope[Any]]) -> None:
        """Envelopes read but not handed out: back at once (a nak without delay)."""
        for envelope in envelopes:
            msg = self.msgs.pop((envelope.id, envelope.attempts), None)
            if msg is not None:
                await msg.nak()

    # -- LeaseHolder -------------------------------------------------------------------

    async def _ack(self, env: Envelope[Any]) -> bool:
        key = (env.id, env.attempts)
        await self.msgs[key].ack()
        del self.msgs[key]  # after: a failed ack may be tried again
        return True

    async def _nack(self, env: Envelope[Any], delay: float, error: str | None) -> bool:
        key = (env.id, env.attempts)
        msg = self.msgs[key]
        if env.attempts >= self.max_deliver:
            await self._dead(msg, error)
        else:
            await msg.nak(delay=delay or None)
        del self.msgs[key]
        return True

    async def _extend(self, env: Envelope[Any], seconds: float) -> None:
        """JetStream restarts the lease at ``ack_wait``: a longer extension is refused
        rather than silently cut short (the message would come again while held)."""
        if seconds > self.ack_wait:
            raise InvalidArgumentError(
                f"extend({seconds:g}): JetStream restarts a lease at ack_wait"
                f" ({self.ack_wait:g} s); extend by at most that, and again before it ends"
            )
        msg = self.msgs.get((env.id, env.attempts))
        if msg is None:
            raise InvalidArgumentError(f"message {env.id} was already settled")
        await msg.in_progress()

    async def _dead(self, msg: Msg, error: str | None) -> None:
        """To the dead-letter subject, then terminated; if the publish fails the message
        is left to be redelivered (and dead-lettered then)."""
        meta = msg.metadata
        headers = dict(msg.headers or {})
        headers.update(
            {
                # per durable: each consumer of the stream may dead-letter the message
                "Nats-Msg-Id": f"{self.stream}:{self.durable}:{meta.sequence.stream}",
                "Pgstreams-Dead-Subject": msg.subject,
                "Pgstreams-Dead-Sequence": str(meta.sequence.stream),
                "Pgstreams-Dead-Deliveries": str(meta.num_delivered),
            }
        )
        if error is not None:
            headers["Pgstreams-Dead-Error"] = error
        try:
            await self.js.publish(self.dead_subject, msg.data, headers=headers)
        except Exception as exc:
            raise NatsPublishError(
                f"could not dead-letter message {meta.sequence.stream} of {self.stream} to"
                f" {self.dead_subject!r} (is the subject in a stream?): {exc}"
            ) from exc
        await msg.term()
        logger.warning(
            "NATS consumer %s of %s: message %d used up max_deliver (%d) and went to %s",
            self.durable,
            self.stream,
            meta.sequence.stream,
            self.max_deliver,
            self.dead_subject,
        )


def _delivery(msg: Msg) -> tuple[int, int, datetime]:
    """A JetStream message's stream sequence, delivery count and time stored, read from
    its ack subject -- ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
    seq>.<ns>.<pending>``, or with ``<domain>.<account hash>`` before the stream and a
    token after -- without nats-py's ``metadata`` objects (a third of the source's cost
    over a bare pull and ack). Any other shape is left to ``metadata``."""
    tokens = (msg.reply or "").split(".")
    base = 2 if len(tokens) == 9 else 4 if len(tokens) in (11, 12) else 0
    if base and tokens[0] == "$JS" and tokens[1] == "ACK":
        nanos = int(tokens[base + 5])
        return (
            int(tokens[base + 3]),
            int(tokens[base + 2]),
            datetime.fromtimestamp(nanos / 1e9, UTC) if nanos else datetime.now(UTC),
        )
    meta = msg.metadata
    return meta.sequence.stream, meta.num_delivered, meta.timestamp or datetime.now(UTC)
