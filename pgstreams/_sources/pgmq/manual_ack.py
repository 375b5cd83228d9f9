"""``subscribe_ack()``: messages read under a visibility timeout and handed out as
envelopes that ack, nack or extend their own delivery."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.lowlevel
import psycopg
from psycopg import AsyncConnection

from ..._core import telemetry
from ..._core.envelope import Envelope
from ..._core.errors import DatabaseError, InvalidArgumentError, LeaseLostError
from ..._core.source import HandOut, Retry, Waiting, parse_headers
from ..._core.stream import Stream
from ..._core.validate import check_seconds
from ..._pg import calls
from ..._pg.database import database_error
from .auto_ack import DEFAULT_POLL_INTERVAL, msg_id
from .core import Idle, int_at_least, logger
from .dead_letters import DeadLetters

__all__ = ["AckMode", "ManualAck", "ReadMode"]

T = TypeVar("T")

AckMode = Literal["delete", "archive"]


@dataclass(frozen=True, slots=True)
class ReadMode:
    """How ``subscribe_ack`` reads: ``ReadMode.standard(vt, qty)`` or ``ReadMode.poll(...)``.

    ``vt`` is the visibility timeout in whole seconds (pgmq's unit), ``qty`` the number of
    messages per read. ``poll`` waits inside the server (``pgmq.read_with_poll``) up to
    ``max_poll_seconds``, re-checking every ``poll_interval_ms``.
    """

    vt: int = 30
    qty: int = 1
    max_poll_seconds: int | None = None
    """None: a standard read; a number: a server-side poll."""
    poll_interval_ms: int = 100

    def __post_init__(self) -> None:
        int_at_least("vt", self.vt, 1)
        int_at_least("qty", self.qty, 1)
        if self.max_poll_seconds is not None:
            int_at_least("max_poll_seconds", self.max_poll_seconds, 1)
        int_at_least("poll_interval_ms", self.poll_interval_ms, 1)

    @classmethod
    def standard(cls, vt: int = 30, qty: int = 1) -> ReadMode:
        return cls(vt, qty)

    @classmethod
    def poll(
        cls, vt: int = 30, qty: int = 1, max_poll_seconds: int = 5, poll_interval_ms: int = 100
    ) -> ReadMode:
        if max_poll_seconds is None:
            raise InvalidArgumentError("max_poll_seconds must be an integer >= 1, got None")
        return cls(vt, qty, max_poll_seconds, poll_interval_ms)


class _Settler:
    """Settles the envelopes of one ``subscribe_ack`` stream in its ack mode; each
    statement checks that ``(msg_id, read_ct)`` still names the delivery."""

    __slots__ = ("ack_mode", "queue")

    def __init__(self, queue: ManualAck[Any], ack_mode: AckMode) -> None:
        self.queue = queue
        self.ack_mode = ack_mode

    @property
    def msg_id_source(self) -> str:
        """What names this queue in an id unique to a message (the NATS sink's)."""
        return f"pgmq.{self.queue.name}"

    async def _ack(self, env: Envelope[Any]) -> bool:
        q = self.queue
        query = q._sql["ack_archive" if self.ack_mode == "archive" else "ack_delete"]
        params = {"id": env.id, "read_ct": env._lease}
        row = await q._fetchone(query, params, allow_none=True)
        held = row is not None and bool(row[0])
        if held and (tel := telemetry.otel) is not None:
            tel.settled(q._kind, q.name, acked=1)
        return held

    async def _nack(self, env: Envelope[Any], delay: float, error: str | None) -> bool:
        q = self.queue
        params = {"id": env.id, "read_ct": env._lease, "delay": delay, "error": error}
        held = await q._fetchone(q._sql["nack"], params, allow_none=True) is not None
        if held and (tel := telemetry.otel) is not None:
            tel.settled(q._kind, q.name, nacked=1)
        return held

    async def _extend(self, env: Envelope[Any], seconds: float) -> None:
        q = self.queue
        params = {"id": env.id, "read_ct": env._lease, "seconds": seconds}
        if await q._fetchone(q._sql["extend"], params, allow_none=True) is None:
            raise LeaseLostError(f"message {env.id}: read {env.attempts} is no longer current")

    async def release(self, envelopes: Sequence[Envelope[Any]]) -> None:
        envs = [e for e in envelopes if not e.settled]
        if envs:
            params = {"ids": [e.id for e in envs], "read_cts": [e._lease for e in envs]}
            await self.queue._cleanup(self.queue._sql["release"], params, "release unread")


class ManualAck(DeadLetters, Generic[T]):
    """The manual-ack subscription: at-least-once under a visibility timeout.

    A delivery is named by ``(msg_id, read_ct)``: a consumer whose timeout ran out and whose
    message was read again can no longer settle it (``ack`` returns False). Envelopes read
    ahead but never delivered go back as if never read. With ``max_attempts`` stored, a
    message read more often goes to the dead-letter queue instead of being delivered.
    """

    def subscribe_ack(
        self,
        *,
        read_mode: ReadMode | None = None,
        ack_mode: AckMode = "delete",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> Stream[Envelope[T]]:
        """Stream messages under a visibility timeout; settle each envelope.

        ``read_mode`` defaults to ``ReadMode.standard()`` (vt 30 s, one message per read).
        ``ack_mode`` "delete" removes acked messages, "archive" moves them to ``pgmq.a_<name>``.
        Envelopes read ahead but never delivered are handed back as if never read.
        """
        mode = read_mode if read_mode is not None else ReadMode()
        if not isinstance(mode, ReadMode):
            raise InvalidArgumentError("read_mode must be a ReadMode")
        if ack_mode not in ("delete", "archive"):
            raise InvalidArgumentError(f"ack_mode must be 'delete' or 'archive', got {ack_mode!r}")
        poll = check_seconds("poll_interval", poll_interval, allow_zero=False)
        sub = _Settler(self, ack_mode)
        return Stream(lambda: self._lease_loop(sub, mode, poll), putback=sub.release)

    async def ack_many(self, envelopes: Iterable[Envelope[T]]) -> int:
        """Ack several envelopes in one round trip per ack mode; returns how many were held.

        Raises before touching anything if one of them is already settled or belongs to
        another queue.
        """
        envs = list(envelopes)
        groups: dict[str, list[Envelope[T]]] = {}
        for env in envs:
            env._check_unsettled()
            sub = env._queue
            if not isinstance(sub, _Settler) or sub.queue is not self:
                raise InvalidArgumentError(f"message {env.id} was not read from this queue")
            groups.setdefault(sub.ack_mode, []).append(env)
        held = 0
        for mode, group in groups.items():
            params = {
                "ids": ",".join([str(e.id) for e in group]),
                "read_cts": ",".join([str(e._lease) for e in group]),
            }
            query = self._sql["ack_many_archive" if mode == "archive" else "ack_many_delete"]
            row = await self._fetchone(query, params)
            for env in group:
                env._settled = True
            held += int(row[0])
        if held and (tel := telemetry.otel) is not None:
            tel.settled(self._kind, self.name, acked=held)
        return held

    async def _lease_loop(
        self, sub: _Settler, mode: ReadMode, poll: float
    ) -> AsyncIterator[Envelope[T]]:
        await self._db.ensure_migrated()
        retry = Retry(logger, f"pgmq queue {self.name}")
        # A server-side poll does not wait for notifications: it registers none.
        channel = self._channel if mode.max_poll_seconds is None else None
        async with self._db.wakeups(channel) as wakeup:
            idle = Idle()
            while True:
                # Nothing that can be cancelled or fail lies between a read and the try
                # below that hands back what is not delivered: the limit comes with the rows.
                if mode.max_poll_seconds is None:
                    params = {"queue": self.name, "vt": mode.vt, "qty": mode.qty}
                    rows, limit = await self._read_standard(
                        self._sql["read"], params, Waiting(wakeup, poll, retry), idle
                    )
                else:
                    rows, limit = await self._read_polling(sub, mode, retry)
                rows.sort(key=msg_id)
                if limit is not None and any(r[2] > limit for r in rows):
                    await self._dead_letter([r for r in rows if r[2] > limit])
                    rows = [r for r in rows if r[2] <= limit]
                batch = HandOut([self._envelope(sub, r) for r in rows])
                if (tel := telemetry.otel) is not None:
                    read_at = tel.now()
                try:
                    for env in batch:
                        yield env
                finally:
                    if tel is not None:
                        enqueued = [e.enqueued_at for e in batch.given]
                        tel.delivered(self._kind, self.name, enqueued, read_at)
                    await sub.release(batch.rest)

    def _envelope(self, sub: _Settler, row: Sequence[Any]) -> Envelope[T]:
        return Envelope(
            sub,
            id=row[0],
            value=json.loads(row[1]) if row[1] is not None else _none(),
            headers={} if row[4] is None else parse_headers(row[4]),
            attempts=row[2],
            enqueued_at=row[3],
            lease=row[2],
        )

    async def _read_polling(
        self, sub: _Settler, mode: ReadMode, retry: Retry
    ) -> tuple[list[Any], int | None]:
        """The next rows of ``pgmq.read_with_poll`` (which waits inside the server) and
        the queue's max_attempts."""
        params = {
            "queue": self.name,
            "vt": mode.vt,
            "qty": mode.qty,
            "max_poll": mode.max_poll_seconds,
            "interval_ms": mode.poll_interval_ms,
        }
        while True:
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                limit = (await self._current_settings())[0]
                rows = await self._fetchall_interruptible(sub, self._sql["read_poll"], params)
            except DatabaseError as exc:
                await retry.after(exc)
                continue
            retry.reset()
            if rows:
                return rows, limit

    async def _fetchall_interruptible(
        self, sub: _Settler, query: bytes, params: Mapping[str, Any]
    ) -> list[Any]:
        """Run a statement that waits inside the server (``read_with_poll``).

        The statement runs in a shielded child task; cancelling the caller asks the server
        to cancel it (again every second until it ends -- a cancel that arrives before the
        statement does is ignored by the server), and whatever it had read by then is handed
        back, so cancellation is prompt and takes nothing. A connection that was sent a
        cancel is closed rather than reused, so a late cancel cannot hit another statement.
        """
        rows: list[Any] = []
        failure: list[BaseException] = []
        finished = anyio.Event()
        holder: list[AsyncConnection[Any]] = []
        interrupted = False

        async def run() -> None:
            with anyio.CancelScope(shield=True):
                try:
                    async with self._db.connection() as conn:
                        holder.append(conn)
                        try:
                            cur = await conn.execute(query, params)
                            rows.extend(await cur.fetchall())
                        finally:
                            if interrupted and not conn.closed:
                                await conn.close()
                except (DatabaseError, psycopg.Error) as exc:
                    failure.append(exc)
                finally:
                    finished.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                try:
                    await finished.wait()
                except anyio.get_cancelled_exc_class():
                    interrupted = True
                    with anyio.CancelScope(shield=True):
                        while not finished.is_set():
                            if holder:
                                try:
                                    await holder[0].cancel_safe(timeout=calls.CLEANUP_TIMEOUT)
                                except Exception as exc:  # still wait for the statement
                                    logger.warning("pgmq %s: cancel failed: %s", self.name, exc)
                            with anyio.move_on_after(1.0):
                                await finished.wait()
                    raise
        except BaseException:
            if rows:  # read, never returned: hand them back
                with anyio.CancelScope(shield=True):
                    await sub.release([self._envelope(sub, r) for r in rows])
            raise
        if failure:
            error = failure[0]
            if isinstance(error, psycopg.Error):
                raise database_error(error) from error
            raise error
        return rows


def _none() -> Any:
    return None  # a NULL message (sent by another client)
