"""Scheduler: durable cron and interval schedules whose ticks arrive as a stream.

Schedules live in PostgreSQL. Inside ``async with sched.running()`` every instance
campaigns for leadership with a session advisory lock on a connection of its own; the
leader turns due fire times into tick rows *on that connection*, so an instance that lost
its lock (its connection died) cannot write a tick. A unique (schedule, fire time) index
makes each fire time one tick, however many leaders there ever were.

``stream()`` hands each tick to one consumer across processes (claimed with SKIP LOCKED,
woken by NOTIFY, polling as the safety net). A tick is done when the downstream asks for
the next one or the stream closes cleanly; a tick whose consumer fails goes back, and one
whose consumer died comes back when its lease (renewed while the instance runs) expires.

Missed fire times -- more than ``grace`` seconds late, after downtime -- are
``catch_up=True`` ticks: at most ``max_catch_up`` of the most recent ones, the rest are
dropped. Fire times of a paused schedule are dropped: resuming starts from the next one.
"""

from __future__ import annotations

import builtins
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import anyio
import anyio.lowlevel
import psycopg
from psycopg import AsyncConnection, sql

from ..._core.clock import Clock, SystemClock
from ..._core.errors import (
    DatabaseError,
    InvalidArgumentError,
    PgStreamsError,
    ScheduleNotFoundError,
)
from ..._core.source import Retry, channel_for
from ..._core.stream import Stream, closing_cleanly
from ..._core.validate import check_positive_int, check_seconds, to_json
from ..._pg import calls
from ..._pg.database import Database, database_error
from ..._pg.listen import Wakeup, keepalive_defaults
from ..._pg.migrate import advisory_key
from . import sql as S
from .timing import Timing, check_cron, check_interval, check_zone

__all__ = ["Overlap", "Schedule", "ScheduleTick", "Scheduler"]

logger = logging.getLogger("pgstreams.scheduler")

Overlap = Literal["skip", "allow", "queue_one"]
OVERLAPS: tuple[Overlap, ...] = ("skip", "allow", "queue_one")
ID_MAX_LENGTH = 200
BACKFILL_LIMIT = 10_000
PASS_LIMIT = 10_000
"""Most on-time fire times one leader pass turns into ticks for one schedule."""
_RECONNECT_DELAY = 0.2
_RECONNECT_MAX = 30.0
_BROKEN_RETRY = timedelta(minutes=1)
"""How soon the leader tries again a schedule whose fire times it cannot compute."""


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
    ``pending``, ``running``, ``done`` or ``skipped`` (overlap) as of reading.
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


class Scheduler:
    """Durable cron/interval schedules (see module docstring).

    ``poll_interval``: how often a follower tries to take over and the longest a leader or
    consumer sleeps. ``grace``: how late a fire time may be handled and still count as on
    time. ``lease``: seconds a consumer holds a tick before another may take it, renewed
    while ``running()``. ``keep_history``: how long done and skipped ticks are kept (by
    fire time) before the leader deletes them.
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
        self._db = db
        if instance_id is None:
            instance_id = uuid.uuid4().hex
        elif not isinstance(instance_id, str) or not instance_id:
            raise InvalidArgumentError(f"instance_id must be a non-empty str, got {instance_id!r}")
        self.instance_id = instance_id
        self._clock: Clock = SystemClock() if clock is None else clock
        self._poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        self._grace = timedelta(seconds=check_seconds("grace", grace))
        self._lease = check_seconds("lease", lease, allow_zero=False)
        if not isinstance(keep_history, timedelta) or keep_history <= timedelta(0):
            raise InvalidArgumentError(
                f"keep_history must be a positive timedelta, got {keep_history!r}"
            )
        self._keep = keep_history
        names = {
            "schedules": sql.Identifier(db.schema, "schedules"),
            "ticks": sql.Identifier(db.schema, "schedule_ticks"),
            "state": sql.Identifier(db.schema, "scheduler_state"),
        }
        self._sql = calls.render_queries(S, names)
        self._changed = channel_for(db.schema, "scheduler", "schedules")
        self._ticked = channel_for(db.schema, "scheduler", "ticks")
        self._lock_key = advisory_key("scheduler", db.schema)
        self._running = False
        self._held: dict[int, int] = {}  # ticks handed out by this instance: id -> claims
        self.is_leader = False
        """True while this instance holds the leader lock (as last seen)."""

    # -- schedules ---------------------------------------------------------------------

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
        _check_id(id)
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
        now = self._clock.now()
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
            cur = await conn.execute(self._sql["REGISTER"], params)
            row = await cur.fetchone()
            await conn.execute(self._sql["NOTIFY"], {"channel": self._changed})
        assert row is not None
        return _schedule(row)

    async def unregister(self, id: str) -> bool:
        """Delete a schedule and its ticks; False if there was none."""
        _check_id(id)
        await self._db.ensure_migrated()
        row = await calls.fetchone(
            self._db, self._sql["UNREGISTER"], {"id": id}, allow_none=True, owner="scheduler"
        )
        return row is not None

    async def get(self, id: str) -> Schedule | None:
        _check_id(id)
        await self._db.ensure_migrated()
        row = await calls.fetchone(
            self._db, self._sql["GET"], {"id": id}, allow_none=True, owner="scheduler"
        )
        return None if row is None else _schedule(row)

    async def list(self) -> builtins.list[Schedule]:
        await self._db.ensure_migrated()
        rows = await calls.fetchall(self._db, self._sql["LIST"], None)
        return [_schedule(r) for r in rows]

    async def pause(self, id: str) -> None:
        """Stop emitting ticks for ``id`` (persisted; manual ticks still run)."""
        _check_id(id)
        await self._db.ensure_migrated()
        row = await calls.fetchone(
            self._db, self._sql["PAUSE"], {"id": id}, allow_none=True, owner="scheduler"
        )
        if row is None:
            raise ScheduleNotFoundError(f"no schedule {id!r}")

    async def resume(self, id: str) -> None:
        """Emit ticks again, from the next fire time (those due while paused are dropped)."""
        _check_id(id)
        await self._db.ensure_migrated()
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql["GET_FOR_UPDATE"], {"id": id})
            row = await cur.fetchone()
            if row is None:
                raise ScheduleNotFoundError(f"no schedule {id!r}")
            now = self._clock.now()
            await conn.execute(
                self._sql["RESUME"], {"id": id, "next_at": _timing_of(_schedule(row)).after(now)}
            )
            await conn.execute(self._sql["NOTIFY"], {"channel": self._changed})

    async def next_fire_times(self, id: str, n: int = 1) -> builtins.list[datetime]:
        """The next ``n`` fire times after now (in UTC; whether or not it is paused)."""
        check_positive_int("n", n)
        schedule = await self._require(id)
        timing = _timing_of(schedule)
        found: builtins.list[datetime] = []
        for fire in timing.forward(self._clock.now()):
            found.append(fire)
            if len(found) == n:
                break
        return found

    async def trigger_now(self, id: str) -> ScheduleTick:
        """A ``manual`` tick due now, delivered like any other (even while paused)."""
        _check_id(id)
        await self._db.ensure_migrated()
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql["TRIGGER"], {"id": id, "now": self._clock.now()})
            row = await cur.fetchone()
            if row is None:
                raise ScheduleNotFoundError(f"no schedule {id!r}")
            await conn.execute(self._sql["NOTIFY"], {"channel": self._ticked})
        return _tick(row)

    async def backfill(
        self, id: str, *, start: datetime, end: datetime
    ) -> builtins.list[ScheduleTick]:
        """Ticks for the fire times in ``[start, end]`` (``catch_up`` and ``manual``), due
        now; fire times that already have a tick are left alone. Returns the new ticks."""
        for what, value in (("start", start), ("end", end)):
            if not isinstance(value, datetime) or value.tzinfo is None:
                raise InvalidArgumentError(f"{what} must be a timezone-aware datetime")
        if start > end:
            raise InvalidArgumentError(f"start ({start}) is after end ({end})")
        now = self._clock.now()
        if end > now:
            raise InvalidArgumentError(f"end ({end}) is in the future; backfill is for the past")
        schedule = await self._require(id)
        fires = _timing_of(schedule).between(start, end, BACKFILL_LIMIT)
        if not fires:
            return []
        async with self._db.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql["BACKFILL"], {"id": id, "now": now, "fires": fires})
            rows = await cur.fetchall()
            await conn.execute(self._sql["NOTIFY"], {"channel": self._ticked})
        return [_tick(r) for r in rows]

    async def history(self, id: str, *, limit: int = 100) -> builtins.list[ScheduleTick]:
        """The schedule's ticks, newest fire time first, whatever their status."""
        _check_id(id)
        check_positive_int("limit", limit)
        await self._db.ensure_migrated()
        rows = await calls.fetchall(self._db, self._sql["HISTORY"], {"id": id, "limit": limit})
        return [_tick(r) for r in rows]

    async def _require(self, id: str) -> Schedule:
        schedule = await self.get(id)
        if schedule is None:
            raise ScheduleNotFoundError(f"no schedule {id!r}")
        return schedule

    # -- running: leader election and leases -------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Scheduler]:
        """Take part in leader election (the leader emits ticks) and keep the leases of
        ticks this instance hands out, until the block exits."""
        if self._running:
            raise PgStreamsError("this Scheduler is already running")
        await self._db.ensure_migrated()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._campaign)
            tg.start_soon(self._renew_leases)
            self._running = True
            try:
                yield self
            finally:
                self._running = False
                tg.cancel_scope.cancel()

    async def _campaign(self) -> None:
        """Connect, try the lock, lead while it is held; after any failure, again (the
        lock goes with the connection, so nothing is left to clean up)."""
        delay = _RECONNECT_DELAY
        while True:
            since = anyio.current_time()
            try:
                conn = await AsyncConnection.connect(
                    self._db.dsn,
                    **keepalive_defaults(self._db.dsn),  # a dead peer must not pin leadership
                    autocommit=True,
                    application_name="pgstreams scheduler",
                )
            except psycopg.Error as exc:
                logger.warning("scheduler %s: cannot connect: %s", self.instance_id, exc)
            else:
                try:
                    await self._contend(conn)
                except psycopg.Error as exc:
                    # Whatever it was (a broken connection, a cancelled statement, a lock
                    # timeout), a scheduler must not stop ticking: log and start over.
                    logger.warning(
                        "scheduler %s: %s; reconnecting", self.instance_id, database_error(exc)
                    )
                finally:
                    self.is_leader = False
                    with anyio.CancelScope(shield=True):
                        await conn.close()
            if anyio.current_time() - since > _RECONNECT_MAX:
                delay = _RECONNECT_DELAY  # it had been working: come back quickly
            await anyio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _contend(self, conn: AsyncConnection[Any]) -> None:
        """Try the lock every poll interval; lead once it is taken (until the connection
        breaks: the lock is the session's)."""
        while True:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", [self._lock_key])
            row = await cur.fetchone()
            if row is not None and row[0]:
                logger.info("scheduler %s: leading", self.instance_id)
                self.is_leader = True
                await self._lead(conn)
            await self._clock.sleep(self._poll)

    async def _lead(self, conn: AsyncConnection[Any]) -> None:
        async with self._db.wakeups(self._changed) as wake:
            while True:
                wake.arm()
                wait = await self._pass(conn)
                # Also wake when the server speaks on the idle connection: a terminated
                # backend says so, and the next statement then fails fast.
                await self._nap(wake, wait, watch=conn.pgconn.socket)

    async def _pass(self, conn: AsyncConnection[Any]) -> float:
        """Turn every due fire time into a tick; seconds until the next one is due."""
        now = self._clock.now()
        made = 0
        async with conn.transaction():
            cur = await conn.execute(self._sql["LEAD_ALIVE"], {"now": now})
            row = await cur.fetchone()
            # A leader ran a pass lately: what came due since is on time, not missed.
            # (Either way: hosts' clocks may differ a little.)
            alive = row is not None and row[0] is not None and abs(now - row[0]) <= self._grace
            cur = await conn.execute(self._sql["LEAD_DUE"], {"now": now})
            for row in await cur.fetchall():
                schedule = _schedule(row)
                try:
                    fires, next_at = self._due(schedule, now, alive)
                except (InvalidArgumentError, OverflowError) as exc:
                    # e.g. a zone this host's tz database lacks: try again later, not in a loop
                    logger.error("schedule %s: %s; not ticking it", schedule.id, exc)
                    await conn.execute(
                        self._sql["LEAD_ADVANCE"],
                        {"id": schedule.id, "next_at": now + _BROKEN_RETRY},
                    )
                    continue
                meta = json.dumps(schedule.metadata)
                params = []
                for fire, late in fires:
                    spread = random.uniform(0, schedule.jitter) if schedule.jitter else 0.0
                    params.append(
                        {
                            "id": schedule.id,
                            "at": fire,
                            "due": fire + timedelta(seconds=spread),
                            "jitter": spread,
                            "kind": "catch_up" if late else "scheduled",
                            "overlap": schedule.overlap,
                            "metadata": meta,
                            "now": now,
                        }
                    )
                if params:
                    async with conn.cursor() as c:
                        await c.executemany(self._sql["LEAD_TICK"], params)
                    made += len(params)
                await conn.execute(
                    self._sql["LEAD_ADVANCE"], {"id": schedule.id, "next_at": next_at}
                )
            if made:
                await conn.execute(self._sql["NOTIFY"], {"channel": self._ticked})
            await conn.execute(self._sql["LEAD_PRUNE"], {"before": now - self._keep})
            cur = await conn.execute(self._sql["LEAD_NEXT"])
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return self._poll
        due: datetime = row[0]
        return min(self._poll, max(0.0, (due - self._clock.now()).total_seconds()))

    def _due(
        self, schedule: Schedule, now: datetime, alive: bool
    ) -> tuple[builtins.list[tuple[datetime, bool]], datetime | None]:
        """The fire times to emit now, oldest first, each with whether it is late; and the
        next fire time after now.

        While leaders keep running (``alive``) every due fire time is on time. After
        downtime only the newest is, and only if it is at most ``grace`` old; the others
        were missed: the ``max_catch_up`` most recent of them are emitted late.
        """
        timing = _timing_of(schedule)
        assert schedule.next_fire_at is not None
        on_time: builtins.list[datetime] = []
        late: builtins.list[datetime] = []
        for fire in timing.backward(now):
            if fire < schedule.next_fire_at:
                break
            if alive or (not on_time and not late and now - fire <= self._grace):
                on_time.append(fire)
                if len(on_time) >= PASS_LIMIT:
                    break
            elif len(late) < schedule.max_catch_up:
                late.append(fire)
            else:
                break
        fires = [(f, True) for f in reversed(late)] + [(f, False) for f in reversed(on_time)]
        return fires, timing.after(now)

    async def _nap(self, wake: Wakeup, seconds: float, *, watch: int | None = None) -> None:
        """Sleep ``seconds`` on the clock, or until ``wake`` fires (or the socket ``watch``
        becomes readable)."""
        if seconds <= 0:
            return
        if isinstance(self._clock, SystemClock) and watch is None:
            await wake.wait(seconds)
            return
        async with anyio.create_task_group() as tg:

            async def until(event: Awaitable[Any]) -> None:
                await event
                tg.cancel_scope.cancel()

            tg.start_soon(until, wake.wait(seconds))
            if not isinstance(self._clock, SystemClock):
                tg.start_soon(until, self._clock.sleep(seconds))
            if watch is not None:
                tg.start_soon(until, anyio.wait_readable(watch))

    async def _renew_leases(self) -> None:
        while True:
            await anyio.sleep(self._lease / 3)
            if not self._held:
                continue
            params = {
                "ids": list(self._held),
                "claims": list(self._held.values()),
                "me": self.instance_id,
                "lease": self._lease,
            }
            try:
                with anyio.CancelScope(shield=True):
                    async with self._db.connection() as conn:
                        await conn.execute(self._sql["RENEW"], params)
            except DatabaseError as exc:
                if not exc.transient:
                    raise
                logger.warning("scheduler %s: could not renew leases: %s", self.instance_id, exc)

    # -- delivery ----------------------------------------------------------------------

    def stream(self, schedule_id: str | None = None) -> Stream[ScheduleTick]:
        """Ticks of one schedule (or all), each to one consumer across processes. Iterate
        it inside ``running()``; a tick is done when the next is asked for or the stream
        closes cleanly."""
        if schedule_id is not None:
            _check_id(schedule_id)
        return Stream(
            lambda: self._deliver(schedule_id),
            sequential=(
                "a schedule tick is done when the next one is asked for; handle each tick"
                " before asking for the next"
            ),
        )

    async def _deliver(self, schedule_id: str | None) -> AsyncIterator[ScheduleTick]:
        if not self._running:
            raise PgStreamsError("iterate Scheduler.stream() inside `async with sched.running()`")
        await self._db.ensure_migrated()
        retry = Retry(logger, f"ticks of {schedule_id or 'every schedule'}")
        held: ScheduleTick | None = None
        try:
            async with self._db.wakeups(self._ticked) as wake:
                while True:
                    wake.arm()
                    try:
                        row = await self._claim(schedule_id)
                    except DatabaseError as exc:
                        await retry.after(exc)
                        continue
                    retry.reset()
                    if row is None:
                        await self._nap(wake, await self._idle(schedule_id))
                        continue
                    held = _tick(row)
                    self._held[held.id] = held.attempt
                    yield held
                    # Asked for the next tick: the downstream is done with this one.
                    await self._settle(held, "FINISH", retry)
                    self._forget(held)
                    held = None
        finally:
            if held is not None:
                # A clean close finishes the tick; a failure or cancellation gives it back.
                query = "FINISH" if closing_cleanly() else "RELEASE"
                await calls.cleanup(
                    self._db,
                    self._sql[query],
                    self._settle_params(held),
                    logger=logger,
                    what=f"{query.lower()} tick {held.id}",
                )
                self._forget(held)

    def _forget(self, tick: ScheduleTick) -> None:
        """Stop renewing ``tick``'s lease -- unless this instance has claimed it again."""
        if self._held.get(tick.id) == tick.attempt:
            del self._held[tick.id]

    async def _claim(self, schedule_id: str | None) -> Any:
        params = {
            "now": self._clock.now(),
            "schedule": schedule_id,
            "me": self.instance_id,
            "lease": self._lease,
        }
        while True:
            try:
                rows = await calls.fetchall_shielded(self._db, self._sql["CLAIM"], params)
            except DatabaseError as exc:
                if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                    # Another consumer started a serial tick of that schedule as we did;
                    # this statement's snapshot missed it, the next one will not.
                    await anyio.lowlevel.checkpoint()
                    continue
                raise
            return rows[0] if rows else None

    async def _idle(self, schedule_id: str | None) -> float:
        params = {"now": self._clock.now(), "schedule": schedule_id}
        return await calls.idle_wait(self._db, self._sql["NEXT_DUE"], self._poll, params)

    def _settle_params(self, tick: ScheduleTick) -> dict[str, Any]:
        return {
            "id": tick.id,
            "me": self.instance_id,
            "claims": tick.attempt,
            "now": self._clock.now(),
            "channel": self._ticked,
        }

    async def _settle(self, tick: ScheduleTick, query: str, retry: Retry) -> None:
        while True:
            try:
                # Shielded: a cancelled statement would cost the connection, and the tick
                # is finished either way.
                with anyio.CancelScope(shield=True):
                    async with self._db.connection() as conn:
                        await conn.execute(self._sql[query], self._settle_params(tick))
                retry.reset()
                return
            except DatabaseError as exc:
                await retry.after(exc)

    def __repr__(self) -> str:
        return f"Scheduler(instance_id={self.instance_id!r})"


def _check_id(id: object) -> str:
    if not isinstance(id, str) or not id:
        raise InvalidArgumentError(f"schedule id must be a non-empty str, got {id!r}")
    if len(id) > ID_MAX_LENGTH:
        raise InvalidArgumentError(f"schedule id is {len(id)} characters; the limit is 200")
    if "\x00" in id:
        raise InvalidArgumentError("schedule id must not contain NUL")
    return id


def _timing_of(schedule: Schedule) -> Timing:
    micros = None if schedule.interval is None else check_interval(schedule.interval)
    return Timing(schedule.cron, micros, check_zone(schedule.timezone), schedule.anchor)


def _schedule(row: Any) -> Schedule:
    return Schedule(
        id=row[0],
        name=row[1],
        cron=row[2],
        interval=None if row[3] is None else row[3] / 1_000_000,
        timezone=row[4],
        max_catch_up=row[6],
        jitter=row[7],
        overlap=row[8],
        metadata=row[9],
        paused=row[10],
        next_fire_at=row[11],
        anchor=row[5],
        created_at=row[12],
        updated_at=row[13],
    )


def _tick(row: Any) -> ScheduleTick:
    kind = row[6]
    return ScheduleTick(
        id=row[0],
        schedule_id=row[1],
        scheduled_at=row[2],
        due_at=row[3],
        fired_at=row[4],
        done_at=row[5],
        catch_up=kind in ("catch_up", "backfill"),
        manual=kind in ("manual", "backfill"),
        status=row[7],
        jitter=row[8],
        metadata=row[9],
        attempt=row[10],
    )
