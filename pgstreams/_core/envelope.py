"""``Envelope[T]``: a leased message handed to a manual-ack consumer, shared by all queues."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from .errors import InvalidArgumentError
from .validate import check_seconds

__all__ = ["DeadMessage", "Envelope", "LeaseHolder"]

T = TypeVar("T")


class LeaseHolder(Protocol):
    """What a queue implements so its envelopes can settle themselves."""

    async def _ack(self, env: Envelope[Any]) -> bool: ...
    async def _nack(self, env: Envelope[Any], delay: float, error: str | None) -> bool: ...
    async def _extend(self, env: Envelope[Any], seconds: float) -> None: ...


class Envelope(Generic[T]):
    """A message under lease: settle it with ``ack()`` or ``nack()`` before the lease ends.

    If the lease (the visibility timeout) expires first, the message becomes visible to
    other consumers again and ``attempts`` grows on its next delivery. ``ack``/``nack``
    return False when that has already happened and another consumer holds it now.
    """

    __slots__ = (
        "_lease",
        "_queue",
        "_settled",
        "attempts",
        "enqueued_at",
        "headers",
        "id",
        "value",
    )

    def __init__(
        self,
        queue: LeaseHolder,
        *,
        id: int,
        value: T,
        headers: Mapping[str, Any],
        attempts: int,
        enqueued_at: datetime,
        lease: int = 0,
    ) -> None:
        self._queue = queue
        self._lease = lease
        self._settled = False
        self.id = id
        self.value = value
        self.headers = headers
        self.attempts = attempts
        self.enqueued_at = enqueued_at

    @property
    def settled(self) -> bool:
        """True once ``ack`` or ``nack`` has been called."""
        return self._settled

    def _check_unsettled(self) -> None:
        if self._settled:
            raise InvalidArgumentError(f"message {self.id} was already acked or nacked")

    async def ack(self) -> bool:
        """Mark the message done (it is removed); False if the lease had been lost.

        If the call fails (the connection dropped, say) the envelope stays unsettled, so it
        may be retried.
        """
        self._check_unsettled()
        held = await self._queue._ack(self)
        self._settled = True
        return held

    async def nack(self, delay: float = 0, error: str | None = None) -> bool:
        """Give the message back, visible again after ``delay`` seconds, recording ``error``.

        Once it has been delivered ``max_attempts`` times it goes to the dead set instead.
        Returns False if the lease had been lost.
        """
        seconds = check_seconds("delay", delay)
        if error is not None and not isinstance(error, str):
            raise InvalidArgumentError("error must be a str or None")
        self._check_unsettled()
        held = await self._queue._nack(self, seconds, error)
        self._settled = True
        return held

    async def extend(self, seconds: float) -> None:
        """Push the lease's end to ``seconds`` from now; raises LeaseLostError if it is gone."""
        seconds = check_seconds("seconds", seconds, allow_zero=False)
        self._check_unsettled()
        await self._queue._extend(self, seconds)

    def __repr__(self) -> str:
        return f"Envelope(id={self.id}, attempts={self.attempts}, value={self.value!r})"


@dataclass(frozen=True, slots=True)
class DeadMessage:
    """A message in the dead set, with the error of its last attempt."""

    id: int
    value: Any
    headers: Mapping[str, Any]
    attempts: int
    enqueued_at: datetime
    dead_at: datetime
    last_error: str | None
