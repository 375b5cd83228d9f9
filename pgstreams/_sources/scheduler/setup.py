"""What every part of one Scheduler shares: its database, clock, statements, NOTIFY
channels and settings, checked once; and the nap its loops take between rounds."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
from psycopg import sql

from ..._core.clock import Clock, SystemClock
from ..._core.errors import InvalidArgumentError
from ..._core.source import channel_for
from ..._core.validate import check_seconds
from ..._pg import queries
from ..._pg.database import Database
from ..._pg.listen import Wakeup

__all__ = ["Setup", "nap"]


@dataclass(frozen=True, slots=True)
class Setup:
    """One Scheduler's shared, immutable configuration (see ``Scheduler`` for the settings)."""

    db: Database
    instance_id: str
    clock: Clock
    poll: float
    grace: timedelta
    lease: float
    keep: timedelta
    queries: Mapping[str, bytes]
    changed: str
    """NOTIFY channel: a schedule was registered or resumed (wakes the leader)."""
    ticked: str
    """NOTIFY channel: ticks were made or freed (wakes consumers, in every process)."""

    @classmethod
    def create(
        cls,
        db: Database,
        *,
        instance_id: str | None,
        clock: Clock | None,
        poll_interval: float,
        grace: float,
        lease: float,
        keep_history: timedelta,
    ) -> Setup:
        """Check the settings (raising before anything else happens) and render the SQL."""
        if instance_id is None:
            instance_id = uuid.uuid4().hex
        elif not isinstance(instance_id, str) or not instance_id:
            raise InvalidArgumentError(f"instance_id must be a non-empty str, got {instance_id!r}")
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        late = timedelta(seconds=check_seconds("grace", grace))
        held = check_seconds("lease", lease, allow_zero=False)
        if not isinstance(keep_history, timedelta) or keep_history <= timedelta(0):
            raise InvalidArgumentError(
                f"keep_history must be a positive timedelta, got {keep_history!r}"
            )
        names = {
            "schedules": sql.Identifier(db.schema, "schedules"),
            "ticks": sql.Identifier(db.schema, "schedule_ticks"),
            "state": sql.Identifier(db.schema, "scheduler_state"),
        }
        return cls(
            db=db,
            instance_id=instance_id,
            clock=SystemClock() if clock is None else clock,
            poll=poll,
            grace=late,
            lease=held,
            keep=keep_history,
            queries=queries.render(queries.load(__package__), names),
            changed=channel_for(db.schema, "scheduler", "schedules"),
            ticked=channel_for(db.schema, "scheduler", "ticks"),
        )


async def nap(clock: Clock, wake: Wakeup, seconds: float, *, watch: int | None = None) -> None:
    """Sleep ``seconds`` on ``clock``, or until ``wake`` fires (or the socket ``watch``
    becomes readable), whichever comes first."""
    if seconds <= 0:
        return
    if isinstance(clock, SystemClock) and watch is None:
        await wake.wait(seconds)
        return
    async with anyio.create_task_group() as tg:

        async def until(event: Awaitable[Any]) -> None:
            await event
            tg.cancel_scope.cancel()

        tg.start_soon(until, wake.wait(seconds))
        if not isinstance(clock, SystemClock):
            tg.start_soon(until, clock.sleep(seconds))
        if watch is not None:
            tg.start_soon(until, anyio.wait_readable(watch))
