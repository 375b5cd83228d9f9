"""The progress line of long commands (``migrate``, ``queue requeue-dead``, ``schedules
backfill``): on stderr, so stdout keeps only the result (``--json`` stays parseable). On a
terminal it is one line redrawn in place (at most 10 times a second); otherwise plain
lines, at most one every 2 seconds besides the first and the last. ``-q`` hides it.

While it shows, the library's own progress log lines (INFO records marked
``pgstreams_progress``) are held back: they would say the same thing twice.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from .._core.progress import Progress

__all__ = ["ProgressLine", "describe", "progress_line"]

UNITS = {
    "migrate": "migrations",
    "requeue_dead": "messages",
    "backfill": "fire times",
    "snapshot": "rows",
}


class ProgressLine:
    """A ``progress=`` callback drawing the reports it gets on ``stream``."""

    def __init__(self, stream: TextIO, *, quiet: bool = False) -> None:
        self._stream = stream
        self._quiet = quiet
        self._tty = stream.isatty()
        self._every = 0.1 if self._tty else 2.0
        self._shown_at: float | None = None
        self._open = False  # a terminal line is drawn and not ended yet

    def __call__(self, report: Progress) -> None:
        if self._quiet:
            return
        now = time.monotonic()
        last = report.total is not None and report.done >= report.total
        if not last and self._shown_at is not None and now - self._shown_at < self._every:
            return
        self._shown_at = now
        text = describe(report)
        if self._tty:
            self._stream.write(f"\r{text}\x1b[K")
            self._open = True
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End a line drawn in place (the command's own output comes next)."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False


def describe(report: Progress) -> str:
    """``requeue_dead jobs: 2000/2500 messages (80%)``; a migration's name goes last."""
    unit = UNITS.get(report.operation, "done")
    if report.operation == "migrate":
        head, tail = report.operation, f" {report.detail}" if report.detail else ""
    else:
        head, tail = f"{report.operation} {report.detail}".rstrip(), ""
    if report.total is None:
        return f"{head}: {report.done} {unit}{tail}"
    percent = 100 if report.total == 0 else report.done * 100 // report.total
    return f"{head}: {report.done}/{report.total} {unit} ({percent}%){tail}"


class _HideProgressRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "pgstreams_progress", False)


@contextmanager
def progress_line(args: argparse.Namespace) -> Iterator[ProgressLine]:
    """A progress line on stderr for one command (see module docstring)."""
    line = ProgressLine(sys.stderr, quiet=args.quiet)
    hide = _HideProgressRecords()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(hide)
    try:
        yield line
    finally:
        line.close()
        for handler in handlers:
            handler.removeFilter(hide)
