"""Progress of long operations (migrate, requeue_dead, backfill, a WAL snapshot): the report a
caller's ``progress=`` callback receives, and the reporter every such operation uses.

A reporter calls the callback at the start (``done=0``) and after each unit or batch of
work, and logs at INFO on its source's logger -- a start line, at most one line every
``LOG_EVERY`` seconds, and an end line -- never once per row. Operations that find nothing
to do log nothing. Log records carry ``pgstreams_progress=True`` (the command line hides
them while it draws its own progress line).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from .errors import InvalidArgumentError

__all__ = ["LOG_EVERY", "Progress", "ProgressCallback", "Reporter", "check_progress"]

LOG_EVERY = 2.0
"""Seconds between two progress log lines of one operation (start and end lines aside)."""


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a long operation has got: what a ``progress=`` callback receives.

    ``operation`` is ``"migrate"``, ``"requeue_dead"``, ``"backfill"`` or ``"snapshot"``.
    ``done`` counts the units finished so far (migrations, messages, fire times, rows) and
    never goes down. ``total`` is how many there are expected to be, or None when unknown:
    counted when the operation starts (a snapshot's is an estimate from the tables'
    statistics), so it may be revised; the last report of an operation that completes has
    ``done == total``. ``detail`` names what the last unit belonged to (a migration, the
    queue, the schedule, a table).
    """

    operation: str
    done: int
    total: int | None
    detail: str = ""


ProgressCallback = Callable[[Progress], Awaitable[None] | None]
"""A ``progress=`` callback: a function or coroutine function taking a ``Progress``."""


def check_progress(progress: object) -> ProgressCallback | None:
    """Return ``progress`` if it is None or callable (before anything is written)."""
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(
            f"progress must be a callable taking a ps.Progress (or None), got {progress!r}"
        )
    return cast("ProgressCallback | None", progress)


class Reporter:
    """Reports one run of one operation: to the callback on every call, to ``logger`` at
    INFO rate-limited (see module docstring). An exception from the callback propagates:
    it stops the operation (work already committed stays)."""

    def __init__(
        self,
        operation: str,
        callback: ProgressCallback | None,
        logger: logging.Logger,
        subject: str,
        unit: str,
    ) -> None:
        self.operation = operation
        self.done = 0
        self.total: int | None = None
        self.detail = ""
        self._callback = callback
        self._logger = logger
        self._subject = subject
        self._unit = unit
        self._began = 0.0
        self._logged_at = 0.0
        self._logged_start = False
        self._last: tuple[int, int | None] | None = None

    async def start(self, total: int | None, detail: str = "") -> None:
        """The operation begins with ``total`` units to do (None: unknown)."""
        self.total, self.detail = total, detail
        self._began = self._logged_at = time.monotonic()
        if total != 0:
            self._logged_start = True
            count = "" if total is None else f", {total} {self._unit}"
            self._log("%s: starting%s", self._subject, count)
        await self._report()

    async def advance(self, n: int, detail: str | None = None) -> None:
        """``n`` more units are done (``detail``: what they belonged to)."""
        self.done += n
        if detail is not None:
            self.detail = detail
        if self.total is not None and self.done > self.total:
            self.total = self.done
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            total = "" if self.total is None else f"/{self.total}"
            self._log("%s: %d%s %s", self._subject, self.done, total, self._unit)
        await self._report()

    async def finish(self) -> None:
        """The operation completed: ``total`` becomes what was done (one last report if
        that changes what the callback last saw)."""
        self.total = self.done
        if self._logged_start or self.done:
            seconds = time.monotonic() - self._began
            self._log("%s: done, %d %s in %.1f s", self._subject, self.done, self._unit, seconds)
        if self._last != (self.done, self.total):
            await self._report()

    def _log(self, message: str, *args: object) -> None:
        self._logger.info(message, *args, extra={"pgstreams_progress": True})

    async def _report(self) -> None:
        self._last = (self.done, self.total)
        if self._callback is None:
            return
        result = self._callback(Progress(self.operation, self.done, self.total, self.detail))
        if inspect.isawaitable(result):
            await result
