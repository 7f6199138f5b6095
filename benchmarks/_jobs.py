"""The jobs the benchmarks run, and small helpers to drive many of them at once."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from jobrunner import PhasedJob, _prepared
from jobrunner._schema import metadata

from ._harness import Sample


class AsyncNoop(PhasedJob, register=False):
    """Does nothing, asynchronously: only the framework's own statements run."""

    name = "bench.async_noop"

    async def execute(self, loaded: Any) -> None:
        return None


class AsyncNoopPhases(PhasedJob, register=False):
    """Async load/execute/record that do nothing: measures the phase sessions' cost."""

    name = "bench.async_noop_phases"

    async def load(self, session: Any, args: Any) -> None:
        return None

    async def execute(self, loaded: Any) -> None:
        return None

    async def record(self, session: Any, result: Any) -> None:
        return None


class SyncNoop(PhasedJob, register=False):
    """Does nothing, synchronously (JobRunner, no event loop)."""

    name = "bench.sync_noop"

    def execute(self, loaded: Any) -> None:
        return None


def create_schema(url: sa.URL) -> None:
    """Create jobrunner's tables in the (scratch) database at ``url``."""
    engine = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        metadata.create_all(conn)
    engine.dispose()


def truncate(url: sa.URL, *tables: str) -> None:
    """Empty ``tables`` (default: jobrunner's) between runs, outside the timing."""
    names = ", ".join(tables or ("jobrunner_attempts", "jobrunner_executions"))
    engine = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


async def run_many(one: Callable[[], Awaitable[Any]], n: int, concurrency: int) -> float:
    """Call ``one()`` ``n`` times from ``concurrency`` workers; returns the seconds taken."""
    counter = itertools.count()

    async def worker() -> None:
        while next(counter) < n:
            await one()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def run_many_sample(one: Callable[[], Awaitable[Any]], n: int, concurrency: int) -> Sample:
    """:func:`run_many` as a :class:`Sample`, with this process's CPU ms per call."""
    cpu = time.process_time()
    seconds = await run_many(one, n, concurrency)
    return Sample(seconds=seconds, extra={"cpu_ms": cpu_ms(cpu, n)})


def cpu_ms(since: float, n: int) -> float:
    """Milliseconds of this process's CPU (all threads) per execution since ``since``."""
    return 1000 * (time.process_time() - since) / n


class SyncNoopPhases(PhasedJob, register=False):
    """Sync load/execute/record that do nothing (JobRunner's phase sessions)."""

    name = "bench.sync_noop_phases"

    def load(self, session: Any, args: Any) -> None:
        return None

    def execute(self, loaded: Any) -> None:
        return None

    def record(self, session: Any, result: Any) -> None:
        return None


def instruments(ratio: float | None, *, phase_spans: bool = True) -> tuple[list[Any], Any]:
    """Prometheus metrics, plus OpenTelemetry tracing ``ratio`` of the executions (None:
    metrics only) into an exporter that drops the spans; and the tracer provider to shut
    down after the run (or None)."""
    from prometheus_client import CollectorRegistry

    from jobrunner.contrib.prometheus import Metrics

    metrics = Metrics(CollectorRegistry())
    if ratio is None:
        return [metrics], None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from jobrunner.contrib.otel import OpenTelemetry

    class Discard(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=100_000))
    return [OpenTelemetry(provider, phase_spans=phase_spans), metrics], provider


class StatementCounter:
    """Counts statements, commits and new connections of every engine in this process.

    Listens on the ``Engine`` and ``Pool`` classes, so engines a runner creates internally
    (e.g. a second, autocommit engine) are counted too. Use as a context manager.
    """

    def __init__(self) -> None:
        self.statements = 0
        self.commits = 0
        self.connects = 0
        self._hooks = (
            (sa.Engine, "before_cursor_execute", self._statement),
            (sa.Engine, "commit", self._commit),
            (sa.pool.Pool, "connect", self._connect),
        )
        for target, name, fn in self._hooks:
            event.listen(target, name, fn)
        # The per-execution writes bypass Core (and its events): count them where they run.
        self._prepared = _prepared.execute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.statements += 1
            return self._prepared(*args, **kwargs)

        _prepared.execute = counted  # type: ignore[assignment]

    def __enter__(self) -> StatementCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        for target, name, fn in self._hooks:
            event.remove(target, name, fn)
        _prepared.execute = self._prepared  # type: ignore[assignment]

    def _statement(self, *args: Any) -> None:
        self.statements += 1

    def _commit(self, *args: Any) -> None:
        self.commits += 1

    def _connect(self, *args: Any) -> None:
        self.connects += 1

    def reset(self) -> None:
        self.statements = self.commits = self.connects = 0
