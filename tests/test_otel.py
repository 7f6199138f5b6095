"""OpenTelemetry: spans per submit, attempt and phase, checked with the SDK's in-memory
exporter (a provider per test, passed to the instrument: no global state is touched)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode, get_current_span
from pydantic import BaseModel

from jobrunner import AsyncJobRunner, ExecutionStatus, JobRunner, PhasedJob, Registry, RetryPolicy
from jobrunner._schema import executions
from jobrunner.contrib.otel import OpenTelemetry

from .conftest import Backend, assert_no_checked_out

ROOT = Path(__file__).resolve().parent.parent


class Tracing:
    """A tracer provider of the test's own, exporting to memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = list(self.exporter.get_finished_spans())
        return [s for s in found if name is None or s.name == name]

    def one(self, name: str) -> ReadableSpan:
        [span] = self.spans(name)
        return span

    def children(self, parent: ReadableSpan) -> list[str]:
        return [s.name for s in self.spans() if s.parent and s.parent.span_id == _id(parent)]


def _id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def _trace(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    """A fresh provider and exporter, shut down after the test."""
    t = Tracing()
    yield t
    t.provider.shutdown()


@pytest.fixture
def traced(backend: Backend, tracing: Tracing) -> Iterator[JobRunner]:
    """A JobRunner traced into the test's provider."""
    r = JobRunner(backend.url, registry=Registry(), instruments=[OpenTelemetry(tracing.provider)])
    yield r
    assert_no_checked_out(r.engine.pool, "JobRunner")
    r.close()


@pytest.fixture
async def atraced(backend: Backend, tracing: Tracing) -> AsyncIterator[AsyncJobRunner]:
    """An AsyncJobRunner traced into the test's provider."""
    r = AsyncJobRunner(
        backend.url, registry=Registry(), instruments=[OpenTelemetry(tracing.provider)]
    )
    yield r
    assert_no_checked_out(r.engine.pool, "AsyncJobRunner")
    await r.aclose()


def _probe(tracing: Tracing) -> type[PhasedJob]:
    """A sync job whose execute reports the span current in it, and makes one of its own."""

    class Probe(PhasedJob):
        name = "otel.probe"
        timeout = 30  # a sync execute with a timeout runs in the runner's thread pool

        class Args(BaseModel):
            n: int

        def load(self, session: Any, args: Args) -> int:
            return args.n

        def execute(self, n: int) -> dict[str, Any]:
            current = get_current_span().get_span_context().span_id
            with tracing.tracer.start_as_current_span("user-call"):
                pass
            return {"span": current, "thread": threading.current_thread().name}

        def record(self, session: Any, result: dict[str, Any]) -> None:
            pass

    return Probe


def _check_attempt(
    tracing: Tracing,
    execution: Any,
    job: str,
    attempt: int = 1,
    phases: tuple[str, ...] = ("load", "execute", "record"),
) -> ReadableSpan:
    """The attempt's CONSUMER span, a child per phase the job defines, their attributes."""
    [process] = [
        s for s in tracing.spans("process default") if s.attributes["jobrunner.attempt"] == attempt
    ]
    assert process.kind is SpanKind.CONSUMER
    attributes = dict(process.attributes or {})
    assert attributes["messaging.system"] == "jobrunner"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == "default"
    assert attributes["messaging.message.id"] == str(execution.id)
    assert attributes["messaging.client.id"] == execution.worker
    assert attributes["jobrunner.job"] == job
    assert sorted(tracing.children(process)) == sorted(phases)
    for phase in phases:
        [span] = [s for s in tracing.spans(phase) if s.parent and s.parent.span_id == _id(process)]
        assert span.kind is SpanKind.INTERNAL
        assert span.attributes["jobrunner.phase"] == phase
        assert _trace(span) == _trace(process)
    return process


def _execute_span(tracing: Tracing, process: ReadableSpan) -> ReadableSpan:
    [span] = [s for s in tracing.spans("execute") if s.parent and s.parent.span_id == _id(process)]
    return span


def test_inline_run_is_a_child_of_the_callers_span(traced: JobRunner, tracing: Tracing) -> None:
    """run(): process span under the caller's span, phases under it, execute current in
    the job's thread (a span the job makes nests under execute)."""
    probe = _probe(tracing)
    with tracing.tracer.start_as_current_span("caller") as caller:
        execution = traced.run(probe, {"n": 1})
    assert execution.status is ExecutionStatus.SUCCEEDED
    assert execution.result["thread"].startswith("jobrunner-sync")  # ran in the pool
    assert not tracing.spans("create default")  # no message in between: no producer
    process = _check_attempt(tracing, execution, "otel.probe")
    assert (
        process.parent is not None and process.parent.span_id == caller.get_span_context().span_id
    )
    assert process.status.status_code is StatusCode.UNSET
    execute = _execute_span(tracing, process)
    assert execution.result["span"] == _id(execute)
    user = tracing.one("user-call")
    assert user.parent is not None and user.parent.span_id == _id(execute)
    stored = execution.trace_context
    assert (
        stored is not None and f"{caller.get_span_context().trace_id:032x}" in stored["traceparent"]
    )


async def test_async_runner_makes_the_same_spans(atraced: AsyncJobRunner, tracing: Tracing) -> None:
    """AsyncJobRunner: an async execute on the loop and a sync one in a thread both run
    with their execute span current."""

    class AsyncProbe(PhasedJob):
        name = "otel.async_probe"

        async def load(self, session: Any, args: Any) -> None:
            return None

        async def execute(self, loaded: Any) -> dict[str, Any]:
            await asyncio.sleep(0)
            with tracing.tracer.start_as_current_span("user-call-async"):
                await asyncio.sleep(0)
            return {"span": get_current_span().get_span_context().span_id}

        async def record(self, session: Any, result: Any) -> None:
            pass

    with tracing.tracer.start_as_current_span("caller") as caller:
        execution = await atraced.run(AsyncProbe)
        threaded = await atraced.run(_probe(tracing), {"n": 2})
    caller_id = caller.get_span_context().span_id
    for done, _job, user in (
        (execution, "otel.async_probe", "user-call-async"),
        (threaded, "otel.probe", "user-call"),
    ):
        assert done.status is ExecutionStatus.SUCCEEDED, done.error_message
        [process] = [
            s
            for s in tracing.spans("process default")
            if s.attributes["messaging.message.id"] == str(done.id)
        ]
        assert process.parent is not None and process.parent.span_id == caller_id
        assert sorted(tracing.children(process)) == ["execute", "load", "record"]
        execute = _execute_span(tracing, process)
        assert done.result["span"] == _id(execute)
        span = tracing.one(user)
        assert span.parent is not None and span.parent.span_id == _id(execute)
    assert threaded.result["thread"].startswith("jobrunner-async")


def _producer_and_process(tracing: Tracing, execution_id: uuid.UUID) -> tuple[Any, Any]:
    [create] = tracing.spans("create default")
    assert create.kind is SpanKind.PRODUCER
    assert create.attributes["messaging.operation.type"] == "create"
    assert create.attributes["messaging.message.id"] == str(execution_id)
    assert create.attributes["messaging.destination.name"] == "default"
    [process] = tracing.spans("process default")
    assert process.parent is not None and process.parent.span_id == _id(create)
    assert [link.context.span_id for link in process.links] == [_id(create)]
    assert _trace(process) == _trace(create)
    return create, process


def test_worker_run_continues_the_submitters_trace(traced: JobRunner, tracing: Tracing) -> None:
    """submit() makes a PRODUCER span stored on the row; the worker's CONSUMER span is its
    child and links to it."""
    probe = traced.registry.register(_probe(tracing))
    with tracing.tracer.start_as_current_span("request") as request:
        eid = traced.submit(probe, {"n": 3})
    stored = traced.get(eid).trace_context
    assert stored is not None
    create = tracing.one("create default")
    assert create.parent is not None and create.parent.span_id == request.get_span_context().span_id
    assert stored["traceparent"].startswith(f"00-{_trace(create):032x}-{_id(create):016x}-")
    traced.work(until_idle=True, concurrency=2)
    execution = traced.get(eid)
    assert execution.status is ExecutionStatus.SUCCEEDED
    _, process = _producer_and_process(tracing, eid)
    _check_attempt(tracing, execution, "otel.probe")
    assert execution.result["span"] == _id(_execute_span(tracing, process))


async def test_async_worker_run_continues_the_trace(
    atraced: AsyncJobRunner, tracing: Tracing
) -> None:
    """The same through AsyncJobRunner.run_due()."""
    probe = atraced.registry.register(_probe(tracing))
    eid = await atraced.submit(probe, {"n": 4})
    [done] = await atraced.run_due()
    assert done.id == eid and done.status is ExecutionStatus.SUCCEEDED
    _producer_and_process(tracing, eid)
    _check_attempt(tracing, done, "otel.probe")


def test_failure_sets_error_status_and_type(traced: JobRunner, tracing: Tracing) -> None:
    """A failing execute: its span records the exception; the attempt's span is ERROR with
    error.type; record never ran."""

    class Broken(PhasedJob):
        name = "otel.broken"
        retry = RetryPolicy(max_attempts=1)

        def execute(self, loaded: Any) -> None:
            raise ValueError("no such report")

    execution = traced.run(Broken)
    assert execution.status is ExecutionStatus.FAILED
    process = tracing.one("process default")
    assert process.status.status_code is StatusCode.ERROR
    assert "no such report" in (process.status.description or "")
    assert process.attributes["error.type"] == "ValueError"
    assert process.attributes["jobrunner.outcome"] == "failed"
    execute = tracing.one("execute")
    assert execute.status.status_code is StatusCode.ERROR
    assert execute.attributes["error.type"] == "ValueError"
    assert [e.name for e in execute.events] == ["exception"]
    assert not tracing.spans("record")


def test_retries_are_events_and_each_attempt_a_span(traced: JobRunner, tracing: Tracing) -> None:
    """Two failures then success: three process spans (ERROR, ERROR, UNSET), the failed
    ones with a retry_scheduled event, all under the caller's span."""
    calls: list[int] = []

    class Flaky(PhasedJob):
        name = "otel.flaky"
        retry = RetryPolicy(
            max_attempts=3, wait_initial=0.01, jitter=0, retry_on=(ConnectionError,)
        )

        def execute(self, loaded: Any) -> int:
            calls.append(1)
            if len(calls) < 3:
                raise ConnectionError("try again")
            return len(calls)

    with tracing.tracer.start_as_current_span("caller") as caller:
        execution = traced.run(Flaky)
    assert execution.status is ExecutionStatus.SUCCEEDED and execution.attempt == 3
    spans = sorted(
        tracing.spans("process default"), key=lambda s: s.attributes["jobrunner.attempt"]
    )
    assert [s.attributes["jobrunner.attempt"] for s in spans] == [1, 2, 3]
    assert [s.status.status_code for s in spans] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert [s.attributes["jobrunner.outcome"] for s in spans] == ["retried", "retried", "succeeded"]
    for span in spans[:2]:
        [event] = span.events
        assert event.name == "retry_scheduled"
        assert event.attributes["jobrunner.retry.wait_s"] >= 0
        assert span.attributes["error.type"] == "ConnectionError"
    assert not spans[2].events
    caller_id = caller.get_span_context().span_id
    assert all(s.parent is not None and s.parent.span_id == caller_id for s in spans)


def test_worker_retry_links_every_attempt_to_the_producer(
    traced: JobRunner, tracing: Tracing
) -> None:
    """A retry left for a worker: each attempt is its own process span, linked to the one
    create span."""
    calls: list[int] = []

    class Flaky(PhasedJob):
        name = "otel.flaky_worker"
        # due an hour later: the worker leaves it, whatever the machine's speed
        retry = RetryPolicy(
            max_attempts=2, wait_initial=3600, jitter=0, retry_on=(ConnectionError,)
        )

        def execute(self, loaded: Any) -> str:
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("broker away")
            return "ok"

    traced.registry.register(Flaky)
    eid = traced.submit(Flaky)
    traced.work(until_idle=True)  # the first attempt fails: retrying, due in an hour
    assert traced.get(eid).status is ExecutionStatus.RETRYING
    with traced.engine.begin() as conn:  # the hour passes
        conn.execute(
            sa.update(executions).where(executions.c.id == eid).values(due_at=datetime.now(UTC))
        )
    assert [e.id for e in traced.run_due()] == [eid]
    assert traced.get(eid).status is ExecutionStatus.SUCCEEDED
    create = tracing.one("create default")
    spans = sorted(
        tracing.spans("process default"), key=lambda s: s.attributes["jobrunner.attempt"]
    )
    assert [s.attributes["jobrunner.outcome"] for s in spans] == ["retried", "succeeded"]
    for span in spans:
        assert [link.context.span_id for link in span.links] == [_id(create)]
        assert span.parent is not None and span.parent.span_id == _id(create)
    assert [e.name for e in spans[0].events] == ["retry_scheduled"]


def test_lost_lease_is_an_event(traced: JobRunner, tracing: Tracing) -> None:
    """Another worker takes the execution over during execute: the attempt's span gets a
    lease_lost event and ends in ERROR; nothing of it is written."""
    engine = traced.engine

    class TakenOver(PhasedJob):
        name = "otel.taken_over"

        def execute(self, loaded: Any) -> str:
            with engine.begin() as conn:  # what a takeover does to the fencing token
                conn.execute(
                    sa.update(executions)
                    .where(executions.c.id == uuid.UUID(self.execution_id))
                    .values(lease_token=executions.c.lease_token + 1)
                )
            return "late"

    traced.registry.register(TakenOver)
    eid = traced.submit(TakenOver)
    traced.run_due()
    assert traced.get(eid).checkpointed is False
    process = tracing.one("process default")
    assert [e.name for e in process.events] == ["lease_lost"]
    assert process.events[0].attributes["jobrunner.phase"] == "execute"
    assert process.attributes["jobrunner.outcome"] == "lease_lost"
    assert process.status.status_code is StatusCode.ERROR


def test_nothing_is_imported_without_the_extras(tmp_path: Path) -> None:
    """import jobrunner and a run, sync and async: neither OpenTelemetry nor
    prometheus_client is imported (they are installed here)."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from jobrunner import AsyncJobRunner, JobRunner, PhasedJob

        class Job(PhasedJob):
            name = "noimport.job"
            def execute(self, loaded):
                return 1

        with JobRunner("sqlite:///{tmp_path / "a.db"}") as runner:
            runner.create_schema()
            assert runner.run(Job).succeeded
            eid = runner.submit(Job)
            runner.run_due()
            assert runner.get(eid).succeeded

        async def main():
            async with AsyncJobRunner("sqlite+aiosqlite:///{tmp_path / "b.db"}") as runner:
                await runner.create_schema()
                assert (await runner.run(Job)).succeeded

        asyncio.run(main())
        print(sorted(m for m in sys.modules
                     if m.startswith(("opentelemetry", "prometheus_client"))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_apscheduler_fires_are_traced(backend: Backend, tracing: Tracing) -> None:
    """A real BackgroundScheduler fire: submitted (PRODUCER) and run (CONSUMER, its child)
    by the fires' runner, with the instrument given through configure()."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from jobrunner.contrib import apscheduler as aps

    from . import observed_jobs
    from ._services import wait_for

    aps.configure(backend.url, instruments=[OpenTelemetry(tracing.provider)])
    scheduler = BackgroundScheduler()
    try:
        aps.schedule(scheduler, observed_jobs.Ok, "date", id="otel-fire")
        scheduler.start()
        with JobRunner(backend.url, instruments=[]) as reader:
            [execution] = wait_for(
                lambda: [e for e in reader.list() if e.status is ExecutionStatus.SUCCEEDED],
                "the fire's execution",
            )
    finally:
        scheduler.shutdown(wait=True)
        aps.close_runners()
        aps.configure()
    assert execution.triggered_by == "apscheduler"
    _producer_and_process(tracing, execution.id)  # shutdown(wait=True) ended the fire
    # a job with only execute: no spans where only jobrunner's writes run
    _check_attempt(tracing, execution, "observed.ok", phases=("execute",))


def test_unsampled_executions_make_no_spans(backend: Backend) -> None:
    """A sampler that drops everything: executions run as usual, nothing is exported, and
    the execute phase sees the (unsampled) attempt's context."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing()
    with JobRunner(backend.url, registry=Registry(), instruments=[OpenTelemetry(provider)]) as r:
        probe = r.registry.register(_probe(tracing))
        eid = r.submit(probe, {"n": 5})
        [done] = r.run_due()
    provider.shutdown()
    assert done.id == eid and done.status is ExecutionStatus.SUCCEEDED
    assert exporter.get_finished_spans() == ()
    stored = done.trace_context
    assert stored is not None
    assert int(stored["traceparent"].rsplit("-", 1)[1], 16) & 1 == 0  # not sampled
    assert done.result["span"] != 0  # the attempt's context, carried into execute


class _Asked(Sampler):
    """Samples nothing, and remembers which spans the tracer asked it about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any,
                      **kwargs: Any) -> SamplingResult:
        self.asked.append(name)
        return SamplingResult(Decision.DROP)

    def get_description(self) -> str:
        return "asked"


def test_an_unsampled_attempt_starts_no_phase_spans(backend: Backend) -> None:
    """Unsampled, an attempt asks the tracer for its own span only: no phase span is
    started (not even a non-recording one), and its context is still current in execute."""
    sampler = _Asked()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing()
    with JobRunner(backend.url, registry=Registry(), instruments=[OpenTelemetry(provider)]) as r:
        probe = r.registry.register(_probe(tracing))
        r.submit(probe, {"n": 7})
        [worked] = r.run_due()
        inline = r.run(probe, {"n": 8})
    provider.shutdown()
    tracing.provider.shutdown()
    assert worked.status is ExecutionStatus.SUCCEEDED
    assert inline.status is ExecutionStatus.SUCCEEDED
    # a submit, then one attempt each (an inline run makes no create span)
    assert sampler.asked == ["create default", "process default", "process default"]
    assert exporter.get_finished_spans() == ()
    assert worked.result["span"] != 0 and inline.result["span"] != 0


def test_phase_spans_can_be_left_out(backend: Backend, tracing: Tracing) -> None:
    """phase_spans=False: create and process spans only; the process span is current in
    execute."""
    instrument = OpenTelemetry(tracing.provider, phase_spans=False)
    with JobRunner(backend.url, registry=Registry(), instruments=[instrument]) as r:
        probe = r.registry.register(_probe(tracing))
        r.submit(probe, {"n": 6})
        [done] = r.run_due()
    assert done.status is ExecutionStatus.SUCCEEDED
    assert sorted(s.name for s in tracing.spans()) == [
        "create default", "process default", "user-call"]
    process = tracing.one("process default")
    assert done.result["span"] == _id(process)
    assert process.attributes["jobrunner.phase"] == "record"
