"""One leader pass: every due fire time becomes a tick (or is skipped), missed ones are
caught up within ``max_catch_up``, old history is pruned.

Missed fire times -- more than ``grace`` seconds late, after downtime -- become
``catch_up=True`` ticks: at most ``max_catch_up`` of the most recent ones, the rest are
dropped. Fire times of a paused schedule are dropped: resuming starts from the next one.
"""

from __future__ import annotations

import json
import logging
import random
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from ..._core.errors import InvalidArgumentError
from .model import Schedule, schedule_of, timing_of
from .setup import Setup

__all__ = ["PASS_LIMIT", "due_fires", "fire_due"]

logger = logging.getLogger("pgstreams.scheduler")

PASS_LIMIT = 10_000
"""Most on-time fire times one leader pass turns into ticks for one schedule."""
_BROKEN_RETRY = timedelta(minutes=1)
"""How soon the leader tries again a schedule whose fire times it cannot compute."""


async def fire_due(setup: Setup, conn: AsyncConnection[Any]) -> float:
    """Turn every due fire time into a tick, on the leader's own connection (so a leader
    that lost its lock with its connection writes nothing); seconds until the next one is
    due."""
    q = setup.queries
    now = setup.clock.now()
    made = 0
    async with conn.transaction():
        cur = await conn.execute(q["lead_alive"], {"now": now})
        row = await cur.fetchone()
        # A leader ran a pass lately: what came due since is on time, not missed.
        # (Either way: hosts' clocks may differ a little.)
        alive = row is not None and row[0] is not None and abs(now - row[0]) <= setup.grace
        cur = await conn.execute(q["lead_due"], {"now": now})
        for row in await cur.fetchall():
            schedule = schedule_of(row)
            try:
                fires, next_at = due_fires(schedule, now, alive, setup.grace)
            except (InvalidArgumentError, OverflowError) as exc:
                # e.g. a zone this host's tz database lacks: try again later, not in a loop
                logger.error("schedule %s: %s; not ticking it", schedule.id, exc)
                await conn.execute(
                    q["lead_advance"], {"id": schedule.id, "next_at": now + _BROKEN_RETRY}
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
                    await c.executemany(q["lead_tick"], params)
                made += len(params)
            await conn.execute(q["lead_advance"], {"id": schedule.id, "next_at": next_at})
        if made:
            await conn.execute(q["notify"], {"channel": setup.ticked})
        await conn.execute(q["lead_cancel_orphans"], {"now": now})
        await conn.execute(q["lead_prune"], {"before": now - setup.keep})
        cur = await conn.execute(q["lead_next"])
        row = await cur.fetchone()
    if row is None or row[0] is None:
        return setup.poll
    due: datetime = row[0]
    return min(setup.poll, max(0.0, (due - setup.clock.now()).total_seconds()))


def due_fires(
    schedule: Schedule, now: datetime, alive: bool, grace: timedelta
) -> tuple[list[tuple[datetime, bool]], datetime | None]:
    """The fire times to emit now, oldest first, each with whether it is late; and the
    next fire time after now.

    While leaders keep running (``alive``) every due fire time is on time. After downtime
    only the newest is, and only if it is at most ``grace`` old; the others were missed:
    the ``max_catch_up`` most recent of them are emitted late.
    """
    timing = timing_of(schedule)
    assert schedule.next_fire_at is not None
    on_time: list[datetime] = []
    late: list[datetime] = []
    for fire in timing.backward(now):
        if fire < schedule.next_fire_at:
            break
        if alive or (not on_time and not late and now - fire <= grace):
            on_time.append(fire)
            if len(on_time) >= PASS_LIMIT:
                break
        elif len(late) < schedule.max_catch_up:
            late.append(fire)
        else:
            break
    fires = [(f, True) for f in reversed(late)] + [(f, False) for f in reversed(on_time)]
    return fires, timing.after(now)
