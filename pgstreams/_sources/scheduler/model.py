"""What the Scheduler stores and hands out: schedules and ticks, and how rows become them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ..._core.errors import InvalidArgumentError
from .timing import Timing, check_interval, check_zone

__all__ = [
    "OVERLAPS",
    "Overlap",
    "Schedule",
    "ScheduleTick",
    "check_id",
    "schedule_of",
    "tick_of",
    "timing_of",
]

Overlap = Literal["skip", "allow", "queue_one"]
OVERLAPS: tuple[Overlap, ...] = ("skip", "allow", "queue_one")
ID_MAX_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Schedule:
    """A registered schedule, as stored."""

    id: str
    name: str | None
    cron: str | None
    interval: float | None
    timezone: str
    max_catch_up: int
    jitter: float
    overlap: Overlap
    metadata: dict[str, Any]
    paused: bool
    next_fire_at: datetime | None
    """The next fire time the leader will act on (None: the expression never fires again)."""
    anchor: datetime
    """When the timing was set: interval schedules fire at ``anchor + k * interval``."""
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ScheduleTick:
    """One fire time of a schedule, delivered to one consumer.

    ``catch_up``: a missed fire time emitted late (after downtime) or a backfilled one.
    ``manual``: made by ``trigger_now`` or ``backfill``. ``jitter``: seconds added to
    ``scheduled_at`` to get ``due_at``, when it became deliverable. ``status`` is
    ``pending``, ``running``, ``done``, ``skipped`` (overlap) or ``cancelled`` (its
    schedule was unregistered before it was delivered) as of reading.
    """

    schedule_id: str
    scheduled_at: datetime
    fired_at: datetime | None
    catch_up: bool
    metadata: dict[str, Any]
    manual: bool = False
    jitter: float = 0.0
    due_at: datetime | None = None
    done_at: datetime | None = None
    status: str = "running"
    attempt: int = 1
    id: int = 0


def check_id(id: object) -> str:
    """``id`` if it can name a schedule."""
    if not isinstance(id, str) or not id:
        raise InvalidArgumentError(f"schedule id must be a non-empty str, got {id!r}")
    if len(id) > ID_MAX_LENGTH:
        raise InvalidArgumentError(
            f"schedule id is {len(id)} characters; the limit is {ID_MAX_LENGTH}"
        )
    if "\x00" in id:
        raise InvalidArgumentError("schedule id must not contain NUL")
    return id


def timing_of(schedule: Schedule) -> Timing:
    micros = None if schedule.interval is None else check_interval(schedule.interval)
    return Timing(schedule.cron, micros, check_zone(schedule.timezone), schedule.anchor)


_SCHEDULE_FIELDS = (
    "id",
    "name",
    "cron",
    "interval",
    "timezone",
    "anchor",
    "max_catch_up",
    "jitter",
    "overlap",
    "metadata",
    "paused",
    "next_fire_at",
    "created_at",
    "updated_at",
)
"""Schedule's fields in the order of ``_schedule_columns`` (queries.sql)."""

_TICK_FIELDS = (
    "id",
    "schedule_id",
    "scheduled_at",
    "due_at",
    "fired_at",
    "done_at",
    "kind",
    "status",
    "jitter",
    "metadata",
    "attempt",
)
"""ScheduleTick's fields in the order of ``_tick_columns`` (``kind`` stands for ``catch_up``
and ``manual``)."""


def schedule_of(row: Any) -> Schedule:
    """A ``_schedule_columns`` row as a Schedule."""
    values = dict(zip(_SCHEDULE_FIELDS, row, strict=True))
    if values["interval"] is not None:  # stored in whole microseconds
        values["interval"] /= 1_000_000
    return Schedule(**values)


def tick_of(row: Any) -> ScheduleTick:
    """A ``_tick_columns`` row as a ScheduleTick."""
    values = dict(zip(_TICK_FIELDS, row, strict=True))
    kind = values.pop("kind")
    values["catch_up"] = kind in ("catch_up", "backfill")
    values["manual"] = kind in ("manual", "backfill")
    return ScheduleTick(**values)
