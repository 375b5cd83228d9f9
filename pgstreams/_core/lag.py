"""Lag warnings: a consumer handing out items that committed long ago says so, on its
source's logger, at most once a minute.

Checked once per page or transaction, not per item, and then at most once a second: the
check costs a clock read on the hot path.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

__all__ = ["LAG_WARNING", "LagWatch"]

LAG_WARNING = 60.0
"""Seconds between an item's commit and its delivery past which a WARNING is logged."""
_CHECK_EVERY = 1.0
_WARN_EVERY = 60.0


class LagWatch:
    """Warns on ``logger`` when ``check(at)`` sees an item that committed more than
    ``threshold`` seconds ago."""

    __slots__ = ("_logger", "_next_check", "_next_warning", "_threshold", "_what")

    def __init__(self, logger: logging.Logger, what: str, threshold: float | None = None):
        self._logger = logger
        self._what = what
        self._threshold = LAG_WARNING if threshold is None else threshold
        self._next_check = 0.0
        self._next_warning = 0.0

    def check(self, at: datetime | None) -> float | None:
        """The lag behind ``at`` in seconds when it was measured (None when skipped)."""
        now = time.monotonic()
        if at is None or now < self._next_check:
            return None
        self._next_check = now + _CHECK_EVERY
        lag = (datetime.now(UTC) - at).total_seconds()
        if lag > self._threshold and now >= self._next_warning:
            self._next_warning = now + _WARN_EVERY
            self._logger.warning(
                "%s: %.0f s behind (handing out a change committed at %s); the consumer is"
                " slower than the writers, or was down",
                self._what,
                lag,
                at.isoformat(timespec="seconds"),
            )
        return lag
