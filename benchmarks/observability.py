"""observability: throughput with tracing and metrics on, beside the same run with them off.

In one run, on one scratch PostgreSQL database, each row four times: without instruments;
with Prometheus (``Metrics`` into a registry of its own); with OpenTelemetry tracing every
execution plus Prometheus; and with 1 execution in 10 traced (``TraceIdRatioBased(0.1)``)
plus Prometheus. The tracer provider is the SDK's with a ``BatchSpanProcessor`` into an
exporter that drops the spans, so the cost is jobrunner's and the SDK's, not a collector's
network. The variants alternate run by run so that drift on the machine hits them alike.
Rows: ``AsyncJobRunner.run()`` 8-way (four spans per execution: process, load, execute,
record), the async worker end to end (submit N, then ``work(until_idle=True)``: a producer
span per submit too) and the sync worker (``JobRunner``, 8 slots). The note under the
table gives each variant's cost in throughput and in client CPU per execution (ms and %
of the run without instruments): on a shared machine the CPU is the steadier of the two.
For a count that does not depend on the machine's load at all, see
``python -m benchmarks.instructions`` (callgrind).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from jobrunner import AsyncJobRunner, JobRunner, Registry

from ._harness import Bench, Sample
from ._jobs import (
    AsyncNoopPhases,
    SyncNoop,
    create_schema,
    instruments,
    run_many,
    run_many_sample,
    truncate,
)

CONCURRENCY = 8
#: Instruments off; metrics only; every execution traced plus metrics; 1 in 10 traced.
VARIANTS = ("off", "metrics", "traces+metrics", "traces 10%+metrics")


def _instruments(variant: str) -> tuple[list[Any], Any]:
    """The instruments of a run, and the provider to shut down after it (or None)."""
    if variant == "off":
        return [], None
    if variant == "metrics":
        return instruments(None)
    return instruments(0.1 if variant.startswith("traces 10%") else 1.0)


def run(bench: Bench) -> None:
    n = bench.size(full=2_000, quick=100)
    with bench.scratch_database() as url:
        create_schema(url)
        rows: list[tuple[str, str, Callable[[str], Sample]]] = [
            ("AsyncJobRunner", "run(), 3 phases", lambda v: asyncio.run(_inline(url, n, v))),
            (
                "AsyncJobRunner worker",
                "submit N, work()",
                lambda v: asyncio.run(_aworker(url, n, v)),
            ),
            ("JobRunner worker", "submit N, work()", lambda v: _sworker(url, n, v)),
        ]
        for system, variant, fn in rows:
            _pair(bench, system, variant, n, fn)
    bench.table(
        f"observability: {n:,} no-op executions, PostgreSQL, {CONCURRENCY}-way",
        {"cpu_ms": "client CPU ms/exec"},
    )


def _pair(bench: Bench, system: str, variant: str, n: int, fn: Callable[[str], Sample]) -> None:
    """Both variants of a row, alternating run by run; a note with the cost."""
    samples: dict[str, list[Sample]] = {v: [] for v in VARIANTS}
    for i in range(bench.repeat):
        order = VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            bench._progress(system, f"{variant}, {v}", i, bench.repeat)
            samples[v].append(fn(v))
    rates = {}
    for v in VARIANTS:
        m = bench._record(system, f"{variant}, {v}", n, CONCURRENCY, samples[v], None, "executions")
        rates[v] = m.median_rate or 0.0
    cpu = {v: statistics.median(s.extra["cpu_ms"] for s in samples[v]) for v in VARIANTS}
    costs = "; ".join(
        f"{v}: throughput {_cost(rates['off'], rates[v]):+.1f} %, "
        f"CPU {cpu[v] - cpu['off']:+.2f} ms ({_growth(cpu['off'], cpu[v]):+.1f} %)"
        for v in VARIANTS[1:]
    )
    bench.note(
        f"{system} {variant}: {rates['off']:.0f}/s and {cpu['off']:.2f} ms client CPU per "
        f"execution off; cost (target < 10 %): {costs}"
    )


def _cost(off: float, on: float) -> float:
    """Throughput lost, in % of the throughput without instruments."""
    return (off - on) / off * 100 if off else 0.0


def _growth(off: float, on: float) -> float:
    """Client CPU per execution added, in % of the CPU without instruments."""
    return (on - off) / off * 100 if off else 0.0


def _cpu_sample(seconds: float, cpu: float, n: int) -> Sample:
    return Sample(
        seconds=seconds, extra={"cpu_ms": round((time.process_time() - cpu) * 1000 / n, 3)}
    )


async def _inline(url: sa.URL, n: int, variant: str) -> Sample:
    truncate(url)
    instruments, provider = _instruments(variant)
    runner = AsyncJobRunner(
        url.set(drivername="postgresql+asyncpg"),
        registry=Registry([AsyncNoopPhases]),
        instruments=instruments,
        pool_size=CONCURRENCY,
    )
    try:
        await run_many(lambda: runner.run(AsyncNoopPhases), 10 * CONCURRENCY, CONCURRENCY)
        cpu = time.process_time()
        sample = await run_many_sample(lambda: runner.run(AsyncNoopPhases), n, CONCURRENCY)
        return _cpu_sample(sample.seconds, cpu, n)
    finally:
        await runner.aclose()
        if provider is not None:
            provider.shutdown()


async def _aworker(url: sa.URL, n: int, variant: str) -> Sample:
    truncate(url)
    instruments, provider = _instruments(variant)
    runner = AsyncJobRunner(
        url.set(drivername="postgresql+asyncpg"),
        registry=Registry([AsyncNoopPhases]),
        instruments=instruments,
        pool_size=CONCURRENCY + 2,
    )
    try:
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(n):
            await runner.submit(AsyncNoopPhases)
        await runner.work(concurrency=CONCURRENCY, until_idle=True)
        return _cpu_sample(time.perf_counter() - start, cpu, n)
    finally:
        await runner.aclose()
        if provider is not None:
            provider.shutdown()


def _sworker(url: sa.URL, n: int, variant: str) -> Sample:
    truncate(url)
    instruments, provider = _instruments(variant)
    runner = JobRunner(
        url.set(drivername="postgresql+psycopg"),
        registry=Registry([SyncNoop]),
        instruments=instruments,
        pool_size=CONCURRENCY + 2,
    )
    try:
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(n):
            runner.submit(SyncNoop)
        runner.work(concurrency=CONCURRENCY, until_idle=True)
        return _cpu_sample(time.perf_counter() - start, cpu, n)
    finally:
        runner.close()
        if provider is not None:
            provider.shutdown()
