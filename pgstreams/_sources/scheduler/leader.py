"""Leader election: at most one instance makes ticks, and it makes them on the connection
that holds its lock.

Every running instance campaigns with a session advisory lock on a connection of its own,
trying again every poll interval. The leader makes ticks *on that connection*, so an
instance whose connection (and with it the lock) is gone cannot write one; when it dies,
another instance takes over within a poll interval.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection

from ..._pg.database import database_error
from ..._pg.listen import keepalive_defaults
from ..._pg.locks import advisory_key
from .firing import fire_due
from .setup import Setup, nap

__all__ = ["Leader"]

logger = logging.getLogger("pgstreams.scheduler")

_RECONNECT_DELAY = 0.2
_RECONNECT_MAX = 30.0


class Leader:
    """One instance's part in the election; ``campaign()`` runs until cancelled."""

    def __init__(self, setup: Setup) -> None:
        self._setup = setup
        self._lock_key = advisory_key("scheduler", setup.db.schema)
        self.is_leader = False

    async def campaign(self) -> None:
        """Connect, try the lock, lead while it is held; after any failure, again (the
        lock goes with the connection, so nothing is left to clean up)."""
        me = self._setup.instance_id
        dsn = self._setup.db.dsn
        delay = _RECONNECT_DELAY
        while True:
            since = anyio.current_time()
            try:
                conn = await AsyncConnection.connect(
                    dsn,
                    **keepalive_defaults(dsn),  # a dead peer must not pin leadership
                    autocommit=True,
                    application_name="pgstreams scheduler",
                )
            except psycopg.Error as exc:
                logger.warning("scheduler %s: cannot connect: %s", me, exc)
            else:
                try:
                    await self._contend(conn)
                except psycopg.Error as exc:
                    # Whatever it was (a broken connection, a cancelled statement, a lock
                    # timeout), a scheduler must not stop ticking: log and start over.
                    logger.warning("scheduler %s: %s; reconnecting", me, database_error(exc))
                finally:
                    if self.is_leader:
                        logger.info("scheduler %s: no longer leading", me)
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
        setup = self._setup
        while True:
            cur = await conn.execute(setup.queries["lead_try_lock"], {"key": self._lock_key})
            row = await cur.fetchone()
            if row is not None and row[0]:
                logger.info("scheduler %s: leading", setup.instance_id)
                self.is_leader = True
                await self._lead(conn)
            await setup.clock.sleep(setup.poll)

    async def _lead(self, conn: AsyncConnection[Any]) -> None:
        setup = self._setup
        async with setup.db.wakeups(setup.changed) as wake:
            while True:
                wake.arm()
                wait = await fire_due(setup, conn)
                # Also wake when the server speaks on the idle connection: a terminated
                # backend says so, and the next statement then fails fast.
                await nap(setup.clock, wake, wait, watch=conn.pgconn.socket)
