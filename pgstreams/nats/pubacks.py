"""Publishing to JetStream with PubAcks awaited later, for the sink's pipeline.

nats-py's ``publish_async`` does the same job at twice the cost per message (a timed
semaphore wait and a token per message); the sink bounds what is in flight itself, so
here a message is one core ``publish`` with a reply subject under one inbox subscription,
and a future its PubAck resolves: to None, or to the error JetStream answered
(``NoStreamResponseError`` when no stream answered at all). A PubAck is parsed only when
it carries an error.
"""

from __future__ import annotations

import asyncio
import json
from itertools import count
from typing import Any
from weakref import WeakKeyDictionary

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

__all__ = ["Publisher", "publisher"]

_STATUS = "Status"
_NO_RESPONDERS = "503"

_PUBLISHERS: WeakKeyDictionary[Client, Publisher] = WeakKeyDictionary()


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
        await self._client.publish(subject, body, reply=self._prefix + token, headers=headers)
        return token, future

    async def _answered(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[self._cut :], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
        elif b'"error"' in msg.data:
            try:
                answer: dict[str, Any] = json.loads(msg.data)
                future.set_exception(APIError.from_error(answer["error"]))
            except (ValueError, KeyError, TypeError) as exc:
                future.set_exception(exc)
        else:
            future.set_result(None)
