"""loop_lag: event-loop lag while blocking sync jobs and async jobs share an AsyncJobRunner.

A ticker coroutine on the runner's loop asks to sleep 1 ms, again and again; lag is how much
later than asked it wakes up (p50/p99/max). Rows: the idle loop (ticker alone, the floor);
8 sync jobs that ``time.sleep`` in execute plus 8 async jobs, concurrently, wave after wave
(jobrunner sends sync execute to a worker thread); and, for contrast, the mistake jobrunner
exists to catch: ``time.sleep`` inside an ``async def`` execute, on the loop. If
``jobrunner.LoopMonitor`` exists, its CPU cost on an idle loop is measured too.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa

import jobrunner
from jobrunner import AsyncJobRunner, PhasedJob, Registry

from ._harness import Bench, Sample
from ._jobs import create_schema, truncate

TICK = 0.001
SYNC_JOBS = ASYNC_JOBS = 8


class BlockingSync(PhasedJob, register=False):
    """A sync execute that blocks (runs in a worker thread under AsyncJobRunner)."""

    name = "bench.blocking_sync"
    seconds = 0.5

    def execute(self, loaded: Any) -> None:
        time.sleep(self.seconds)


class Awaiting(PhasedJob, register=False):
    """An async execute that awaits, as well-behaved async jobs do."""

    name = "bench.awaiting"
    seconds = 0.5

    async def execute(self, loaded: Any) -> None:
        await asyncio.sleep(self.seconds)


class BlockingAsync(PhasedJob, register=False):
    """The mistake: ``time.sleep`` inside ``async def`` execute, on the loop."""

    name = "bench.blocking_async"
    seconds = 0.02

    async def execute(self, loaded: Any) -> None:
        time.sleep(self.seconds)  # blocking the loop is what this row measures


def run(bench: Bench) -> None:
    waves = bench.size(full=4, quick=1)
    BlockingSync.seconds = Awaiting.seconds = 0.5 if not bench.quick else 0.2
    with bench.scratch_database() as url:
        create_schema(url)
        asyncio.run(_measure(bench, url, waves))
    sleep = BlockingSync.seconds
    bench.table(
        f"loop_lag: {TICK * 1000:g} ms ticker, {SYNC_JOBS} sync time.sleep({sleep:g})"
        f" + {ASYNC_JOBS} async jobs per wave, {waves} wave(s)",
        {
            "p50_ms": "p50 ms",
            "p99_ms": "p99 ms",
            "max_ms": "max ms",
            "ticks": "ticks",
            "cpu_overhead_pct": "CPU % of a core",
        },
    )


async def _measure(bench: Bench, url: sa.URL, waves: int) -> None:
    seconds = waves * BlockingSync.seconds
    await bench.ameasure(
        system="idle loop",
        variant="ticker only",
        n=0,
        concurrency=0,
        fn=lambda: _idle(seconds),
    )
    runner = AsyncJobRunner(
        url.set(drivername="postgresql+asyncpg"),
        registry=Registry([BlockingSync, Awaiting, BlockingAsync]),
        pool_size=SYNC_JOBS + ASYNC_JOBS,
    )
    try:
        await runner.run(Awaiting)
        mixed = [BlockingSync] * SYNC_JOBS + [Awaiting] * ASYNC_JOBS
        lag = await bench.ameasure(
            system="AsyncJobRunner",
            variant="8 sync blocking + 8 async",
            n=waves * len(mixed),
            concurrency=len(mixed),
            fn=lambda: _with_ticker(url, lambda: _waves(runner, mixed, waves)),
        )
        await bench.ameasure(
            system="AsyncJobRunner",
            variant=f"mistake: time.sleep({BlockingAsync.seconds:g}) in async def",
            n=SYNC_JOBS,
            concurrency=SYNC_JOBS,
            fn=lambda: _with_ticker(url, lambda: _waves(runner, [BlockingAsync] * SYNC_JOBS, 1)),
        )
    finally:
        await runner.aclose()
    await _monitor_overhead(bench, seconds=2.0 if not bench.quick else 0.5)
    p99 = lag.extra("p99_ms")
    verdict = "met" if p99 < 5 else "NOT met"
    bench.note(f"target p99 lag < 5 ms with blocking sync jobs: {verdict} ({p99:.2f} ms)")
    ideal = waves * BlockingSync.seconds
    bench.note(
        f"waves took {lag.median_seconds:.2f}s for {ideal:g}s of sleeping: sync execute runs "
        "on asyncio's default thread pool (min(32, CPUs + 4) threads)"
    )


async def _waves(runner: AsyncJobRunner, jobs: list[type[PhasedJob]], waves: int) -> None:
    for _ in range(waves):
        results = await asyncio.gather(*(runner.run(job) for job in jobs))
        failed = [r for r in results if not r.succeeded]
        if failed:
            raise RuntimeError(f"{len(failed)} executions failed: {failed[0].error_message}")


async def _with_ticker(url: sa.URL, work: Callable[[], Awaitable[None]]) -> Sample:
    truncate(url)
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_tick(lags, stop))
    start = time.perf_counter()
    try:
        await work()
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        await ticker
    return Sample(seconds=seconds, extra=_percentiles(lags))


async def _idle(seconds: float) -> Sample:
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_tick(lags, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await ticker
    return Sample(seconds=seconds, extra=_percentiles(lags))


async def _tick(lags: list[float], stop: asyncio.Event) -> None:
    clock = time.perf_counter
    while not stop.is_set():
        asked = clock()
        await asyncio.sleep(TICK)
        lags.append(clock() - asked - TICK)


def _percentiles(lags: list[float]) -> dict[str, Any]:
    if len(lags) < 2:
        return {"ticks": len(lags)}
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    return {
        "p50_ms": 1000 * cuts[49],
        "p99_ms": 1000 * cuts[98],
        "max_ms": 1000 * max(lags),
        "ticks": len(lags),
    }


# -- the lag monitor's own cost ------------------------------------------------------------


async def _monitor_overhead(bench: Bench, seconds: float) -> None:
    base = await bench.ameasure(
        system="idle loop",
        variant="no monitor (CPU baseline)",
        n=0,
        concurrency=0,
        fn=lambda: _cpu(seconds, monitor=False),
    )
    mon = await bench.ameasure(
        system="idle loop",
        variant="LoopMonitor, default settings",
        n=0,
        concurrency=0,
        fn=lambda: _cpu(seconds, monitor=True),
    )
    overhead = mon.extra("cpu_overhead_pct") - base.extra("cpu_overhead_pct")
    verdict = "met" if overhead < 1 else "NOT met"
    bench.note(f"target LoopMonitor < 1% CPU: {verdict} ({overhead:.3f}% of a core over idle)")


async def _cpu(seconds: float, *, monitor: bool) -> Sample:
    """CPU time of this process while the loop idles for ``seconds`` (with a monitor)."""
    loop_monitor = jobrunner.LoopMonitor() if monitor else None
    if loop_monitor is not None:
        loop_monitor.start()
    cpu = time.process_time()
    await asyncio.sleep(seconds)
    used = time.process_time() - cpu
    if loop_monitor is not None:
        await loop_monitor.stop()
    return Sample(seconds=seconds, extra={"cpu_overhead_pct": 100 * used / seconds})
