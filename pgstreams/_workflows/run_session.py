"""RunSession: the one connection that holds a process's run locks and carries the
statements of the runs it executes, batched across runs.

Every run lock is a session advisory lock on this connection, and a run's statements go
through it too, so a run whose lock went with a dead connection cannot write another
row: its calls fail (transient) from then on, and it is resumed elsewhere.

No call waits long on a lock here: with ``lock_timeout``, a statement that waits on a row
(or table) lock longer than that fails, its calls are tried one by one, and a call that
still waits fails as ``LockWaitError`` -- having changed nothing -- for its caller to run
on another connection. So one run whose rows someone else holds does not stall the others
(and their lease renewals) behind it.

Calls arriving while a batch is in flight wait and go together in the next one (group
commit): the caller whose call finds the connection idle sends the batch; when the batch
returns, the oldest waiting call sends the next. Calls of one batchable kind share one
statement; the others go one by one, in the same turn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

import anyio
from psycopg import AsyncConnection
from psycopg.errors import LockNotAvailable

from .._core.errors import DatabaseError
from .._pg import queries
from .._pg.database import translate_errors

__all__ = ["Batch", "LockWaitError", "RunSession", "lock_lost"]

_SQL = queries.render(
    {k: v for k, v in queries.load(__package__).items() if k.startswith("session_")}, {}
)

Opener = Callable[[AsyncExitStack], Awaitable[AsyncConnection[Any]]]


@dataclass(frozen=True, slots=True)
class Batch:
    """How calls of one kind share a statement: ``params`` turns the group key and the
    calls' items into the statement's parameters; ``split`` hands the rows back, one
    result per item, in order."""

    params: Callable[[Hashable, list[Any]], dict[str, Any]]
    split: Callable[[list[Any], list[Any]], list[Any]]
    key: Callable[[Any], Hashable] | None = None
    """Items with equal keys never share a statement (one row may change once per
    statement); None when no two items can collide."""
    alone_on_failure: bool = True
    """When the shared statement fails, try each item alone (one may be at fault); False
    for items that are all alike (claims), which would only fail again."""


@dataclass(slots=True, eq=False)
class _Call:
    kind: str
    group: Hashable  # calls of a batchable kind with equal groups share a statement
    item: Any
    generation: int | None  # the connection the run's lock lives on; None: any
    wake: anyio.Event = field(default_factory=anyio.Event)
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    ran_on: int = 0  # the generation it ran on


_RESET = "reset"  # a call that drops the connection, in its turn


def lock_lost() -> DatabaseError:
    return DatabaseError("the run lock was lost with the connection that held it", transient=True)


class LockWaitError(DatabaseError):
    """A call that waited on a lock longer than the session's ``lock_timeout``: it changed
    nothing, and may be run on another connection (transient: a claim is tried again)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


def _lock_wait(exc: Exception) -> Exception:
    """``exc``, or a LockWaitError if it is a lock wait that timed out."""
    if isinstance(exc, DatabaseError) and isinstance(exc.__cause__, LockNotAvailable):
        error = LockWaitError(str(exc))
        error.__cause__ = exc.__cause__
        return error
    return exc


class RunSession:
    """See module docstring. ``generation`` counts the connections it has opened: a lock
    taken on one is valid while ``generation`` still names it."""

    def __init__(
        self,
        open_conn: Opener,
        statements: dict[str, bytes],
        batches: dict[str, Batch],
        *,
        keep: bool = True,
        lock_timeout: float | None = None,
    ) -> None:
        self._open_conn = open_conn
        self._keep = keep  # False: a connection per batch, handed back after it (no locks)
        self._sql = statements
        self._batches = batches
        self._lock_timeout = lock_timeout
        self._stack: AsyncExitStack | None = None
        self._conn: AsyncConnection[Any] | None = None
        self._pid: int | None = None  # the backend of the current connection
        self.generation = 0
        self._pending: list[_Call] = []
        self._busy = False  # a caller is sending a batch

    @property
    def alive(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def backend_pid(self) -> int | None:
        return self._conn.info.backend_pid if self.alive and self._conn is not None else None

    def pid_of(self, generation: int) -> int | None:
        """The backend of connection ``generation``, while it is the current one."""
        return self._pid if generation == self.generation and self.alive else None

    async def call(
        self, kind: str, item: Any, *, group: Hashable = None, generation: int | None = None
    ) -> tuple[Any, int]:
        """Run one call (a ``batches`` kind, or a statement with ``item`` as parameters);
        its result and the generation of the connection it ran on. With ``generation``,
        fail as ``lock_lost()`` unless that connection is still the current one.

        Shielded: a batch carries other runs' calls, and a call cancelled mid-flight
        could leave a lock behind."""
        me = _Call(kind, group, item, generation)
        self._pending.append(me)
        with anyio.CancelScope(shield=True):
            if self._busy:
                await me.wake.wait()  # done, or it is our turn to send
            if not me.done:
                self._busy = True
                try:
                    batch, self._pending = self._pending, []
                    try:
                        await self._send(batch)
                    except BaseException as exc:
                        for c in batch:  # nobody else would ever finish them
                            if not c.done:
                                _finish(c, error=_as_error(exc))
                        raise
                    finally:
                        if not self._keep:
                            await self._hand_back()
                finally:
                    if self._pending:
                        self._pending[0].wake.set()  # its turn (_busy stays True)
                    else:
                        self._busy = False
        if me.error is not None:
            raise me.error
        return me.result, me.ran_on

    async def _send(self, batch: list[_Call]) -> None:
        """Run the batch; calls that need no particular connection (claims, locks) and
        met a connection found dead are tried once more, on a new one. Resets come last."""
        work = [c for c in batch if c.kind != _RESET]
        for last in (False, True):
            if not work:
                break
            try:
                conn = await self._connection()
            except Exception as exc:
                for c in work:
                    _finish(c, error=exc)
                break
            shared: dict[tuple[str, Hashable], list[_Call]] = {}
            for c in work:
                if c.generation is not None and c.generation != self.generation:
                    _finish(c, error=lock_lost())
                elif c.kind in self._batches:
                    shared.setdefault((c.kind, c.group), []).append(c)
                else:
                    await self._run(conn, c.kind, None, [c], again=not last)
            for (kind, group), calls in shared.items():
                for part in _distinct(calls, self._batches[kind].key):
                    await self._run(conn, kind, group, part, again=not last)
            if self._conn is conn:
                break
            work = [c for c in work if not c.done]  # met the dead connection: again
        for c in batch:
            if c.kind == _RESET:
                if c.generation is None or c.generation == self.generation:
                    await self._drop()
                _finish(c)

    async def _run(
        self,
        conn: AsyncConnection[Any],
        kind: str,
        group: Hashable,
        calls: list[_Call],
        *,
        again: bool,
    ) -> None:
        """One statement for ``calls``; on a connection found dead, with ``again``,
        unfenced calls are left undone (``_send`` tries them again)."""
        how = self._batches.get(kind)
        items = [c.item for c in calls]
        try:
            with translate_errors():
                params = items[0] if how is None else how.params(group, items)
                cur = await conn.execute(self._sql[kind], params)
                rows = await cur.fetchall() if cur.description else []
        except Exception as exc:
            broken = conn.broken or conn.closed
            if broken and self._conn is conn:
                self._conn = None  # its locks are gone; fenced calls learn it from now on
            if not broken and len(calls) > 1 and how is not None and how.alone_on_failure:
                # The statement changed nothing: one call's item may be at fault (or wait
                # on a lock), so each goes on its own, and only that one fails.
                for c in calls:
                    await self._run(conn, kind, group, [c], again=again)
                return
            error = _lock_wait(exc)
            for c in calls:
                if not (again and broken and c.generation is None):
                    _finish(c, error=error)
            return
        try:  # the statement is done: whatever happens now, it must not run again
            results = [rows] if how is None else how.split(items, rows)
        except Exception as exc:
            for c in calls:
                _finish(c, error=exc)
            return
        for c, result in zip(calls, results, strict=True):
            _finish(c, result=result, ran_on=self.generation)

    async def _connection(self) -> AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        await self._drop()
        stack = AsyncExitStack()
        try:
            conn = await self._open_conn(stack)
            if self._lock_timeout is not None:
                with translate_errors():
                    await conn.execute(
                        _SQL["session_open"],
                        {"lock_timeout": f"{max(1, round(self._lock_timeout * 1000))}ms"},
                    )
        except BaseException:
            await stack.aclose()
            raise
        self._stack, self._conn, self._pid = stack, conn, conn.info.backend_pid
        self.generation += 1
        return conn

    async def reset(self, generation: int | None = None) -> None:
        """Release every lock the connection holds and hand it back (closed, if even that
        failed); the next call opens a new one. With ``generation``, only if that is still
        the current connection. It waits its turn: a batch in flight finishes first."""
        await self.call(_RESET, None, generation=generation)

    async def _hand_back(self) -> None:
        stack, self._conn, self._stack = self._stack, None, None
        if stack is not None:
            with suppress(DatabaseError):  # the batch's calls are done; the pool copes
                await stack.aclose()

    async def _drop(self) -> None:
        conn, stack, self._conn, self._stack = self._conn, self._stack, None, None
        if stack is None:
            return
        self.generation += 1  # no lock taken on it counts from now on
        try:
            if conn is not None and not conn.closed:
                try:
                    with translate_errors():
                        await conn.execute(_SQL["session_drop"])
                except DatabaseError:
                    await conn.close()  # the pool drops a closed connection
        finally:
            with suppress(DatabaseError):
                await stack.aclose()

    async def close(self) -> None:
        await self.reset()


def _finish(
    c: _Call, *, result: Any = None, error: BaseException | None = None, ran_on: int = 0
) -> None:
    c.result, c.error, c.ran_on, c.done = result, error, ran_on, True
    c.wake.set()


def _as_error(exc: BaseException) -> BaseException:
    if isinstance(exc, Exception):
        return exc
    return DatabaseError(f"no connection for the run session: {exc!r}", transient=True)


def _distinct(calls: list[_Call], key: Callable[[Any], Hashable] | None) -> list[list[_Call]]:
    """Split ``calls`` so that no part holds two items with the same key."""
    if key is None:
        return [calls]
    parts: list[tuple[set[Hashable], list[_Call]]] = []
    for c in calls:
        k = key(c.item)
        for seen, part in parts:
            if k not in seen:
                seen.add(k)
                part.append(c)
                break
        else:
            parts.append(({k}, [c]))
    return [part for _, part in parts]
