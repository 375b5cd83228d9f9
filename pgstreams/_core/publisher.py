"""``publish`` and ``publish_batch`` as every queue offers them: the arguments are checked
and encoded here, before anything is sent; each queue supplies the statement."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, TypeVar

from . import telemetry
from .validate import check_seconds, headers_json, to_json

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ["Publisher", "Sending"]

T = TypeVar("T")


class Publisher(Generic[T]):
    """The publishing half of a queue. Bad payloads, headers or delays raise before
    anything is sent."""

    _kind: ClassVar[str]
    name: str

    async def publish(
        self,
        value: T,
        *,
        delay: float = 0,
        headers: Mapping[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> int:
        """Publish one message; returns its id.

        With ``conn`` the message joins that connection's current transaction: it exists
        (and subscribers are woken) only if and when the caller commits.
        """
        payload = to_json("message", value)
        how = Sending(_headers(headers), check_seconds("delay", delay), conn)
        msg_id = await self._send(payload, how)
        if (tel := telemetry.otel) is not None:
            tel.published(self._kind, self.name, 1)
        return msg_id

    async def publish_batch(
        self,
        values: Iterable[T],
        *,
        delay: float = 0,
        headers: Mapping[str, Any] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> list[int]:
        """Publish many messages in one statement (all or none); returns their ids in
        order. ``conn`` as for :meth:`publish`."""
        payloads = [to_json(f"message {i}", v) for i, v in enumerate(values)]
        how = Sending(_headers(headers), check_seconds("delay", delay), conn)
        if not payloads:
            return []
        ids = await self._send_batch(payloads, how)
        if (tel := telemetry.otel) is not None:
            tel.published(self._kind, self.name, len(ids))
        return ids

    async def _send(self, payload: str, how: Sending) -> int:
        """Send one message (``payload`` is JSON text); its id."""
        raise NotImplementedError

    async def _send_batch(self, payloads: list[str], how: Sending) -> list[int]:
        """Send many messages (at least one) in one statement; their ids in order."""
        raise NotImplementedError


class Sending(NamedTuple):
    """How messages are sent: ``headers`` as JSON text (None: none), ``delay`` in seconds,
    and the caller's connection to join (None: a lent one)."""

    headers: str | None
    delay: float
    conn: AsyncConnection[Any] | None


def _headers(headers: Mapping[str, Any] | None) -> str | None:
    return None if headers is None else headers_json(headers)
