"""A logical replication session on psycopg 3: one ``replication=database`` connection,
its replication commands, and the CopyBoth stream of ``START_REPLICATION``, read with
``anyio.wait_readable`` on the connection's socket (no thread, no task).

While a handler runs the stream is not read, so the session raises ``wal_sender_timeout``
for itself to 5 minutes: a handler may take that long over one change before the server
ends the session (the reader then reconnects and the transaction comes again), and a
server shutting down waits at most that long for a busy consumer. Dead peers are found
sooner by TCP keepalives, set on both ends. Text comes in UTF-8 whatever the database's
encoding.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, NoReturn

import anyio
import psycopg
from psycopg import errors as pg_errors
from psycopg import pq, sql

from . import pgoutput
from .pgoutput import Keepalive, XLogData

__all__ = ["OPTIONS", "Session"]

logger = logging.getLogger("pgstreams.changes.wal")

OPTIONS = (
    "-c wal_sender_timeout=5min -c client_encoding=UTF8 -c tcp_keepalives_idle=10"
    " -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 -c datestyle=ISO"
    " -c intervalstyle=postgres -c extra_float_digits=1"
)


class Session:
    """One replication connection (see module docstring)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.streaming = False
        self.pid = self.pgconn.backend_pid

    async def output_settings(self) -> dict[str, str]:
        """The settings that shape this session's text output of values, as ``set_config``
        names them (a snapshot reads rows under the same ones)."""
        names = ("TimeZone", "DateStyle", "IntervalStyle", "extra_float_digits")
        return {name: (await self.command(f"SHOW {name}"))[0][0] for name in names}

    async def command(self, query: sql.Composable | str) -> list[tuple[Any, ...]]:
        """A replication command or SQL (simple query protocol); its rows as text."""
        text = query if isinstance(query, str) else query.as_string(self.conn)
        self.pgconn.send_query(text.encode())
        await self._flush()
        rows: list[tuple[Any, ...]] = []
        while True:
            result = await self._result()
            if result is None:
                return rows
            status = result.status
            if status == pq.ExecStatus.FATAL_ERROR:
                error = pg_errors.error_from_result(result, encoding="utf-8")
                while await self._result() is not None:
                    pass
                raise error
            if status == pq.ExecStatus.TUPLES_OK:
                rows.extend(
                    tuple(
                        None if (v := result.get_value(r, c)) is None else bytes(v).decode()
                        for c in range(result.nfields)
                    )
                    for r in range(result.ntuples)
                )

    async def start(self, slot: str, lsn: int, publication: str) -> None:
        """START_REPLICATION of ``slot`` from ``lsn`` (0: the slot's confirmed position)."""
        query = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1',"
            " publication_names {}, messages 'true')"
        ).format(
            sql.Identifier(slot),
            sql.SQL(pgoutput.format_lsn(lsn)),
            sql.Literal(sql.Identifier(publication).as_string(self.conn)),
        )
        self.pgconn.send_query(query.as_string(self.conn).encode())
        await self._flush()
        result = await self._result()
        if result is None:
            raise psycopg.OperationalError("START_REPLICATION returned nothing")
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise pg_errors.error_from_result(result, encoding="utf-8")
        if result.status != pq.ExecStatus.COPY_BOTH:
            raise psycopg.OperationalError(f"START_REPLICATION returned {result.status!r}")
        self.streaming = True

    async def _result(self) -> pq.abc.PGresult | None:
        while self.pgconn.is_busy():
            await anyio.wait_readable(self._socket())
            self.pgconn.consume_input()
        return self.pgconn.get_result()

    def _socket(self) -> int:
        return self.pgconn.socket

    def poll(self) -> XLogData | Keepalive | None:
        """The next message already received, or None (also when the stream ended: the
        next ``read`` raises why)."""
        if not self.streaming:
            return None
        nbytes, data = self.pgconn.get_copy_data(1)
        if nbytes > 0:
            return pgoutput.decode_copy(data)
        if nbytes < 0:
            self.streaming = False
        return None

    async def read(self, seconds: float) -> XLogData | Keepalive | None:
        """The next message, waiting up to ``seconds`` (None if none came)."""
        message = self.poll()
        if message is not None:
            return message
        with anyio.move_on_after(seconds):
            while self.streaming:
                await anyio.wait_readable(self._socket())
                self.pgconn.consume_input()
                message = self.poll()
                if message is not None:
                    return message
        if not self.streaming:
            await self._end_of_copy()
        return None

    async def _end_of_copy(self) -> NoReturn:
        """The server ended the stream: raise its error (reading the results without
        blocking)."""
        result = await self._result()
        while await self._result() is not None:
            pass
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            raise pg_errors.error_from_result(result, encoding="utf-8")
        raise psycopg.OperationalError("the server ended the replication stream")

    async def _flush(self) -> None:
        while self.pgconn.flush() == 1:
            await anyio.wait_writable(self._socket())

    async def send_status(self, written: int, flushed: int) -> None:
        """Report ``flushed`` as the position the slot may confirm."""
        data = pgoutput.standby_status(written, flushed, datetime.now(UTC))
        while self.pgconn.put_copy_data(data) == 0:
            await anyio.wait_writable(self._socket())
        await self._flush()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.conn.close()
