"""The schedules themselves: register, read, pause and resume, unregister; manual ticks
(``trigger_now``, ``backfill``) and tick history.

Every call here is a statement or one short transaction on a pooled connection; none needs
a leader or a running Scheduler.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..._core.errors import InvalidArgumentError, ScheduleNotFoundError
from ..._core.progress import ProgressCallback, Reporter, check_progress
from ..._core.validate import check_positive_int, check_seconds, to_json
from ..._pg import calls
from .model import (
    OVERLAPS,
    Overlap,
    Schedule,
    ScheduleTick,
    check_id,
    schedule_of,
    tick_of,
    timing_of,
)
from .setup import Setup
from .timing import Timing, check_cron, check_interval, check_zone

__all__ = ["BACKFILL_CHUNK", "BACKFILL_LIMIT", "ScheduleRegistry"]

logger = logging.getLogger("pgstreams.scheduler")

BACKFILL_LIMIT = 10_000
BACKFILL_CHUNK = 1000
"""Fire times ``backfill()`` writes per statement (one progress report each)."""


class ScheduleRegistry:
    """Schedule CRUD, manual ticks and history for one Scheduler (its base class)."""

    def __init__(self, setup: Setup) -> None:
        self._setup = setup
        self._db = setup.db
        self._sql = setup.queries

    async def register(
        self,
        id: str,
        *,
        cron: str | None = None,
        interval: float | None = None,
        timezone: str = "UTC",
        max_catch_up: int = 1,
        jitter: float = 0.0,
        overlap: Overlap = "allow",
        metadata: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> Schedule:
        """Create or update a schedule (all settings are replaced by this call's).

        Give exactly one of ``cron`` (5 fields, or 6 with seconds last; evaluated in
        ``timezone``) or ``interval`` (seconds, from now). Changing the timing restarts it
        from now; changing anything else keeps the next fire time.
        """
        check_id(id)
        if (cron is None) == (interval is None):
            raise InvalidArgumentError("give exactly one of cron= or interval=")
        expr = None if cron is None else check_cron(cron)
        micros = None if interval is None else check_interval(interval)
        zone = check_zone(timezone)
        if isinstance(max_catch_up, bool) or not isinstance(max_catch_up, int) or max_catch_up < 0:
            raise InvalidArgumentError(
                f"max_catch_up must be an integer >= 0, got {max_catch_up!r}"
            )
        spread = check_seconds("jitter", jitter)
        if overlap not in OVERLAPS:
            raise InvalidArgumentError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidArgumentError(f"metadata must be a mapping, got {metadata!r}")
        meta = to_json("metadata", dict(metadata or {}))
        if name is not None and not isinstance(name, str):
            raise InvalidArgumentError(f"name must be a str, got {name!r}")
        now = self._setup.clock.now()
        try:
            next_at = Timing(expr, micros, zone, now).after(now)
        except OverflowError as exc:
            raise InvalidArgumentError(f"interval {interval!r} is out of range") from exc
        if next_at is None:
            raise InvalidArgumentError(f"cron {expr!r} never fires")
        params = {
            "id": id,
            "name": name,
            "cron": expr,
            "interval_us": micros,
            "timezone": timezone,
            "now": now,
            "max_catch_up": max_catch_up,
            "jitter": spread,
            "overlap": overlap,
            "metadata": meta,
            "next_at": next_at,
        }
        await self._db.ensure_migrated()
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql["register"], params)
            row = await cur.fetchone()
            await conn.execute(self._sql["notify"], {"channel": self._setup.changed})
        assert row is not None
        return schedule_of(row)

    async def unregister(self, id: str, *, keep_history: bool = True) -> bool:
        """Delete a schedule; False if there was none.

        Its ticks stay in ``history(id)`` (until ``keep_history`` of the constructor prunes
        them) unless ``keep_history=False``, which deletes them -- also those an earlier
        ``unregister`` kept. Ticks not yet delivered are cancelled, never delivered; a tick
        being handled is finished by its consumer as usual, and cancelled if that consumer
        gives it back or dies (never taken again, even once ``id`` is registered anew).
        """
        check_id(id)
        if not isinstance(keep_history, bool):
            raise InvalidArgumentError(f"keep_history must be a bool, got {keep_history!r}")
        await self._db.ensure_migrated()
        params = {"id": id, "now": self._setup.clock.now()}
        async with self._db.connection() as conn, conn.transaction():
            # The schedule first: that waits for a leader pass making its ticks, and the
            # next statement (a new snapshot) sees them.
            cur = await conn.execute(self._sql["unregister"], params)
            found = await cur.fetchone() is not None
            close = "cancel_open" if keep_history else "delete_ticks"
            await conn.execute(self._sql[close], params)
        return found

    async def get(self, id: str) -> Schedule | None:
        check_id(id)
        await self._db.ensure_migrated()
        row = await calls.fetchone(
            self._db, self._sql["get"], {"id": id}, allow_none=True, owner="scheduler"
        )
        return None if row is None else schedule_of(row)

    async def list(self) -> builtins.list[Schedule]:
        await self._db.ensure_migrated()
        rows = await calls.fetchall(self._db, self._sql["list"], None)
        return [schedule_of(r) for r in rows]

    async def pause(self, id: str) -> None:
        """Stop emitting ticks for ``id`` (persisted; manual ticks still run)."""
        check_id(id)
        await self._db.ensure_migrated()
        row = await calls.fetchone(
            self._db, self._sql["pause"], {"id": id}, allow_none=True, owner="scheduler"
        )
        if row is None:
            raise ScheduleNotFoundError(f"no schedule {id!r}")

    async def resume(self, id: str) -> None:
        """Emit ticks again, from the next fire time (those due while paused are dropped)."""
        check_id(id)
        await self._db.ensure_migrated()
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql["get_for_update"], {"id": id})
            row = await cur.fetchone()
            if row is None:
                raise ScheduleNotFoundError(f"no schedule {id!r}")
            now = self._setup.clock.now()
            await conn.execute(
                self._sql["resume"], {"id": id, "next_at": timing_of(schedule_of(row)).after(now)}
            )
            await conn.execute(self._sql["notify"], {"channel": self._setup.changed})

    async def next_fire_times(self, id: str, n: int = 1) -> builtins.list[datetime]:
        """The next ``n`` fire times after now (in UTC; whether or not it is paused)."""
        check_positive_int("n", n)
        schedule = await self._require(id)
        timing = timing_of(schedule)
        found: builtins.list[datetime] = []
        for fire in timing.forward(self._setup.clock.now()):
            found.append(fire)
            if len(found) == n:
                break
        return found

    async def trigger_now(self, id: str) -> ScheduleTick:
        """A ``manual`` tick due now, delivered like any other (even while paused)."""
        check_id(id)
        await self._db.ensure_migrated()
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(
                self._sql["trigger"], {"id": id, "now": self._setup.clock.now()}
            )
            row = await cur.fetchone()
            if row is None:
                raise ScheduleNotFoundError(f"no schedule {id!r}")
            await conn.execute(self._sql["notify"], {"channel": self._setup.ticked})
        return tick_of(row)

    async def backfill(
        self,
        id: str,
        *,
        start: datetime,
        end: datetime,
        progress: ProgressCallback | None = None,
    ) -> builtins.list[ScheduleTick]:
        """Ticks for the fire times in ``[start, end]`` (``catch_up`` and ``manual``), due
        now; fire times that already have a tick are left alone. Returns the new ticks.

        One transaction, written ``BACKFILL_CHUNK`` fire times per statement: ``progress``
        gets a ``Progress`` (fire times done of those in the range) at the start and after
        each statement, and the ticks commit after the last report. Progress is also
        logged on the ``pgstreams.scheduler`` logger."""
        for what, value in (("start", start), ("end", end)):
            if not isinstance(value, datetime) or value.tzinfo is None:
                raise InvalidArgumentError(f"{what} must be a timezone-aware datetime")
        if start > end:
            raise InvalidArgumentError(f"start ({start}) is after end ({end})")
        check_progress(progress)
        now = self._setup.clock.now()
        if end > now:
            raise InvalidArgumentError(f"end ({end}) is in the future; backfill is for the past")
        schedule = await self._require(id)
        fires = timing_of(schedule).between(start, end, BACKFILL_LIMIT)
        report = Reporter("backfill", progress, logger, f"backfill {id}", "fire times")
        await report.start(len(fires), id)
        rows: builtins.list[Any] = []
        if fires:
            async with self._db.connection() as conn, conn.transaction():
                for at in range(0, len(fires), BACKFILL_CHUNK):
                    chunk = fires[at : at + BACKFILL_CHUNK]
                    cur = await conn.execute(
                        self._sql["backfill"], {"id": id, "now": now, "fires": chunk}
                    )
                    rows += await cur.fetchall()
                    await report.advance(len(chunk))
                await conn.execute(self._sql["notify"], {"channel": self._setup.ticked})
        await report.finish()
        return [tick_of(r) for r in rows]

    async def history(self, id: str, *, limit: int = 100) -> builtins.list[ScheduleTick]:
        """The schedule's ticks, newest fire time first, whatever their status -- also
        after ``unregister`` (which keeps them by default)."""
        check_id(id)
        check_positive_int("limit", limit)
        await self._db.ensure_migrated()
        rows = await calls.fetchall(self._db, self._sql["history"], {"id": id, "limit": limit})
        return [tick_of(r) for r in rows]

    async def _require(self, id: str) -> Schedule:
        schedule = await self.get(id)
        if schedule is None:
            raise ScheduleNotFoundError(f"no schedule {id!r}")
        return schedule
