"""pool: 500 concurrent executions whose execute awaits 1 s, on a pool of 5 connections.

jobrunner holds a connection only inside its short phase transactions, so the pool is free
while execute awaits. The naive version holds one session (and its connection and open
transaction) across the whole job, as the background write-ups describe. Same engine settings
for both: ``pool_size=5, max_overflow=0, pool_timeout=10``. Every checkout is timed by a
pool subclass; a checkout that gives up is a pool timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from jobrunner import AsyncJobRunner, PhasedJob, Registry
from jobrunner._schema import executions

from ._harness import Bench, Sample
from ._jobs import StatementCounter, create_schema, truncate

POOL = {"pool_size": 5, "max_overflow": 0, "pool_timeout": 10}


class SleepJob(PhasedJob, register=False):
    """Execute awaits ``SLEEP`` seconds; load and record are the framework's own writes."""

    name = "bench.sleep"
    seconds = 1.0

    async def execute(self, loaded: Any) -> None:
        await asyncio.sleep(self.seconds)


@dataclasses.dataclass
class PoolStats:
    """Checkout waits seen by one engine's pool."""

    waits: list[float] = dataclasses.field(default_factory=list)
    timeouts: int = 0

    def pool_class(self) -> type[AsyncAdaptedQueuePool]:
        stats = self

        class TimedPool(AsyncAdaptedQueuePool):
            def _do_get(self) -> Any:
                start = time.perf_counter()
                try:
                    return super()._do_get()
                except sa.exc.TimeoutError:
                    stats.timeouts += 1
                    raise
                finally:
                    stats.waits.append(time.perf_counter() - start)

        return TimedPool

    def extra(self, failed: int) -> dict[str, Any]:
        waits = sorted(self.waits)
        waited = [w for w in waits if w > 0.001]
        return {
            "checkouts": len(waits),
            "waited": len(waited),
            "max_wait_s": waits[-1] if waits else 0.0,
            "mean_wait_ms": 1000 * sum(waits) / len(waits) if waits else 0.0,
            "timeouts": self.timeouts,
            "failed": failed,
        }


def run(bench: Bench) -> None:
    n = bench.size(full=500, quick=50)
    SleepJob.seconds = 1.0 if not bench.quick else 0.2
    with bench.scratch_database() as url:
        create_schema(url)
        asyncio.run(_measure(bench, url, n))
    _notes(bench)
    bench.table(
        f"pool: {n} concurrent executions, execute awaits {SleepJob.seconds:g}s, pool_size=5",
        {
            "connections": "connections",
            "waited": "waits >1ms",
            "max_wait_s": "max wait s",
            "timeouts": "pool timeouts",
            "failed": "failed",
        },
    )


async def _measure(bench: Bench, url: sa.URL, n: int) -> None:
    await bench.ameasure(
        system="AsyncJobRunner",
        variant="phase sessions",
        n=n,
        concurrency=n,
        fn=lambda: _jobrunner(url, n),
    )
    await bench.ameasure(
        system="naive AsyncSession",
        variant="one session per job",
        n=n,
        concurrency=n,
        fn=lambda: _naive(url, n),
        repeat=1,  # its wall time is the pool timeout: one run says it all
    )


async def _jobrunner(url: sa.URL, n: int) -> Sample:
    truncate(url)
    stats = PoolStats()
    runner = AsyncJobRunner(
        url.set(drivername="postgresql+asyncpg"),
        registry=Registry([SleepJob]),
        poolclass=stats.pool_class(),
        **POOL,
    )
    try:
        with StatementCounter() as counter:
            await runner.run(SleepJob)  # connect once, warm the compiled cache
            stats.waits.clear()
            start = time.perf_counter()
            results = await asyncio.gather(
                *(runner.run(SleepJob) for _ in range(n)), return_exceptions=True
            )
            seconds = time.perf_counter() - start
    finally:
        await runner.aclose()
    failed = sum(1 for r in results if isinstance(r, BaseException) or not r.succeeded)
    return Sample(seconds=seconds, extra={**stats.extra(failed), "connections": counter.connects})


async def _naive(url: sa.URL, n: int) -> Sample:
    truncate(url)
    stats = PoolStats()
    engine = create_async_engine(
        url.set(drivername="postgresql+asyncpg"), poolclass=stats.pool_class(), **POOL
    )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    table = executions.c

    async def job() -> None:
        eid, now = uuid.uuid4(), datetime.now(UTC)
        async with sessions.begin() as session:  # held across the whole job
            await session.execute(sa.insert(executions).values(_row(eid, now)))
            await asyncio.sleep(SleepJob.seconds)
            done = sa.update(executions).where(table.id == eid)
            await session.execute(done.values(status="succeeded", finished_at=datetime.now(UTC)))

    try:
        with StatementCounter() as counter:
            await job()
            stats.waits.clear()
            start = time.perf_counter()
            results = await asyncio.gather(*(job() for _ in range(n)), return_exceptions=True)
            seconds = time.perf_counter() - start
    finally:
        await engine.dispose()
    failed = sum(1 for r in results if isinstance(r, BaseException))
    return Sample(seconds=seconds, extra={**stats.extra(failed), "connections": counter.connects})


def _row(eid: uuid.UUID, now: datetime) -> dict[str, Any]:
    return {
        "id": eid, "job": "bench.naive_sleep", "handler": "benchmarks.pool:naive",
        "args": {}, "status": "running", "phase": "load", "attempt": 1, "max_attempts": 1,
        "triggered_by": "inline", "worker": "bench-naive", "lease_token": 1,
        "created_at": now, "started_at": now, "heartbeat_at": now,
    }  # fmt: skip


def _notes(bench: Bench) -> None:
    jr = bench.measurements[0]
    wall, timeouts = jr.median_seconds, jr.extra("timeouts")
    target = 2.0 if not bench.quick else None
    if target is None:
        bench.note("targets (<= 2 s wall, 0 pool timeouts) apply to the full run only")
        return
    verdict = "met" if wall <= target else "NOT met"
    bench.note(f"target AsyncJobRunner <= 2 s wall: {verdict} ({wall:.2f}s median)")
    verdict = "met" if timeouts == 0 else "NOT met"
    bench.note(f"target zero pool timeouts for AsyncJobRunner: {verdict} ({timeouts:g})")
