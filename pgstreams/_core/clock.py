"""The scheduler's notion of time: the system clock, or a manual one for tests.

Schedule time (fire times, due times, ``fired_at``) comes from a :class:`Clock`. Leases on
delivered ticks do not: they measure whether a consumer is alive, which is real time on the
server whatever clock the schedules run on.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Protocol

import anyio

from .errors import InvalidArgumentError

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """What a :class:`~pgstreams.Scheduler` needs of a clock."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock."""
        ...


class SystemClock:
    """Wall-clock time in UTC; sleeps in real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock that moves only when told to (``advance``/``set``): schedules that span
    days run in milliseconds in tests. Sleepers wake as soon as the time reaches their
    deadline."""

    def __init__(self, start: datetime | None = None) -> None:
        start = datetime(2026, 1, 1, tzinfo=UTC) if start is None else start
        self._now = _aware("start", start)
        self._moved = anyio.Event()

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + timedelta(seconds=max(0.0, seconds))
        while self._now < deadline:
            await self._moved.wait()

    def advance(self, seconds: float) -> datetime:
        """Move forward by ``seconds`` (>= 0); returns the new time."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise InvalidArgumentError(f"seconds must be a number, got {seconds!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise InvalidArgumentError(f"seconds must be finite and >= 0, got {seconds!r}")
        return self.set(self._now + timedelta(seconds=seconds))

    def set(self, when: datetime) -> datetime:
        """Jump to ``when``, which must not be earlier than now; returns it."""
        when = _aware("when", when)
        if when < self._now:
            raise InvalidArgumentError(f"a ManualClock does not go back ({when} < {self._now})")
        self._now = when
        self._moved.set()
        self._moved = anyio.Event()
        return when

    def __repr__(self) -> str:
        return f"ManualClock({self._now.isoformat()})"


def _aware(what: str, when: object) -> datetime:
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise InvalidArgumentError(f"{what} must be a timezone-aware datetime, got {when!r}")
    return when.astimezone(UTC)
