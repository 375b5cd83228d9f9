"""pgstreams: composable async streams over PostgreSQL.

Queues (plain tables or pgmq), change data capture, schedules and durable workflows, all as
``Stream`` objects: ``subscribe -> take / map / batch / through -> for_each / drain``.
"""

from ._changes import Change, ChangeLag, PgChangeStream
from ._clock import Clock, ManualClock, SystemClock
from ._db import Database, connect, embedded
from ._envelope import Envelope
from ._errors import (
    DatabaseError,
    EmbeddedPostgresError,
    EmptyStreamError,
    InvalidArgumentError,
    LeaseLostError,
    PayloadError,
    PgStreamsError,
    ScheduleNotFoundError,
)
from ._pgmq import PgmqMetrics, PgmqQueue, ReadMode
from ._queue import DeadMessage, PgQueue, QueueMetrics
from ._scheduler import Schedule, Scheduler, ScheduleTick
from ._stream import Stream, merge

__version__ = "0.1.0"

__all__ = [
    "Change",
    "ChangeLag",
    "Clock",
    "Database",
    "DatabaseError",
    "DeadMessage",
    "EmbeddedPostgresError",
    "EmptyStreamError",
    "Envelope",
    "InvalidArgumentError",
    "LeaseLostError",
    "ManualClock",
    "PayloadError",
    "PgChangeStream",
    "PgQueue",
    "PgStreamsError",
    "PgmqMetrics",
    "PgmqQueue",
    "QueueMetrics",
    "ReadMode",
    "Schedule",
    "ScheduleNotFoundError",
    "ScheduleTick",
    "Scheduler",
    "Stream",
    "SystemClock",
    "__version__",
    "connect",
    "embedded",
    "merge",
]
