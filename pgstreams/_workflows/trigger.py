"""``trigger()``: a stream operator that starts a workflow run per item, idempotently."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from .._core.errors import InvalidArgumentError, PgStreamsError
from .._core.stream import Stream
from .engine import RunHandle, WorkflowEngine
from .workflow import Workflow, WorkflowCancelledError, WorkflowFailedError

__all__ = ["DuplicateWorkflowError", "TriggerResult", "trigger"]

T = TypeVar("T")


class DuplicateWorkflowError(PgStreamsError):
    """``trigger(on_duplicate="fail")`` met a workflow id that already has a run."""


@dataclass(frozen=True, slots=True)
class TriggerResult(Generic[T]):
    """What ``trigger`` did with one item: the run it started, or found (``duplicate``)."""

    item: T
    workflow_id: str
    started: bool
    duplicate: bool
    handle: RunHandle
    result: Any = None
    """The run's output, with ``wait=True``."""
    error: WorkflowFailedError | WorkflowCancelledError | None = None
    """With ``wait=True``, why the run did not complete (the stream goes on)."""


def trigger(
    *,
    workflow: Workflow[Any, Any],
    engine: WorkflowEngine,
    to_input: Callable[[T], Any] | None = None,
    to_workflow_id: Callable[[T], str] | None = None,
    on_duplicate: Literal["skip", "fail"] = "skip",
    wait: bool = False,
) -> Callable[[Stream[T]], AsyncIterator[TriggerResult[T]]]:
    """For ``stream.through(...)``: start ``workflow`` for each item (input
    ``to_input(item)``, default the item; id ``to_workflow_id(item)``, default a new one)
    and yield a :class:`TriggerResult` per item. A workflow id that already has a run is a
    duplicate: yielded with ``duplicate=True`` (``on_duplicate="skip"``) or raised as
    :class:`DuplicateWorkflowError` (``"fail"``). ``wait=True`` waits for each run's output.
    """
    if on_duplicate not in ("skip", "fail"):
        raise InvalidArgumentError(f"on_duplicate must be 'skip' or 'fail', got {on_duplicate!r}")
    engine.register(workflow)

    async def op(stream: Stream[T]) -> AsyncIterator[TriggerResult[T]]:
        async for item in stream:
            input = item if to_input is None else to_input(item)
            workflow_id = None if to_workflow_id is None else to_workflow_id(item)
            handle = await engine.start(workflow, input, workflow_id=workflow_id)
            if not handle.created and on_duplicate == "fail":
                raise DuplicateWorkflowError(
                    f"workflow id {handle.workflow_id!r} already has a run"
                )
            result: Any = None
            error: WorkflowFailedError | WorkflowCancelledError | None = None
            if wait:
                try:
                    result = await handle.result()
                except (WorkflowFailedError, WorkflowCancelledError) as exc:
                    error = exc
            yield TriggerResult(
                item, handle.workflow_id, handle.created, not handle.created, handle, result, error
            )

    return op
