"""pgstreams: composable async streams over PostgreSQL.

Queues (plain tables or pgmq), change data capture, schedules and durable workflows, all as
``Stream`` objects: ``subscribe -> take / map / batch / through -> for_each / drain``.
"""

from ._changes import Change, ChangeLag, PgChangeStream
from ._clock import Clock, ManualClock, SystemClock
from ._db import Database, connect, embedded
from ._engine import RunHandle, WorkflowEngine
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
from ._snapshots import Snapshot, SnapshotStore
from ._step_queue import PgStepQueue, StepTask
from ._stream import Stream, merge
from ._trigger import DuplicateWorkflowError, TriggerResult, trigger
from ._workflow import (
    StepFailedError,
    Workflow,
    WorkflowCancelledError,
    WorkflowContext,
    WorkflowFailedError,
)
from ._workflow_pg import PgWorkflowStorage
from ._workflow_redis import RedisWorkflowStorage
from ._workflow_storage import RunRecord, StepAttempt, StepRecord, WorkflowStorage

__version__ = "0.1.0"

__all__ = [
    "Change",
    "ChangeLag",
    "Clock",
    "Database",
    "DatabaseError",
    "DeadMessage",
    "DuplicateWorkflowError",
    "EmbeddedPostgresError",
    "EmptyStreamError",
    "Envelope",
    "InvalidArgumentError",
    "LeaseLostError",
    "ManualClock",
    "PayloadError",
    "PgChangeStream",
    "PgQueue",
    "PgStepQueue",
    "PgStreamsError",
    "PgWorkflowStorage",
    "PgmqMetrics",
    "PgmqQueue",
    "QueueMetrics",
    "ReadMode",
    "RedisWorkflowStorage",
    "RunHandle",
    "RunRecord",
    "Schedule",
    "ScheduleNotFoundError",
    "ScheduleTick",
    "Scheduler",
    "Snapshot",
    "SnapshotStore",
    "StepAttempt",
    "StepFailedError",
    "StepRecord",
    "StepTask",
    "Stream",
    "SystemClock",
    "TriggerResult",
    "Workflow",
    "WorkflowCancelledError",
    "WorkflowContext",
    "WorkflowEngine",
    "WorkflowFailedError",
    "WorkflowStorage",
    "__version__",
    "connect",
    "embedded",
    "merge",
    "trigger",
]
