"""Durable workflows: a run is an async function of JSON input made of memoised steps.

``ctx.step(name, fn, *args)`` runs ``fn`` once per run: its result is stored, and when the
run resumes (its worker died, another picked it up after the lease ran out) the stored
result is returned without calling ``fn`` again. A step that raises is retried with
exponential back-off; every attempt is recorded in the run's history.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Any, Generic, TypeVar, overload

import anyio
import anyio.to_thread

from .._core import telemetry
from .._core.errors import InvalidArgumentError, PgStreamsError
from .._core.validate import to_json
from .storage import RunRecord, WorkflowStorage

__all__ = [
    "StepFailedError",
    "Workflow",
    "WorkflowCancelledError",
    "WorkflowContext",
    "WorkflowFailedError",
]

In = TypeVar("In")
Out = TypeVar("Out")
R = TypeVar("R")
WorkflowFn = Callable[["WorkflowContext", Any], Awaitable[Any]]


class StepFailedError(PgStreamsError):
    """A step failed on every attempt it was allowed; the run fails with it."""

    def __init__(self, step: str, attempts: int, error: dict[str, Any]) -> None:
        super().__init__(
            f"step {step!r} failed after {attempts} attempt(s): "
            f"{error.get('type')}: {error.get('message')}"
        )
        self.step = step
        self.attempts = attempts
        self.error = error


class WorkflowFailedError(PgStreamsError):
    """``result()`` of a run that failed; ``error`` is what was stored."""

    def __init__(self, workflow_id: str, error: dict[str, Any] | None) -> None:
        error = error or {}
        super().__init__(
            f"workflow {workflow_id!r} failed: {error.get('type')}: {error.get('message')}"
        )
        self.workflow_id = workflow_id
        self.error = error


class WorkflowCancelledError(PgStreamsError):
    """``result()`` of a run that was cancelled."""


class Workflow(Generic[In, Out]):
    """A named workflow; decorate its function with ``@wf.run``."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise InvalidArgumentError(f"workflow name must be a 1-200 character str: {name!r}")
        self.name = name
        self.fn: WorkflowFn | None = None

    def run(
        self, fn: Callable[[WorkflowContext, In], Awaitable[Out]]
    ) -> Callable[[WorkflowContext, In], Awaitable[Out]]:
        """Decorator: the function that runs the workflow (``async def fn(ctx, input)``)."""
        if not inspect.iscoroutinefunction(fn):
            raise InvalidArgumentError(f"workflow {self.name!r}: @run needs an async function")
        self.fn = fn
        return fn

    def __repr__(self) -> str:
        return f"Workflow({self.name!r})"


class WorkflowContext:
    """Handed to a workflow's function: its run's id and input, and ``step``."""

    def __init__(self, storage: WorkflowStorage, run: RunRecord) -> None:
        self._storage = storage
        self.workflow_id = run.workflow_id
        self.workflow = run.workflow
        self.input = run.input
        self.execution = run.executions
        """1 for a run's first execution, 2 after one resume, ..."""
        self._seen: set[str] = set()

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[R]],
        *args: Any,
        retries: int = ...,
        backoff: float = ...,
        timeout: float | None = ...,  # noqa: ASYNC109 - per attempt, part of the API
    ) -> R: ...

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., R],
        *args: Any,
        retries: int = ...,
        backoff: float = ...,
        timeout: float | None = ...,  # noqa: ASYNC109 - per attempt, part of the API
    ) -> R: ...

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retries: int = 0,
        backoff: float = 1.0,
        timeout: float | None = None,  # noqa: ASYNC109 - per attempt, part of the API
    ) -> Any:
        """Run ``fn(*args)`` as the step ``name`` -- or return its stored result.

        A coroutine function runs on the event loop; any other function in a worker thread.

        Up to ``retries`` more attempts after a failure, ``backoff * 2**(n-1)`` seconds
        apart; ``timeout`` bounds each attempt. The result must be JSON; what is returned
        is the stored JSON value (the same on the first run and on a resume).
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"step name must be a non-empty str, got {name!r}")
        if name in self._seen:
            raise InvalidArgumentError(
                f"step name {name!r} is used twice in run {self.workflow_id!r}; step names"
                " identify stored results, so each must be unique within a run"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(f"retries must be an integer >= 0, got {retries!r}")
        if not math.isfinite(backoff) or backoff < 0:
            raise InvalidArgumentError(f"backoff must be >= 0 seconds, got {backoff!r}")
        if timeout is not None and (not math.isfinite(timeout) or timeout <= 0):
            raise InvalidArgumentError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._seen.add(name)
        before = 0  # attempts made before the run's last manual retry: not counted
        if self.execution > 1:  # a resume: the step may have finished before
            stored = await self._storage.get_step(self.workflow_id, name)
            if stored is not None and stored.status == "succeeded":
                return stored.output
            before = stored.retried_attempts if stored is not None else 0
            if (
                stored is not None
                and stored.status == "failed"
                and stored.attempts - before > retries
            ):
                # It already used every attempt (the run caught the error and went on).
                raise StepFailedError(name, stored.attempts, stored.error or {})
        while True:
            attempt = await self._storage.create_attempt(self.workflow_id, name)
            last = attempt - before > retries
            try:
                with telemetry.workflow_step(
                    self.workflow, self.workflow_id, name, attempt, last=last
                ):
                    with anyio.fail_after(timeout) if timeout is not None else nullcontext():
                        result = await _call(fn, args)
                    text = to_json(f"the result of step {name!r}", result)
            except Exception as exc:
                error = describe(exc)
                await self._storage.mark_step(
                    self.workflow_id, name, "failed", attempt=attempt, error=error
                )
                if last:
                    raise StepFailedError(name, attempt, error) from exc
                await anyio.sleep(backoff * 2 ** (attempt - before - 1))
                continue
            value = json.loads(text)
            await self._storage.mark_step(
                self.workflow_id, name, "succeeded", attempt=attempt, output=value
            )
            return value


async def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Await a coroutine function; run anything else in a worker thread, so that a slow
    or blocking step does not stall the event loop (and with it the run's lease renewal).
    A thread cannot be interrupted: a sync step that times out is waited for (and then
    recorded as timed out), so two attempts never run at once."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await anyio.to_thread.run_sync(functools.partial(fn, *args))
    if inspect.isawaitable(result):
        result = await result
    return result


def describe(exc: BaseException) -> dict[str, Any]:
    """An exception as stored: ``{"type", "message"}`` (made storable: a NUL or a lone
    surrogate in the message is written as an escape)."""
    return {"type": type(exc).__name__, "message": _storable(str(exc))}


def _storable(text: str) -> str:
    if text.isascii():
        return text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")
