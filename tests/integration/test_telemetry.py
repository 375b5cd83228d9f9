"""OpenTelemetry metrics and spans, read back from the SDK's in-memory reader and exporter;
and, in a child process where ``opentelemetry`` cannot be imported, a queue that works
without importing any of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from psycopg import sql

import pgstreams as ps
from pgstreams._core import telemetry

from .test_changes import execute, make_table


@dataclass
class Recorded:
    reader: InMemoryMetricReader
    exporter: InMemorySpanExporter

    def points(self, name: str, **match: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """The data points of metric ``name`` whose attributes include ``match`` (keys
        with ``.`` written as ``_``), by their attributes."""
        wanted = {k.replace("_", "."): v for k, v in match.items()}
        found: dict[tuple[tuple[str, Any], ...], Any] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        attributes = dict(point.attributes or {})
                        if all(attributes.get(k) == v for k, v in wanted.items()):
                            found[tuple(sorted(attributes.items()))] = point
        return found

    def total(self, name: str, **match: str) -> Any:
        """Counters: the sum of the matching points; histograms: how many values."""
        return sum(
            p.count if isinstance(p, HistogramDataPoint) else p.value
            for p in self.points(name, **match).values()
        )

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def otel() -> Iterator[Recorded]:
    """SDK providers of this test's own, used in place of the global ones (which can be set
    only once per process) and dropped afterwards."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    tracers = TracerProvider(shutdown_on_exit=False)
    tracers.add_span_processor(SimpleSpanProcessor(exporter))
    previous = telemetry.use(meters, tracers)
    try:
        yield Recorded(reader, exporter)
    finally:
        telemetry.restore(previous)
        meters.shutdown()
        tracers.shutdown()


def qname() -> str:
    return f"q_{uuid.uuid4().hex[:10]}"


# -- queues -------------------------------------------------------------------------------


async def test_pgqueue_counts_publish_delivery_ack_nack_and_dead(
    db: ps.Database, otel: Recorded
) -> None:
    q = await ps.PgQueue.create(db, qname(), max_attempts=2)
    await q.publish_batch([0, 1, 2])
    await q.publish(3)
    await q.publish(4)
    first = await q.subscribe_ack(prefetch=5).take(5).collect()
    assert [e.value for e in first] == [0, 1, 2, 3, 4]
    assert await first[0].ack()
    assert await q.ack_many(first[1:3]) == 2
    assert await first[3].nack()
    assert await first[4].nack()
    again = await q.subscribe_ack(prefetch=2).take(2).collect()
    assert [(e.value, e.attempts) for e in again] == [(3, 2), (4, 2)]
    assert await again[0].nack(error="poison")  # its last attempt: to the dead set
    assert await again[1].ack()
    await q.publish_batch([5, 6, 7])
    assert await q.subscribe(prefetch=3).take(2).collect() == [5, 6]  # auto-ack: 7 goes back

    queue = {"pgstreams_source": "queue", "pgstreams_queue_name": q.name}
    assert otel.total("pgstreams.messages.published", **queue) == 8
    assert otel.total("pgstreams.messages.delivered", **queue) == 9
    assert otel.total("pgstreams.messages.acked", **queue) == 4
    assert otel.total("pgstreams.messages.nacked", **queue) == 3
    assert otel.total("pgstreams.messages.dead", **queue) == 1
    assert otel.total("pgstreams.delivery.latency", **queue) == 9  # one value per delivery
    assert (await q.metrics()).dead == 1
    # Attributes are names, never ids: one data point per counter for this queue.
    assert len(otel.points("pgstreams.messages.delivered", **queue)) == 1


async def test_a_lease_that_ran_out_on_its_last_attempt_counts_as_dead(
    db: ps.Database, otel: Recorded
) -> None:
    q = await ps.PgQueue.create(db, qname(), max_attempts=1)
    await q.publish("crashy")
    assert (await q.subscribe_ack(visibility=0.05).first()).value == "crashy"  # never settled
    await anyio.sleep(0.1)
    await q.publish("fine")
    env = await q.subscribe_ack(prefetch=2).first()  # the read moves "crashy" to the dead set
    assert env.value == "fine"
    queue = {"pgstreams_queue_name": q.name}
    assert otel.total("pgstreams.messages.dead", **queue) == 1
    assert otel.total("pgstreams.messages.delivered", **queue) == 2


async def test_pgmq_counts_publish_delivery_ack_nack_and_dead(
    db: ps.Database, otel: Recorded
) -> None:
    q = await ps.PgmqQueue.create(db, qname(), max_attempts=1)
    await q.publish_batch(["a", "b", "c"])
    mode = ps.ReadMode.standard(qty=3)
    envs = await q.subscribe_ack(read_mode=mode).take(3).collect()
    assert await envs[0].ack()
    assert await q.ack_many(envs[1:2]) == 1
    assert await envs[2].nack()
    await q.publish("d")
    # The read finds "c" read once too often (to the DLQ) and "d".
    env = await q.subscribe_ack(read_mode=ps.ReadMode.standard(qty=2)).first()
    assert env.value == "d"
    await q.publish("e")
    assert await q.subscribe().first() == "e"

    queue = {"pgstreams_source": "pgmq", "pgstreams_queue_name": q.name}
    assert otel.total("pgstreams.messages.published", **queue) == 5
    assert otel.total("pgstreams.messages.delivered", **queue) == 5
    assert otel.total("pgstreams.messages.acked", **queue) == 2
    assert otel.total("pgstreams.messages.nacked", **queue) == 1
    assert otel.total("pgstreams.messages.dead", **queue) == 1
    assert otel.total("pgstreams.delivery.latency", **queue) == 5
    assert (await q.metrics()).dead == 1


# -- change streams -----------------------------------------------------------------------


async def test_trigger_capture_counts_the_changes_handed_out(
    db: ps.Database, otel: Recorded
) -> None:
    table = await make_table(db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(db, table)
    await cs.install_trigger()
    insert = sql.SQL("INSERT INTO {} (id) SELECT generate_series(%s::int, %s::int)")
    await execute(db, insert.format(sql.Identifier(table)), 1, 2)
    await execute(db, insert.format(sql.Identifier(table)), 3, 4)
    got = await cs.subscribe_from(0).take(3).collect()  # one read of 4, three handed out
    assert [c.pk for c in got] == [{"id": 1}, {"id": 2}, {"id": 3}]
    stream = {"pgstreams_capture": "trigger", "pgstreams_stream_name": f"public.{table}"}
    assert otel.total("pgstreams.changes.delivered", pgstreams_source="changes", **stream) == 3
    [latency] = otel.points("pgstreams.delivery.latency", **stream).values()
    assert latency.count == 2  # one value per statement: its changes share their time
    assert 0 <= latency.min <= latency.max < 30  # seconds from the statement to the read


async def test_wal_capture_counts_changes_and_one_latency_per_transaction(
    wal_db: ps.Database, otel: Recorded
) -> None:
    table = await make_table(wal_db)
    cs: ps.PgChangeStream[Any] = ps.PgChangeStream(wal_db, table, capture="wal")
    await cs.add_consumer("otel")
    try:
        insert = sql.SQL("INSERT INTO {} (id) SELECT generate_series(%s::int, %s::int)")
        await execute(wal_db, insert.format(sql.Identifier(table)), 1, 3)
        await execute(wal_db, insert.format(sql.Identifier(table)), 4, 4)
        got = await cs.subscribe(consumer="otel").take(4).collect()
        assert [c.pk for c in got] == [{"id": i} for i in range(1, 5)]
    finally:
        await cs.drop_consumer("otel")
    stream = {"pgstreams_capture": "wal", "pgstreams_stream_name": f"public.{table}"}
    assert otel.total("pgstreams.changes.delivered", **stream) == 4
    assert otel.total("pgstreams.delivery.latency", **stream) == 2


# -- workflows ----------------------------------------------------------------------------

flaky_failures: dict[str, int] = {}

onboard = ps.Workflow[dict[str, Any], Any]("otel-onboard")


async def fetch_user(user: str) -> dict[str, str]:
    return {"user": user}


async def provision(workflow_id: str, user: dict[str, str]) -> str:
    if flaky_failures.get(workflow_id, 0) < 1:
        flaky_failures[workflow_id] = flaky_failures.get(workflow_id, 0) + 1
        raise ConnectionError("the provisioning service blinked")
    return f"provisioned {user['user']}"


@onboard.run
async def _onboard(ctx: ps.WorkflowContext, input: dict[str, Any]) -> Any:
    user = await ctx.step("fetch", fetch_user, input["user"])
    return await ctx.step("provision", provision, ctx.workflow_id, user, retries=1, backoff=0)


doomed = ps.Workflow[None, Any]("otel-doomed")


async def refuse() -> None:
    raise ValueError("no")


@doomed.run
async def _doomed(ctx: ps.WorkflowContext, input: None) -> Any:
    return await ctx.step("refuse", refuse)


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    """The spans called ``name``, in the order they started."""
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_time or 0)


def attribute(span: ReadableSpan, key: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(key)


async def test_workflow_runs_and_steps_are_spans_and_counted_by_outcome(
    db: ps.Database, otel: Recorded
) -> None:
    engine = ps.WorkflowEngine(db, workflows=[onboard, doomed])
    tag = uuid.uuid4().hex[:8]
    ok = await engine.start(onboard, {"user": "u1"}, workflow_id=f"ok-{tag}")
    bad = await engine.start(doomed, None, workflow_id=f"bad-{tag}")
    async with engine.worker(concurrency=2):
        with anyio.fail_after(20):
            assert await ok.result() == "provisioned u1"
            with pytest.raises(ps.WorkflowFailedError):
                await bad.result()

    spans = otel.spans()
    [run] = named(spans, "workflow.run otel-onboard")
    assert run.context is not None
    assert attribute(run, "pgstreams.workflow.id") == f"ok-{tag}"
    assert attribute(run, "pgstreams.workflow.name") == "otel-onboard"
    assert attribute(run, "pgstreams.outcome") == "completed"
    assert run.status.status_code == StatusCode.UNSET
    [fetch] = named(spans, "workflow.step fetch")
    tries = named(spans, "workflow.step provision")
    assert len(tries) == 2
    for step in (fetch, *tries):
        assert step.parent is not None and step.context is not None
        assert step.parent.span_id == run.context.span_id  # children of the run's span
        assert step.context.trace_id == run.context.trace_id
        assert attribute(step, "pgstreams.workflow.id") == f"ok-{tag}"
    assert [attribute(t, "pgstreams.step.attempt") for t in tries] == [1, 2]
    assert [attribute(t, "pgstreams.outcome") for t in tries] == ["retried", "succeeded"]
    assert tries[0].status.status_code == StatusCode.ERROR
    assert [e.name for e in tries[0].events] == ["exception"]
    assert tries[1].status.status_code == StatusCode.UNSET

    [failed] = named(spans, "workflow.run otel-doomed")
    assert failed.status.status_code == StatusCode.ERROR
    assert attribute(failed, "pgstreams.outcome") == "failed"

    steps = "pgstreams.workflow.steps"
    wf = {"pgstreams_workflow_name": "otel-onboard"}
    assert otel.total(steps, pgstreams_step_name="fetch", pgstreams_outcome="succeeded", **wf) == 1
    provision_step = {"pgstreams_step_name": "provision", **wf}
    assert otel.total(steps, pgstreams_outcome="retried", **provision_step) == 1
    assert otel.total(steps, pgstreams_outcome="succeeded", **provision_step) == 1
    assert otel.total(steps, pgstreams_workflow_name="otel-doomed", pgstreams_outcome="failed") == 1
    assert otel.total("pgstreams.workflow.step.duration", **wf) == 3
    runs = "pgstreams.workflow.runs"
    assert otel.total(runs, pgstreams_outcome="completed", **wf) == 1
    assert otel.total(runs, pgstreams_workflow_name="otel-doomed", pgstreams_outcome="failed") == 1
    # Run and workflow ids are span attributes, never metric ones.
    for name in (steps, runs, "pgstreams.workflow.step.duration"):
        for key in otel.points(name):
            assert "pgstreams.workflow.id" not in dict(key)


# -- without OpenTelemetry -----------------------------------------------------------------

WITHOUT_OTEL = textwrap.dedent(
    """
    import json, sys
    sys.modules["opentelemetry"] = None  # as if it were not installed: imports fail

    import anyio
    import pgstreams as ps
    from pgstreams._core import telemetry

    async def main(dsn, name):
        async with ps.connect(dsn) as db:
            q = await ps.PgQueue.create(db, name)
            await q.publish_batch([1, 2])
            env = await q.subscribe_ack().first()
            await env.ack()
            value = await q.subscribe().first()
        loaded = sorted(m for m, v in sys.modules.items() if m.startswith("opentelemetry") and v)
        print(json.dumps({"otel": telemetry.otel is None, "got": [env.value, value],
                          "loaded": loaded}))

    anyio.run(main, sys.argv[1], sys.argv[2])
    """
)


def test_without_opentelemetry_nothing_of_it_is_imported(dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", WITHOUT_OTEL, dsn, qname()],
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"otel": True, "got": [1, 2], "loaded": []}
