"""pgstreams: composable async streams over PostgreSQL.

Queues (plain tables or pgmq), change data capture, schedules and durable workflows, all as
``Stream`` objects: ``subscribe -> take / map / batch / through -> for_each / drain``.
"""

from ._changes import Change, ChangeLag, PgChangeStream
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
)
from ._pgmq import PgmqMetrics, PgmqQueue, ReadMode
from ._queue import DeadMessage, PgQueue, QueueMetrics
from ._stream import Stream, merge

__version__ = "0.1.0"

__all__ = [
    "Change",
    "ChangeLag",
    "Database",
    "DatabaseError",
    "DeadMessage",
    "EmbeddedPostgresError",
    "EmptyStreamError",
    "Envelope",
    "InvalidArgumentError",
    "LeaseLostError",
    "PayloadError",
    "PgChangeStream",
    "PgQueue",
    "PgStreamsError",
    "PgmqMetrics",
    "PgmqQueue",
    "QueueMetrics",
    "ReadMode",
    "Stream",
    "__version__",
    "connect",
    "embedded",
    "merge",
]
