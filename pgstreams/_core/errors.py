"""The exception hierarchy: every error the library raises derives from PgStreamsError."""

from __future__ import annotations

__all__ = [
    "DatabaseError",
    "EmbeddedPostgresError",
    "EmptyStreamError",
    "InvalidArgumentError",
    "LeaseLostError",
    "PayloadError",
    "PgStreamsError",
    "ScheduleNotFoundError",
    "SlotLostError",
]


class PgStreamsError(Exception):
    """Root of every error raised by pgstreams."""


class InvalidArgumentError(PgStreamsError, ValueError):
    """A bad name, number or option; raised before anything is written."""


class PayloadError(PgStreamsError, TypeError):
    """A value that cannot be stored as JSON; raised before anything is written."""


class DatabaseError(PgStreamsError):
    """A failure reported by PostgreSQL or the driver; the original is in ``__cause__``.

    ``transient`` is True for connection-level failures (the server went away, the backend
    was terminated, the pool timed out): retrying on a new connection may succeed.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class LeaseLostError(PgStreamsError):
    """The message's lease expired and another consumer has claimed it since."""


class EmptyStreamError(PgStreamsError):
    """``Stream.first()`` was called on a stream that ended without an item."""


class EmbeddedPostgresError(PgStreamsError):
    """The embedded PostgreSQL server could not be found, started or stopped."""


class ScheduleNotFoundError(PgStreamsError, LookupError):
    """No schedule is registered under that id."""


class SlotLostError(PgStreamsError):
    """A WAL consumer's replication slot was invalidated (it retained more WAL than
    ``max_slot_wal_keep_size`` allows) or dropped: the changes it held are gone."""

    def __init__(self, slot: str, reason: str) -> None:
        super().__init__(
            f"replication slot {slot!r} is lost ({reason}): the changes it retained are gone"
            " and it cannot resume. Subscribe with on_slot_lost='resnapshot' to recreate it"
            " and re-read the tables' current rows, or drop_consumer() and subscribe again"
            " (optionally with snapshot=True); raise max_slot_wal_keep_size to make this"
            " rarer."
        )
        self.slot = slot
        self.reason = reason
