"""pgstreams: composable async streams over PostgreSQL.

Queues (plain tables or pgmq), change data capture, schedules and durable workflows, all as
``Stream`` objects: ``subscribe -> take / map / batch / through -> for_each / drain``.
"""

from ._core.clock import Clock, ManualClock, SystemClock
from ._core.envelope import DeadMessage, Envelope
from ._core.errors import (
    DatabaseError,
    EmbeddedPostgresError,
    EmptyStreamError,
    InvalidArgumentError,
    LeaseLostError,
    PayloadError,
    PgStreamsError,
    ScheduleNotFoundError,
    SlotLostError,
)
from ._core.progress import Progress
from ._core.stream import Stream, merge
from ._pg.database import Database, connect, embedded
from ._sources.changes.stream import Change, ChangeLag, ConsumerInfo, PgChangeStream
from ._sources.pgmq.queue import PgmqMetrics, PgmqQueue, ReadMode
from ._sources.queue.queue import PgQueue, QueueMetrics
from ._sources.scheduler.scheduler import Schedule, Scheduler, ScheduleTick
from ._workflows.engine import RunHandle, WorkflowEngine
from ._workflows.pg import PgWorkflowStorage
from ._workflows.redis import RedisWorkflowStorage
from ._workflows.snapshots import Snapshot, SnapshotStore
from ._workflows.step_queue import PgStepQueue, StepTask
from ._workflows.storage import RunRecord, StepAttempt, StepRecord, WorkflowStorage
from ._workflows.trigger import DuplicateWorkflowError, TriggerResult, trigger
from ._workflows.workflow import (
    StepFailedError,
    Workflow,
    WorkflowCancelledError,
    WorkflowContext,
    WorkflowFailedError,
)

__version__ = "0.1.0"

__all__ = [
    "Change",
    "ChangeLag",
    "Clock",
    "ConsumerInfo",
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
    "Progress",
    "QueueMetrics",
    "ReadMode",
    "RedisWorkflowStorage",
    "RunHandle",
    "RunRecord",
    "Schedule",
    "ScheduleNotFoundError",
    "ScheduleTick",
    "Scheduler",
    "SlotLostError",
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
