"""Fire times of a schedule: cron expressions in an IANA time zone, or fixed intervals.

Cron expressions are evaluated on the zone's wall clock (croniter on naive local times) and
each wall time is then placed on the timeline:

* a wall time that happens twice (clocks going back) fires once, at its first occurrence;
* a wall time that never happens (clocks going forward) fires once, at the moment the
  clocks jump -- a 02:30 job on a spring-forward day runs at 03:00 daylight time.

That placement never moves a later wall time before an earlier one, so walking forwards and
backwards give the same fire times. Interval schedules are ``anchor + k * interval`` in
whole microseconds, so every process computes exactly the same instants.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterBadDateError, croniter

from ..._core.errors import InvalidArgumentError

__all__ = ["Timing", "check_cron", "check_interval", "check_zone"]

_SECOND = timedelta(seconds=1)
_HOST_ALIASES = frozenset({"localtime", "posixrules", "Factory"})
_RANDOM = re.compile(r"[RH](?:$|[(/])", re.IGNORECASE)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def check_cron(expr: object) -> str:
    """``expr`` if it is a cron expression: 5 fields, or 6 with seconds last (croniter's
    order), or an alias such as ``@daily``."""
    if not isinstance(expr, str):
        raise InvalidArgumentError(f"cron must be a str, got {type(expr).__name__}")
    fields = expr.split()
    if not expr.startswith("@") and len(fields) not in (5, 6):
        raise InvalidArgumentError(
            f"cron {expr!r} has {len(fields)} fields; expected 5 (minute hour day month"
            " weekday) or 6 (the same plus seconds)"
        )
    if not croniter.is_valid(expr):
        raise InvalidArgumentError(f"cron {expr!r} is not a valid cron expression")
    if any(_RANDOM.match(part) for field in fields for part in field.split(",")):
        # croniter draws R (random) and H (hashed) values anew for every evaluation: fire
        # times would differ from one computation to the next, and ticks would be lost.
        raise InvalidArgumentError(f"cron {expr!r}: R and H fields are not supported")
    return " ".join(fields)


def check_interval(seconds: object) -> int:
    """An interval in seconds (float allowed) as whole microseconds (at least one)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidArgumentError(f"interval must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgumentError(f"interval must be a positive number of seconds: {seconds!r}")
    micros = round(seconds * 1_000_000)
    if micros < 1:
        raise InvalidArgumentError(f"interval {seconds!r} is below one microsecond")
    return micros


def check_zone(name: object) -> ZoneInfo:
    """The IANA zone ``name`` (host aliases such as ``localtime`` are refused: another host
    may read them differently)."""
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"timezone must be an IANA zone name, got {name!r}")
    if name not in _zones() or name in _HOST_ALIASES or name.startswith(("posix/", "right/")):
        raise InvalidArgumentError(f"unknown time zone {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidArgumentError(f"unknown time zone {name!r}") from exc


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones() | {"UTC"})


@dataclass(frozen=True, slots=True)
class Timing:
    """When a schedule fires: ``cron`` in ``zone``, or every ``interval_us`` from ``anchor``."""

    cron: str | None
    interval_us: int | None
    zone: ZoneInfo
    anchor: datetime

    # -- forwards / backwards ----------------------------------------------------------

    def after(self, t: datetime) -> datetime | None:
        """The first fire time strictly after ``t`` (None if the expression never fires)."""
        return next(self.forward(t), None)

    def forward(self, t: datetime) -> Iterator[datetime]:
        """Fire times strictly after ``t``, ascending."""
        if self.interval_us is not None:
            k = (_micros(t) - _micros(self.anchor)) // self.interval_us + 1
            while True:
                yield self._nth(k)
                k += 1
        assert self.cron is not None
        it = croniter(self.cron, self._wall(t))
        last = t
        for wall in _walls(it.get_next):
            instant = self._place(wall)
            if instant > last:  # wall times skipped by a jump share one instant
                last = instant
                yield instant

    def backward(self, t: datetime) -> Iterator[datetime]:
        """Fire times at or before ``t``, descending."""
        if self.interval_us is not None:
            k = (_micros(t) - _micros(self.anchor)) // self.interval_us
            while True:
                yield self._nth(k)
                k -= 1
        assert self.cron is not None
        # croniter works in whole seconds and get_prev is strictly before its start. In the
        # second pass of a repeated hour, fire times of the first pass have later wall times
        # than t's: start past them (instants after t are filtered out below).
        local = t.astimezone(self.zone)
        wall = local.replace(tzinfo=None)
        if local.fold:
            first, second = local.replace(fold=0).utcoffset(), local.utcoffset()
            if first is not None and second is not None:
                wall += first - second
        it = croniter(self.cron, wall.replace(microsecond=0) + _SECOND)
        last: datetime | None = None
        for wall in _walls(it.get_prev):
            instant = self._place(wall)
            if instant <= t and (last is None or instant < last):
                last = instant
                yield instant

    def between(self, start: datetime, end: datetime, limit: int) -> list[datetime]:
        """Fire times in ``[start, end]``; raises if there are more than ``limit``."""
        found: list[datetime] = []
        for f in self.forward(start - timedelta(microseconds=1)):
            if f > end:
                break
            if len(found) == limit:
                raise InvalidArgumentError(
                    f"{start} .. {end} holds more than {limit} fire times; split the range"
                )
            found.append(f)
        return found

    # -- helpers -----------------------------------------------------------------------

    def _nth(self, k: int) -> datetime:
        assert self.interval_us is not None
        return self.anchor + timedelta(microseconds=k * self.interval_us)

    def _wall(self, t: datetime) -> datetime:
        return t.astimezone(self.zone).replace(tzinfo=None)

    def _place(self, wall: datetime) -> datetime:
        """The instant a local wall time fires at (see module docstring)."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        if self._wall(first) == wall:
            return first  # exists; the first occurrence if it happens twice
        # Skipped by a jump forward: fire when the clocks jump, the first instant whose wall
        # time is past ``wall``. fold=1 places it before the jump, fold=0 after it.
        lo = int(wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC).timestamp())
        hi = math.ceil(first.timestamp())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._wall(datetime.fromtimestamp(mid, UTC)) >= wall:
                hi = mid
            else:
                lo = mid
        return datetime.fromtimestamp(hi, UTC)


def _micros(t: datetime) -> int:
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _walls(step: Callable[[type[datetime]], datetime]) -> Iterator[datetime]:
    """The wall times croniter's ``get_next``/``get_prev`` give, until it finds no more."""
    while True:
        try:
            yield step(datetime)
        except CroniterBadDateError:
            return
