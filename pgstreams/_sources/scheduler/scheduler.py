"""Scheduler: durable cron and interval schedules whose ticks arrive as a stream.

Schedules and their ticks live in PostgreSQL, so the parts can run in different processes:

* ``register``/``unregister``/``pause``/``trigger_now``/... are plain statements (registry).
* Inside ``async with sched.running()`` the instance campaigns for leadership; the leader
  turns due fire times into tick rows (leader, firing). A unique (schedule, fire time)
  index makes each fire time one tick, however many leaders there ever were.
* ``stream()`` hands each tick to one consumer across processes, in any process -- it
  needs neither the leader nor ``running()`` (delivery).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import anyio

from ..._core.clock import Clock
from ..._core.errors import PgStreamsError
from ..._core.stream import Stream
from ..._pg.database import Database
from .delivery import TickDelivery
from .leader import Leader
from .model import Overlap, Schedule, ScheduleTick
from .registry import ScheduleRegistry
from .setup import Setup

__all__ = ["Overlap", "Schedule", "ScheduleTick", "Scheduler"]


class Scheduler(ScheduleRegistry):
    """Durable cron/interval schedules (see module docstring).

    ``poll_interval``: how often a follower tries to take over and the longest a leader or
    consumer sleeps. ``grace``: how late a fire time may be handled and still count as on
    time. ``lease``: seconds a consumer holds a tick before another may take it, renewed
    while ``running()``. ``keep_history``: how long done, skipped and cancelled ticks are
    kept (by fire time) before the leader deletes them, whether or not their schedule is
    still registered.
    """

    def __init__(
        self,
        db: Database,
        *,
        instance_id: str | None = None,
        clock: Clock | None = None,
        poll_interval: float = 1.0,
        grace: float = 10.0,
        lease: float = 60.0,
        keep_history: timedelta = timedelta(days=7),
    ) -> None:
        setup = Setup.create(
            db,
            instance_id=instance_id,
            clock=clock,
            poll_interval=poll_interval,
            grace=grace,
            lease=lease,
            keep_history=keep_history,
        )
        super().__init__(setup)
        self.instance_id = setup.instance_id
        self._leader = Leader(setup)
        self._delivery = TickDelivery(setup)
        self._running = False

    @property
    def is_leader(self) -> bool:
        """True while this instance holds the leader lock (as last seen)."""
        return self._leader.is_leader

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Scheduler]:
        """Take part in leader election (the leader emits ticks) and keep the leases of
        ticks this instance hands out, until the block exits."""
        if self._running:
            raise PgStreamsError("this Scheduler is already running")
        await self._db.ensure_migrated()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._leader.campaign)
            tg.start_soon(self._delivery.keep_leases)
            self._running = True
            try:
                yield self
            finally:
                self._running = False
                tg.cancel_scope.cancel()

    def stream(self, schedule_id: str | None = None) -> Stream[ScheduleTick]:
        """Ticks of one schedule (or all), each to one consumer across processes.

        Works in any process, leader or not, inside ``running()`` or not: it reads the
        ticks the leader writes. A tick is done when the next is asked for or the stream
        closes cleanly. Its lease is renewed while this instance is ``running()``;
        otherwise a tick held longer than ``lease`` seconds may go to another consumer.
        Ticks of a schedule that is not registered (any more) are not delivered.
        """
        return self._delivery.stream(schedule_id)

    def __repr__(self) -> str:
        return f"Scheduler(instance_id={self.instance_id!r})"
