"""``publish``: any stream into JetStream, acking upstream only what JetStream stored.

Items are published in stream order, up to ``window`` awaiting their PubAck at once, each
with ``Nats-Msg-Id`` from the item, and handed on -- in order -- once JetStream acked it
and every earlier one. Upstream is told only then, in batches (every ``commit_every``
seconds while items come, ``commit_every`` seconds after the last one when none comes, and
when the stream closes):

* a durable change consumer's position moves to the last handed-on change (its commits are
  deferred to the sink, so it may read ahead: see ``_core.checkpoint``);
* a queue envelope is acked (a PgQueue's in one ``ack_many`` per batch);
* any other stream has nothing to tell (an auto-ack queue, a live change stream: a crash
  may lose what was read and not stored; use a durable source).

A durable source that offers no deferred commits is published one item at a time.

A PubAck that does not come within ``timeout`` seconds, a lost connection or a JetStream
that is not answering is retried -- the same message, the same ``Nats-Msg-Id``, so a
message that was stored after all is dropped by the stream's duplicate window -- with
back-off, for up to ``retry_for`` seconds; then ``NatsPublishError``. An error JetStream
gives for the message itself (too large, say) raises at once. A subject no stream takes
raises before the first message to it is sent. Either way nothing from that item on is
acked upstream. Order per subject holds while the connection does; a resend after a
connection loss may land after a later message of the same subject.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup
from nats.js import JetStreamContext

from .._core.checkpoint import Checkpoint
from .._core.envelope import Envelope
from .._core.errors import InvalidArgumentError, PayloadError
from .._core.stream import Stream
from .._core.stream_ops import give_back
from .._core.stream_tasks import DONE, NOT_READY, Failure, Stage
from .._core.validate import check_positive_int, check_seconds
from . import codec
from .errors import NatsPublishError
from .pubacks import Publisher, publisher
from .subjects import check_subject

__all__ = ["publish"]

logger = logging.getLogger("pgstreams.nats")

T = TypeVar("T")

_TRANSIENT = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,  # JetStream not up yet (subjects are checked first)
)
"""What a server outage looks like from here: worth sending again."""
_BACKOFF = (0.05, 2.0)
_KNOWN_SUBJECTS = 10_000
"""Subjects whose stream was looked up, remembered (then forgotten, and looked up again)."""


@dataclass(slots=True)
class _Out:
    """One item on its way: what was sent, and the PubAck to come."""

    item: Any
    subject: str
    body: bytes
    headers: dict[str, str]
    ack: Any = None  # the asyncio future of its PubAck
    token: str | None = None
    failing_since: float | None = field(default=None)


def publish(
    js: JetStreamContext,
    *,
    subject: str | Callable[[Any], str],
    msg_id: Callable[[Any], str] | None = None,
    serializer: Callable[[Any], bytes] | None = None,
    headers: Callable[[Any], Mapping[str, str]] | None = None,
    window: int = 256,
    timeout: float = 10.0,
    retry_for: float = 60.0,
    commit_every: float = 0.1,
) -> Callable[[Stream[T]], Stream[T]]:
    """An operator for ``through()`` (see module docstring). ``subject``: a subject, or a
    function of the item giving one. ``msg_id``, ``serializer``: see ``codec``. ``headers``:
    a function of the item giving more headers."""
    if isinstance(subject, str):
        check_subject(subject)
    elif not callable(subject):
        raise InvalidArgumentError(f"subject must be a str or a function of the item: {subject!r}")
    for name, fn in (("msg_id", msg_id), ("serializer", serializer), ("headers", headers)):
        if fn is not None and not callable(fn):
            raise InvalidArgumentError(f"{name} must be a function of the item, got {fn!r}")
    check_positive_int("window", window)
    sink = _Sink(
        js,
        subject,
        msg_id or codec.default_msg_id,
        serializer,
        headers,
        check_seconds("timeout", timeout, allow_zero=False),
        check_seconds("retry_for", retry_for),
        check_seconds("commit_every", commit_every),
    )

    def operator(upstream: Stream[T]) -> Stream[T]:
        deferred = upstream._deferring()
        if deferred is not None:
            source, checkpoint = deferred
        elif upstream._sequential is not None:
            # Asking for the next item commits the last: one at a time, each stored first.
            serial: Stream[Any] = upstream.map(sink.send).map(sink.stored)
            return serial._pipe(lambda items: sink.settle(items, _Teller(None, 0)))
        else:
            source, checkpoint = upstream, None
        teller = _Teller(checkpoint, sink.commit_every)
        stored: Stream[Any] = source._staged(
            "psn.publish", lambda tg: _Publishing(tg, source, sink, window, teller)
        )
        return stored._pipe(lambda items: sink.settle(items, teller))

    return operator


class _Sink:
    def __init__(
        self,
        js: JetStreamContext,
        subject: str | Callable[[Any], str],
        msg_id: Callable[[Any], str],
        serializer: Callable[[Any], bytes] | None,
        headers: Callable[[Any], Mapping[str, str]] | None,
        timeout: float,
        retry_for: float,
        commit_every: float,
    ) -> None:
        self.js = js
        self.subject = subject
        self.msg_id = msg_id
        self.serializer = serializer
        self.headers = headers
        self.timeout = timeout
        self.retry_for = retry_for
        self.commit_every = commit_every
        self.bound: set[str] = set()  # subjects a stream is known to take
        self.publisher: Publisher | None = None

    # -- sending -----------------------------------------------------------------------

    async def send(self, item: Any) -> _Out:
        """Encode ``item`` and send it (in stream order: this runs for one item at a time).
        A queue envelope that cannot be sent -- its payload, subject or id refused -- is
        nacked with the reason (so a message that never can be ends in the dead set rather
        than blocking the relay); one that NATS did not take is left alone (an outage must
        not use up a healthy message's attempts)."""
        try:
            return await self._send_item(item)
        except (PayloadError, InvalidArgumentError, ValueError, TypeError) as exc:
            if isinstance(item, Envelope) and not item.settled:
                with anyio.CancelScope(shield=True):
                    await item.nack(error=f"not published to NATS: {exc}")
            raise

    async def _send_item(self, item: Any) -> _Out:
        subject = self.subject if isinstance(self.subject, str) else self._subject_of(item)
        body = codec.serialized(self.serializer, item)
        headers = codec.default_headers(item)
        if self.headers is not None:
            headers.update(self._extra_headers(item))
        key = self.msg_id(item)
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"msg_id must give a non-empty str, got {key!r}")
        headers["Nats-Msg-Id"] = key
        out = _Out(item, subject, body, headers)
        if subject not in self.bound:
            await self._retrying(out, self._check_bound)
        try:
            await self._send(out)
        except _TRANSIENT as exc:
            await self._after_failure(out, exc)
            await self._retrying(out, self._send)
        return out

    def _subject_of(self, item: Any) -> str:
        assert not isinstance(self.subject, str)
        try:
            subject = self.subject(item)
        except Exception as exc:
            raise InvalidArgumentError(f"subject= failed on {item!r}: {exc}") from exc
        if type(subject) is str and subject in self.bound:
            return subject  # checked when it was bound
        return check_subject(subject)

    def _extra_headers(self, item: Any) -> dict[str, str]:
        assert self.headers is not None
        extra = dict(self.headers(item))
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise PayloadError(f"headers= must give str names and values, got {extra!r}")
        for name in extra:
            if not codec.HEADER_NAME.fullmatch(name):
                raise PayloadError(f"headers=: {name!r} is not a valid header name")
        return extra

    async def _check_bound(self, out: _Out) -> None:
        try:
            await self.js.find_stream_name_by_subject(out.subject)
        except nats.js.errors.NotFoundError:
            raise NatsPublishError(
                f"no JetStream stream takes subject {out.subject!r}: add it to a stream's"
                " subjects (psn.ensure_stream)"
            ) from None
        if len(self.bound) >= _KNOWN_SUBJECTS:
            self.bound.clear()
        self.bound.add(out.subject)

    async def _send(self, out: _Out) -> None:
        if self.publisher is None:
            self.publisher = await publisher(self.js)
        out.token, out.ack = await self.publisher.send(
            out.subject, out.body, out.headers, out.token
        )

    async def _retrying(self, out: _Out, attempt: Callable[[_Out], Any]) -> None:
        """``attempt(out)`` until it works or ``retry_for`` has passed since it first failed."""
        while True:
            try:
                await attempt(out)
                return
            except _TRANSIENT as exc:
                await self._after_failure(out, exc)

    async def _after_failure(self, out: _Out, exc: BaseException) -> None:
        now = anyio.current_time()
        if out.failing_since is None:
            out.failing_since = now
        waited = now - out.failing_since
        if waited >= self.retry_for:
            raise NatsPublishError(
                f"JetStream did not store the message for {out.subject!r} within"
                f" {self.retry_for:g} s: {exc or type(exc).__name__}"
            ) from exc
        delay = min(_BACKOFF[0] * 2 ** math.floor(math.log2(1 + waited / _BACKOFF[0])), _BACKOFF[1])
        logger.warning(
            "NATS publish to %s: %s; sending again in %.2f s",
            out.subject,
            exc or type(exc).__name__,
            delay,
        )
        await anyio.sleep(delay)

    # -- waiting for PubAcks -----------------------------------------------------------

    async def stored(self, out: _Out, behind: Callable[[], Iterable[_Out]] = tuple) -> Any:
        """Wait for ``out``'s PubAck. While the server is away, send it again -- and the
        messages ``behind()`` it, in order, as theirs are as lost."""
        if _stored(out.ack):
            return out.item  # the common case: no timer needed
        while True:
            try:
                with anyio.fail_after(self.timeout):
                    await out.ack
            except _TRANSIENT as exc:
                await self._after_failure(out, exc)
            except nats.js.errors.APIError as exc:
                raise NatsPublishError(
                    f"JetStream refused the message for {out.subject!r}: {exc}"
                ) from exc
            else:
                if out.failing_since is not None:
                    logger.info("NATS publish to %s: stored after all", out.subject)
                return out.item
            await self._retrying(out, self._send)
            for later in behind():
                if not _stored(later.ack):
                    await self._retrying(later, self._send)

    # -- telling upstream --------------------------------------------------------------

    async def settle(self, items: AsyncIterator[Any], teller: _Teller) -> AsyncIterator[Any]:
        """Hand on stored items in order; commit or ack them upstream in batches."""
        try:
            async for item in items:
                await teller.handed(item)
                yield item
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await teller.tell()


class _Teller:
    """What was handed on and not yet told upstream: told every ``every`` seconds while
    items come, when none has come for ``every`` seconds (the publishing stage asks), and
    at the end -- so a burst's tail is not left waiting for the next item (a durable
    consumer's lag, a queue message's lease running out)."""

    def __init__(self, checkpoint: Checkpoint | None, every: float) -> None:
        self.checkpoint = checkpoint
        self.every = every
        self.done: list[Any] = []
        self._told_at = time.monotonic()

    async def handed(self, item: Any) -> None:
        self.done.append(item)
        if time.monotonic() - self._told_at >= self.every:
            await self.tell()

    async def tell(self) -> None:
        self._told_at = time.monotonic()
        await _tell(self.done, self.checkpoint)


class _Publishing(Stage[Any]):
    """The pipeline: a producer task reads upstream and sends, up to ``window`` messages
    ahead; the consumer takes them in order, each once JetStream stored it."""

    def __init__(
        self, tg: TaskGroup, src: Stream[Any], sink: _Sink, window: int, teller: _Teller
    ) -> None:
        self._src = src
        self._sink = sink
        self._window = window
        self._teller = teller
        super().__init__(tg, window)

    async def _produce(self) -> None:
        batch = max(1, self._window // 4)  # wake when a quarter of the window is free
        try:
            async with self._src:
                async for item in self._src:
                    if self._handoff.full():
                        await self._handoff.room(batch)
                    try:
                        out = await self._sink.send(item)
                    except BaseException:
                        await self._put_back(item)
                        raise
                    self._handoff.put_nowait(0, out)
        except Exception as exc:
            self._handoff.put_nowait(0, Failure(exc))
            return
        self._handoff.put_nowait(0, DONE)

    async def __anext__(self) -> Any:
        out = self._handoff.take_ready(_ready)  # the common case: its PubAck is in
        if out is not NOT_READY:
            return out.item
        if self._teller.done:  # items handed on wait to be told: not for long
            with anyio.move_on_after(self._teller.every) as idle:
                await self._handoff.arrival()  # takes nothing: safe to cut short
            if idle.cancelled_caught:
                await self._teller.tell()
        _, msg = await self._next_message()
        return await self._stored(msg)

    async def _give_back(self, leftovers: dict[int, list[Any]]) -> None:
        """Items sent or not, never handed on: back to their source (a queue's leases
        released -- JetStream drops a resend of one it stored -- and a change consumer's
        commits are deferred, so they come again anyway)."""
        items = [out.item for out in leftovers.get(0, []) if isinstance(out, _Out)]
        await give_back(self._src._putback, items)

    async def _put_back(self, item: Any) -> None:
        """An item that will not be handed on, unless settled already: to its source."""
        if not (isinstance(item, Envelope) and item.settled):
            await give_back(self._src._putback, [item])

    async def _stored(self, msg: Any) -> Any:
        if msg is DONE:
            await self._end()
        try:
            return await self._sink.stored(msg, self._handoff.pending)
        except Exception as exc:
            await self.aclose()
            if isinstance(exc.__cause__, nats.js.errors.APIError) and isinstance(
                msg.item, Envelope
            ):  # JetStream refused the message itself: it never will take it
                with anyio.CancelScope(shield=True):
                    await msg.item.nack(error=f"not published to NATS: {exc}")
            else:
                await self._put_back(msg.item)
            raise


def _ready(entry: Any) -> bool:
    """Whether a hand-off entry is a message JetStream stored."""
    return type(entry) is _Out and _stored(entry.ack)


def _stored(ack: Any) -> bool:
    """Whether a PubAck future resolved without an error."""
    return ack is not None and ack.done() and not ack.cancelled() and ack.exception() is None


async def _tell(done: list[Any], checkpoint: Checkpoint | None) -> None:
    """Commit (a checkpoint) or ack (envelopes) what ``done`` holds, and empty it."""
    if not done:
        return
    items = done[:]
    done.clear()
    if checkpoint is not None:
        await checkpoint.commit(items[-1])
        return
    envelopes = [e for e in items if isinstance(e, Envelope) and not e.settled]
    by_holder: dict[int, list[Envelope[Any]]] = {}
    for envelope in envelopes:
        by_holder.setdefault(id(envelope._queue), []).append(envelope)
    for group in by_holder.values():
        ack_many = getattr(group[0]._queue, "ack_many", None)
        if ack_many is not None:
            await ack_many(group)
        else:
            for envelope in group:
                await envelope.ack()
