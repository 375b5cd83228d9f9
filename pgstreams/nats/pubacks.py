"""Publishing to JetStream with PubAcks awaited later, for the sink's pipeline.

nats-py's ``publish_async`` does the same job at twice the cost per message (a timed
semaphore wait and a token per message); the sink bounds what is in flight itself, so
here a message is one core ``publish`` with a reply subject under one inbox subscription,
and a future its PubAck resolves: to None, or to the error JetStream answered
(``NoStreamResponseError`` when no stream answered at all). A PubAck is parsed only when
it carries an error.

A message is written as nats-py's own ``publish`` would write it (the same checks on the
connection, the same HPUB command, the same flush), with its header block built here in
one go: nats-py's header loop was the largest single cost of the sink. A client that lacks
the internals this needs gets the plain ``publish``.
"""

from __future__ import annotations

import asyncio
import json
from itertools import count
from typing import Any
from weakref import WeakKeyDictionary

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

__all__ = ["Publisher", "publisher"]

_STATUS = "Status"
_NO_RESPONDERS = "503"

_PUBLISHERS: WeakKeyDictionary[Client, Publisher] = WeakKeyDictionary()
_INTERNALS = (
    "_send_command",
    "_flush_pending",
    "_flush_queue",
    "_pending_data_size",
    "_max_pending_size",
    "_max_payload",
    "stats",
)
"""What writing a message directly takes of a nats-py client."""
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def header_block(headers: dict[str, str]) -> bytes:
    """The NATS/1.0 header block of ``headers``, as nats-py writes it (values stripped,
    line breaks made spaces). Names are valid header tokens: the sink checks them."""
    lines = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        value = value.strip()
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def _refusal(error: dict[str, Any]) -> Exception:
    """The error JetStream answered, as nats-py's class for it (``from_error`` raises it)."""
    try:
        APIError.from_error(error)
    except APIError as exc:
        return exc
    except (KeyError, TypeError) as exc:  # not the shape of an error
        return exc
    return APIError(**error)


def writes_directly(client: Client) -> bool:
    """Whether ``client`` has what writing a message directly takes."""
    return all(hasattr(client, name) for name in _INTERNALS)


async def publisher(js: JetStreamContext) -> Publisher:
    """The publisher of ``js``'s client (one per client, made on first use)."""
    client = js._nc
    found = _PUBLISHERS.get(client)
    if found is None or found.closed:
        found = Publisher(client)
        await found.start()
        _PUBLISHERS[client] = found
    return found


class Publisher:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._prefix = client.new_inbox() + "."
        self._cut = len(self._prefix)
        self._tokens = count()
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._direct = writes_directly(client)
        self.closed = False

    async def start(self) -> None:
        await self._client.subscribe(self._prefix + "*", cb=self._answered)

    async def send(
        self, subject: str, body: bytes, headers: dict[str, str], replaces: str | None = None
    ) -> tuple[str, asyncio.Future[None]]:
        """Send one message: its token and a future resolved when JetStream answers (never,
        if the message or its answer was lost: the caller times out and sends it again,
        naming the token it ``replaces``)."""
        if replaces is not None:
            self._waiting.pop(replaces, None)
        token = str(next(self._tokens))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        if self._direct:
            await self._write(subject, self._prefix + token, body, headers)
        else:
            await self._client.publish(subject, body, reply=self._prefix + token, headers=headers)
        return token, future

    async def _write(self, subject: str, reply: str, body: bytes, headers: dict[str, str]) -> None:
        """``Client.publish(subject, body, reply=reply, headers=headers)``, less its cost."""
        client = self._client
        if client.is_closed:
            raise nats.errors.ConnectionClosedError
        if client.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        size = len(body)
        if not client.is_connected and (
            client._max_pending_size <= 0
            or size + client._pending_data_size > client._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        if size > client._max_payload:
            raise nats.errors.MaxPayloadError
        block = header_block(headers)
        await client._send_command(
            b"HPUB %s %s %d %d\r\n%s%s\r\n"
            % (subject.encode(), reply.encode(), len(block), len(block) + size, block, body)
        )
        client.stats["out_msgs"] += 1
        client.stats["out_bytes"] += size
        if client._flush_queue is not None and client._flush_queue.empty():
            await client._flush_pending()

    async def _answered(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[self._cut :], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
        elif b'"error"' in msg.data:  # maybe: a stream may be named "error" too
            try:
                answer: dict[str, Any] = json.loads(msg.data)
            except ValueError as exc:
                future.set_exception(exc)
                return
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
                future.set_exception(_refusal(answer["error"]))
            else:
                future.set_result(None)
        else:
            future.set_result(None)
