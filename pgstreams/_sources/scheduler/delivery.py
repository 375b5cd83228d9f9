"""The tick stream: each due tick to one consumer, in any process that has a Database.

A consumer needs no leader and no ``running()``: it claims ticks with ``FOR UPDATE SKIP
LOCKED`` from the rows the leader (wherever it runs) writes, woken by NOTIFY on the ticks
channel through the Database's shared listener, polling as the safety net. Only ticks of a
registered schedule are claimed.

A tick is done when the downstream asks for the next one or the stream closes cleanly; a
tick whose consumer fails goes back at once, and one whose consumer died comes back when
its lease (``lease`` seconds, server time) runs out. The leases of the ticks an instance
holds are renewed while that instance is ``running()``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import psycopg

from ..._core.errors import DatabaseError
from ..._core.source import Retry
from ..._core.stream import Stream, closing_cleanly
from ..._pg import calls
from .model import ScheduleTick, check_id, tick_of
from .setup import Setup, nap

__all__ = ["TickDelivery"]

logger = logging.getLogger("pgstreams.scheduler")


class TickDelivery:
    """The tick streams of one Scheduler and the leases of the ticks they hold."""

    def __init__(self, setup: Setup) -> None:
        self._setup = setup
        self._sql = setup.queries
        self._held: dict[int, int] = {}  # ticks handed out by this instance: id -> claims

    def stream(self, schedule_id: str | None) -> Stream[ScheduleTick]:
        if schedule_id is not None:
            check_id(schedule_id)
        return Stream(
            lambda: self._deliver(schedule_id),
            sequential=(
                "a schedule tick is done when the next one is asked for; handle each tick"
                " before asking for the next"
            ),
        )

    async def keep_leases(self) -> None:
        """Renew the leases of every tick this instance holds, every third of a lease,
        until cancelled."""
        setup = self._setup
        while True:
            await anyio.sleep(setup.lease / 3)
            if not self._held:
                continue
            params = {
                "ids": list(self._held),
                "claims": list(self._held.values()),
                "me": setup.instance_id,
                "lease": setup.lease,
            }
            try:
                with anyio.CancelScope(shield=True):
                    async with setup.db.connection() as conn:
                        await conn.execute(self._sql["renew"], params)
            except DatabaseError as exc:
                if not exc.transient:
                    raise
                logger.warning("scheduler %s: could not renew leases: %s", setup.instance_id, exc)

    async def _deliver(self, schedule_id: str | None) -> AsyncIterator[ScheduleTick]:
        setup = self._setup
        await setup.db.ensure_migrated()
        retry = Retry(logger, f"ticks of {schedule_id or 'every schedule'}")
        held: ScheduleTick | None = None
        try:
            async with setup.db.wakeups(setup.ticked) as wake:
                while True:
                    wake.arm()
                    try:
                        row = await self._claim(schedule_id)
                    except DatabaseError as exc:
                        await retry.after(exc)
                        continue
                    retry.reset()
                    if row is None:
                        await nap(setup.clock, wake, await self._idle(schedule_id))
                        continue
                    held = tick_of(row)
                    self._held[held.id] = held.attempt
                    yield held
                    # Asked for the next tick: the downstream is done with this one.
                    await self._settle(held, "finish", retry)
                    self._forget(held)
                    held = None
        finally:
            if held is not None:
                # A clean close finishes the tick; a failure or cancellation gives it back.
                query = "finish" if closing_cleanly() else "release"
                await calls.cleanup(
                    setup.db,
                    self._sql[query],
                    self._settle_params(held),
                    logger=logger,
                    what=f"{query} tick {held.id}",
                )
                self._forget(held)

    def _forget(self, tick: ScheduleTick) -> None:
        """Stop renewing ``tick``'s lease -- unless this instance has claimed it again."""
        if self._held.get(tick.id) == tick.attempt:
            del self._held[tick.id]

    async def _claim(self, schedule_id: str | None) -> Any:
        setup = self._setup
        params = {
            "now": setup.clock.now(),
            "schedule": schedule_id,
            "me": setup.instance_id,
            "lease": setup.lease,
        }
        while True:
            try:
                rows = await calls.fetchall_shielded(setup.db, self._sql["claim"], params)
            except DatabaseError as exc:
                if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                    # Another consumer started a serial tick of that schedule as we did;
                    # this statement's snapshot missed it, the next one will not.
                    await anyio.lowlevel.checkpoint()
                    continue
                raise
            return rows[0] if rows else None

    async def _idle(self, schedule_id: str | None) -> float:
        setup = self._setup
        params = {"now": setup.clock.now(), "schedule": schedule_id}
        return await calls.idle_wait(setup.db, self._sql["next_due"], setup.poll, params)

    def _settle_params(self, tick: ScheduleTick) -> dict[str, Any]:
        return {
            "id": tick.id,
            "me": self._setup.instance_id,
            "claims": tick.attempt,
            "now": self._setup.clock.now(),
            "channel": self._setup.ticked,
        }

    async def _settle(self, tick: ScheduleTick, query: str, retry: Retry) -> None:
        while True:
            try:
                # Shielded: a cancelled statement would cost the connection, and the tick
                # is finished either way.
                with anyio.CancelScope(shield=True):
                    async with self._setup.db.connection() as conn:
                        await conn.execute(self._sql[query], self._settle_params(tick))
                retry.reset()
                return
            except DatabaseError as exc:
                await retry.after(exc)
