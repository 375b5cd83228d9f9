"""Metrics and traces through OpenTelemetry, when its API is installed (the ``otel`` extra).

Whether ``opentelemetry`` imports is decided once, when this module loads. Without it
``otel`` is None, nothing of OpenTelemetry is imported, and a hot path pays one
``is not None`` test per batch it reads. With it, the instruments and the tracer are made
once, from the global providers: until the application installs an SDK they are the API's
proxies, which do nothing (and forward to the SDK from the moment one is installed).

Counts are added per batch, not per message; attribute sets are built once per queue,
stream, workflow and step and reused. Metric attributes are names only -- never message,
change or run ids (a run's id is an attribute of its span). Nothing here raises into the
caller's path: a timestamp that cannot be read costs its latency value, not the delivery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.metrics import Histogram, Meter, MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = [
    "Telemetry",
    "otel",
    "parse_time",
    "restore",
    "use",
    "workflow_run",
    "workflow_step",
]

Attributes = Mapping[str, str]
RunEnd = Callable[[str, "Mapping[str, Any] | None"], None]
"""Told a run's outcome (completed, failed, cancelled) and its stored error."""

SECONDS_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0),
)
"""Histogram bounds for latencies and step durations, 1 ms to an hour (the SDK's default
bounds, 0 to 10000, are meant for milliseconds)."""


_RUN_KEYS = ("pgstreams.workflow.name", "pgstreams.outcome")
_STEP_KEYS = ("pgstreams.workflow.name", "pgstreams.step.name", "pgstreams.outcome")


class Telemetry:
    """The instruments and the tracer, made once from the given providers (None: the
    global ones)."""

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        from opentelemetry import context, metrics, trace

        version = _version()
        meter = metrics.get_meter("pgstreams", version, meter_provider)
        self.tracer = trace.get_tracer("pgstreams", version, tracer_provider)
        self._attach, self._detach = context.attach, context.detach
        self._in_context = trace.set_span_in_context
        self._status, self._error = trace.Status, trace.StatusCode.ERROR
        count = meter.create_counter
        self._published = count(
            "pgstreams.messages.published", "{message}", "Messages published to a queue."
        )
        self._delivered = count(
            "pgstreams.messages.delivered", "{message}", "Messages handed to a subscriber."
        )
        self._acked = count("pgstreams.messages.acked", "{message}", "Messages acked.")
        self._nacked = count("pgstreams.messages.nacked", "{message}", "Messages nacked.")
        self._dead = count(
            "pgstreams.messages.dead", "{message}", "Messages moved to the dead set or DLQ."
        )
        self._changes = count(
            "pgstreams.changes.delivered", "{change}", "Changes handed to a subscriber."
        )
        self._runs = count(
            "pgstreams.workflow.runs", "{run}", "Workflow run executions that ended, by outcome."
        )
        self._steps = count(
            "pgstreams.workflow.steps", "{attempt}", "Workflow step attempts, by outcome."
        )
        self._latency = _histogram(
            meter,
            "pgstreams.delivery.latency",
            "From enqueue (or a change's time) to the read that delivered it.",
        )
        self._duration = _histogram(
            meter, "pgstreams.workflow.step.duration", "How long a step attempt's function ran."
        )
        self._attributes: dict[tuple[str, ...], Attributes] = {}

    # -- attribute sets, made once each ----------------------------------------------------

    def _queue(self, source: str, queue: str) -> Attributes:
        key = (source, queue)
        found = self._attributes.get(key)
        if found is None:
            found = {"pgstreams.source": source, "pgstreams.queue.name": queue}
            self._attributes[key] = found
        return found

    def _stream(self, capture: str, stream: str) -> Attributes:
        key = ("changes", capture, stream)
        found = self._attributes.get(key)
        if found is None:
            found = {
                "pgstreams.source": "changes",
                "pgstreams.capture": capture,
                "pgstreams.stream.name": stream,
            }
            self._attributes[key] = found
        return found

    def _workflow(self, *names: str) -> Attributes:
        """(workflow, outcome) or (workflow, step, outcome)."""
        found = self._attributes.get(names)
        if found is None:
            keys = _STEP_KEYS if len(names) == 3 else _RUN_KEYS
            found = dict(zip(keys, names, strict=True))
            self._attributes[names] = found
        return found

    # -- queues and change streams -------------------------------------------------------

    @staticmethod
    def now() -> float:
        """The time of a read, to measure delivery latency from (wall clock, as the
        server's timestamps are)."""
        return time.time()

    def published(self, source: str, queue: str, n: int) -> None:
        self._published.add(n, self._queue(source, queue))

    def settled(
        self, source: str, queue: str, *, acked: int = 0, nacked: int = 0, dead: int = 0
    ) -> None:
        attributes = self._queue(source, queue)
        if acked:
            self._acked.add(acked, attributes)
        if nacked:
            self._nacked.add(nacked, attributes)
        if dead:
            self._dead.add(dead, attributes)

    def delivered(
        self, source: str, queue: str, enqueued: Iterable[datetime | None], read_at: float
    ) -> None:
        """Messages handed out from one read (``read_at``), by their enqueue times (None:
        unknown, counted without a latency)."""
        attributes = self._queue(source, queue)
        self._delivered.add(self._latencies(enqueued, read_at, attributes), attributes)

    def changes(self, capture: str, stream: str, times: list[datetime], read_at: float) -> None:
        """Changes handed out from one read (``read_at``), by their times (``Change.at``):
        one latency value per statement -- its changes share their time -- as WAL capture
        records one per transaction. (Per change it would cost a record for every row of
        a bulk statement.)"""
        attributes = self._stream(capture, stream)
        self._changes.add(len(times), attributes)
        last: datetime | None = None
        for at in times:
            if at != last:
                last = at
                self._latencies((at,), read_at, attributes)

    def transaction(
        self, capture: str, stream: str, n: int, committed: datetime | None, read_at: float
    ) -> None:
        """``n`` changes of one transaction handed out, read from ``read_at`` on: its
        changes share their commit time, so one latency value (none when ``committed`` is
        unknown)."""
        attributes = self._stream(capture, stream)
        self._changes.add(n, attributes)
        if committed is not None:
            self._latencies((committed,), read_at, attributes)

    def _latencies(
        self, times: Iterable[datetime | None], read_at: float, attributes: Attributes
    ) -> int:
        """Record each item's latency; how many items there were. Converting an aware
        datetime is the costly part, so a time shared by consecutive items (written by one
        statement or transaction) is converted once."""
        record = self._latency.record
        n = 0
        last: datetime | None = None
        seconds = 0.0
        for at in times:
            n += 1
            if at is None:
                continue
            if at != last:
                last = at
                seconds = read_at - at.timestamp()
                if seconds < 0.0:  # the clocks of two hosts: skew (and the SDK drops those)
                    seconds = 0.0
            record(seconds, attributes)
        return n

    # -- workflows -----------------------------------------------------------------------

    def run(self, workflow: str, workflow_id: str, execution: int) -> _RunSpan:
        return _RunSpan(self, workflow, workflow_id, execution)

    def step(
        self, workflow: str, workflow_id: str, step: str, attempt: int, last: bool
    ) -> _StepSpan:
        return _StepSpan(self, workflow, workflow_id, step, attempt, last)


class _Span:
    """A span, current inside the ``with`` block. Plain methods rather than a generator:
    this runs for every step. Without an SDK the tracer hands out the invalid span (or the
    parent's, non-recording), and making the invalid one current would change nothing, so
    that is skipped."""

    __slots__ = ("span", "tel", "token")

    def __init__(self, tel: Telemetry, name: str, attributes: Mapping[str, str | int]) -> None:
        self.tel = tel
        self.span = tel.tracer.start_span(name, attributes=attributes)
        self.token: Token[Context] | None = None

    def _activate(self) -> None:
        if self.span.get_span_context().is_valid:
            self.token = self.tel._attach(self.tel._in_context(self.span))

    def _end(self, outcome: str) -> None:
        if self.token is not None:
            self.tel._detach(self.token)
        self.span.set_attribute("pgstreams.outcome", outcome)
        self.span.end()


class _RunSpan(_Span):
    __slots__ = ("outcome", "workflow")

    def __init__(self, tel: Telemetry, workflow: str, workflow_id: str, execution: int) -> None:
        attributes: dict[str, str | int] = {
            "pgstreams.workflow.name": workflow,
            "pgstreams.workflow.id": workflow_id,
            "pgstreams.workflow.execution": execution,
        }
        super().__init__(tel, f"workflow.run {workflow}", attributes)
        self.workflow = workflow
        self.outcome = "interrupted"

    def __enter__(self) -> RunEnd:
        self._activate()
        return self.ended

    def __exit__(self, *exc: object) -> None:
        self._end(self.outcome)

    def ended(self, status: str, error: Mapping[str, Any] | None) -> None:
        self.outcome = status
        tel, span = self.tel, self.span
        tel._runs.add(1, tel._workflow(self.workflow, status))
        if status == "failed" and span.is_recording():
            error = error or {}
            span.set_status(tel._status(tel._error, f"{error.get('type')}: {error.get('message')}"))


class _StepSpan(_Span):
    __slots__ = ("last", "started", "step", "workflow")

    def __init__(
        self, tel: Telemetry, workflow: str, workflow_id: str, step: str, attempt: int, last: bool
    ) -> None:
        attributes: dict[str, str | int] = {
            "pgstreams.workflow.name": workflow,
            "pgstreams.workflow.id": workflow_id,
            "pgstreams.step.name": step,
            "pgstreams.step.attempt": attempt,
        }
        super().__init__(tel, f"workflow.step {step}", attributes)
        self.workflow, self.step, self.last = workflow, step, last
        self.started = 0.0

    def __enter__(self) -> None:
        self._activate()
        self.started = time.perf_counter()

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and not isinstance(exc, Exception):
            self._end("interrupted")  # cancelled: not counted
            return
        outcome = "succeeded" if exc is None else "failed" if self.last else "retried"
        tel, span = self.tel, self.span
        attributes = tel._workflow(self.workflow, self.step, outcome)
        tel._duration.record(time.perf_counter() - self.started, attributes)
        tel._steps.add(1, attributes)
        if exc is not None and span.is_recording():
            span.record_exception(exc)
            span.set_status(tel._status(tel._error, f"{type(exc).__name__}: {exc}"))
        self._end(outcome)


def _histogram(meter: Meter, name: str, description: str) -> Histogram:
    try:
        return meter.create_histogram(
            name, "s", description, explicit_bucket_boundaries_advisory=SECONDS_BUCKETS
        )
    except TypeError:  # opentelemetry-api before 1.30 takes no advisory
        return meter.create_histogram(name, "s", description)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pgstreams")
    except PackageNotFoundError:  # run from a source tree
        return ""


def _load() -> Telemetry | None:
    try:
        import opentelemetry.metrics
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return None
    return Telemetry()


otel: Telemetry | None = _load()
"""The instruments when OpenTelemetry is installed, else None: test it once per batch."""


def use(
    meter_provider: MeterProvider | None = None, tracer_provider: TracerProvider | None = None
) -> Telemetry | None:
    """Record to these providers from now on (tests; the global providers can be set only
    once per process); returns what was in use, for ``restore``."""
    global otel
    before, otel = otel, Telemetry(meter_provider, tracer_provider)
    return before


def restore(previous: Telemetry | None) -> None:
    global otel
    otel = previous


def parse_time(text: str) -> datetime | None:
    """A timestamptz as PostgreSQL prints it (ISO DateStyle); None if it is not that."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _ignore(status: str, error: Mapping[str, Any] | None) -> None:
    pass


_NO_RUN = nullcontext(_ignore)
_NO_STEP = nullcontext()


def workflow_run(workflow: str, workflow_id: str, execution: int) -> AbstractContextManager[RunEnd]:
    """A span over one execution of a run; call what it yields with the run's outcome once
    known (that also counts it). An execution that ends without one -- handed back, its
    lease lost, its storage failing -- is marked "interrupted" and not counted."""
    tel = otel
    return _NO_RUN if tel is None else tel.run(workflow, workflow_id, execution)


def workflow_step(
    workflow: str, workflow_id: str, step: str, attempt: int, *, last: bool
) -> AbstractContextManager[None]:
    """A span over one attempt of a step, a child of its run's; counts the attempt and
    records its duration by outcome: succeeded, retried (it failed and another attempt
    follows) or failed (``last``: none does). A cancelled attempt is not counted."""
    tel = otel
    return _NO_STEP if tel is None else tel.step(workflow, workflow_id, step, attempt, last)
