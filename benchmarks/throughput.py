"""throughput: no-op executions per second on PostgreSQL, next to the floor and the alternatives.

In one run, on one scratch database: the floor (jobrunner's three transactions by hand with
raw asyncpg, 1- and 8-way), naive SQLAlchemy ``AsyncSession`` code with the same three
transactions, ``AsyncJobRunner`` (sequential, 8 concurrent; with and without load/record
phases; default pool), the worker end to end (submit N, then ``work(until_idle=True)``
with 8 slots, on both runners), ``JobRunner`` (sequential, psycopg), procrastinate (one worker,
concurrency 8) and Celery (prefork worker, concurrency 2, Redis broker, SQLAlchemy database
result backend on PostgreSQL). ``--profile`` also profiles ``AsyncJobRunner`` with pyinstrument.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import QueuePool

from jobrunner import AsyncJobRunner, JobRunner, Registry

from . import _profile
from ._floor import run_floor
from ._harness import Bench, Measurement, Sample
from ._jobs import (
    AsyncNoop,
    AsyncNoopPhases,
    StatementCounter,
    SyncNoop,
    cpu_ms,
    create_schema,
    run_many,
    run_many_sample,
    truncate,
)
from ._rivals import CeleryRig, run_naive_sqlalchemy, run_procrastinate

BROKER_ENV = "JOBRUNNER_BENCH_BROKER"
DEFAULT_BROKER = "redis://127.0.0.1:6379/14"
CONCURRENCY = 8


def run(bench: Bench) -> None:
    n = bench.size(full=2_000, quick=100)
    with bench.scratch_database() as url:
        create_schema(url)
        floors = asyncio.run(_async_systems(bench, url, n))
        _sync_runner(bench, url, n, floors[1])
        _sync_worker(bench, url, n, floors[CONCURRENCY])
        _celery(bench, url, n, floors[CONCURRENCY])
        counts = asyncio.run(_statement_counts(url))
        if bench.options.profile:
            _profile.profile_async_runner(url, bench.size(full=2_000, quick=200))
    _notes(bench, counts)
    bench.table(
        f"throughput: {n:,} no-op executions, PostgreSQL",
        {
            "cpu_ms": "client CPU ms/exec",
            "submit_per_s": "submit/s",
            "drain_per_s": "drain/s",
            "pool_size": "pool_size",
            "connects": "new conns",
        },
    )


async def _async_systems(bench: Bench, url: sa.URL, n: int) -> dict[int, Measurement]:
    floors: dict[int, Measurement] = {}
    for conc in (1, CONCURRENCY):
        floors[conc] = await bench.ameasure(
            system="floor (asyncpg)",
            variant="3 tx by hand",
            n=n,
            concurrency=conc,
            fn=lambda c=conc: _fresh(url, run_floor(url, n, c)),
        )
    floor = floors[CONCURRENCY]
    await bench.ameasure(
        system="SQLAlchemy naive",
        variant="AsyncSession, 3 tx",
        n=n,
        concurrency=CONCURRENCY,
        fn=lambda: _fresh(url, run_naive_sqlalchemy(url, n, CONCURRENCY)),
        ratio_to=floor,
    )
    # The diagnostic rows (phase sessions, default pool) run once to fit the time budget.
    variants: list[tuple[str, type[Any], int, dict[str, Any], int | None]] = [
        ("no-op execute", AsyncNoop, 1, {}, None),
        ("no-op execute", AsyncNoop, CONCURRENCY, {"pool_size": CONCURRENCY}, None),
        ("load+execute+record", AsyncNoopPhases, CONCURRENCY, {"pool_size": CONCURRENCY}, 1),
        ("runner's default pool", AsyncNoop, CONCURRENCY, {}, 1),
    ]
    for variant, job, conc, engine_options, repeat in variants:
        await bench.ameasure(
            system="AsyncJobRunner",
            variant=variant,
            n=n,
            concurrency=conc,
            fn=lambda j=job, c=conc, o=engine_options: _async_runner(url, j, n, c, o),
            ratio_to=floors[conc],
            repeat=repeat,
        )
    await bench.ameasure(
        system="AsyncJobRunner worker",
        variant="submit N, work(until_idle)",
        n=n,
        concurrency=CONCURRENCY,
        fn=lambda: _async_worker(url, n),
        ratio_to=floor,
    )
    await bench.ameasure(
        system="procrastinate",
        variant="1 worker, deferred first",
        n=n,
        concurrency=CONCURRENCY,
        fn=lambda: run_procrastinate(url, n, CONCURRENCY),
        ratio_to=floor,
    )
    return floors


async def _fresh(url: sa.URL, timed: Any) -> Any:
    """Empty jobrunner's tables, then await the timed run (coroutine created lazily)."""
    truncate(url)
    return await timed


async def _async_runner(
    url: sa.URL, job: type[Any], n: int, concurrency: int, engine_options: dict[str, Any]
) -> Sample:
    truncate(url)
    runner = AsyncJobRunner(
        url.set(drivername="postgresql+asyncpg"), registry=Registry([job]), **engine_options
    )
    try:
        with StatementCounter() as counter:
            await run_many(lambda: runner.run(job), 10 * concurrency, concurrency)  # warm up
            counter.reset()
            sample = await run_many_sample(lambda: runner.run(job), n, concurrency)
        pool = runner.engine.pool
        size = pool.size() if isinstance(pool, QueuePool) else None
        extra = {**sample.extra, "connects": counter.connects, "pool_size": size}
        return Sample(seconds=sample.seconds, extra=extra)
    finally:
        await runner.aclose()


async def _async_worker(url: sa.URL, n: int) -> Sample:
    """End to end: submit ``n`` one by one, then drain them with the worker, 8 slots.

    The rate is n / (submit + drain); ``submit_per_s`` and ``drain_per_s`` split it.
    """
    truncate(url)
    runner = AsyncJobRunner(
        url.set(drivername="postgresql+asyncpg"),
        registry=Registry([AsyncNoop]),
        pool_size=CONCURRENCY + 2,
    )
    try:
        clock = _EndToEnd(n)
        for _ in range(n):
            await runner.submit(AsyncNoop)
        clock.submitted()
        await runner.work(concurrency=CONCURRENCY, until_idle=True)
        return clock.sample()
    finally:
        await runner.aclose()


class _EndToEnd:
    """Times submit-then-drain: the whole, the two halves, and this process's CPU."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cpu, self.start = time.process_time(), time.perf_counter()
        self.half = self.start

    def submitted(self) -> None:
        self.half = time.perf_counter()

    def sample(self) -> Sample:
        done, n = time.perf_counter(), self.n
        extra = {
            "cpu_ms": cpu_ms(self.cpu, n),
            "submit_per_s": round(n / (self.half - self.start)),
            "drain_per_s": round(n / (done - self.half)),
        }
        return Sample(seconds=done - self.start, extra=extra)


def _sync_worker(bench: Bench, url: sa.URL, n: int, floor: Measurement) -> None:
    def once() -> Sample:
        truncate(url)
        runner = JobRunner(
            url.set(drivername="postgresql+psycopg"),
            registry=Registry([SyncNoop]),
            pool_size=CONCURRENCY + 2,
        )
        try:
            clock = _EndToEnd(n)
            for _ in range(n):
                runner.submit(SyncNoop)
            clock.submitted()
            runner.work(concurrency=CONCURRENCY, until_idle=True)
            return clock.sample()
        finally:
            runner.close()

    bench.measure(
        system="JobRunner worker (psycopg)",
        variant="submit N, work(until_idle), threads",
        n=n,
        concurrency=CONCURRENCY,
        fn=once,
        ratio_to=floor,
    )


def _sync_runner(bench: Bench, url: sa.URL, n: int, floor: Measurement) -> None:
    def once() -> Sample:
        truncate(url)
        runner = JobRunner(url.set(drivername="postgresql+psycopg"), registry=Registry([SyncNoop]))
        try:
            with StatementCounter() as counter:
                for _ in range(10):
                    runner.run(SyncNoop)
                counter.reset()
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(n):
                    runner.run(SyncNoop)
                seconds = time.perf_counter() - start
            extra = {"cpu_ms": cpu_ms(cpu, n), "connects": counter.connects}
            return Sample(seconds=seconds, extra=extra)
        finally:
            runner.close()

    bench.measure(
        system="JobRunner (psycopg)",
        variant="no-op execute",
        n=n,
        concurrency=1,
        fn=once,
        ratio_to=floor,
    )


def _celery(bench: Bench, url: sa.URL, n: int, floor: Measurement) -> None:
    rig = CeleryRig(url, os.environ.get(BROKER_ENV, DEFAULT_BROKER), concurrency=2)
    try:
        with rig.worker():
            rig.warm_up(20)
            bench.measure(
                system="Celery + DB backend",
                variant="prefork, Redis broker",
                n=n,
                concurrency=2,
                fn=lambda: rig.run(n),
                ratio_to=floor,
            )
    except Exception as exc:  # "as far as it can run here": say why, keep the other rows
        bench.note(f"Celery could not be measured here: {type(exc).__name__}: {exc}")


async def _statement_counts(url: sa.URL) -> dict[str, tuple[float, float]]:
    """Statements (SQLAlchemy events) and server-side commits (``pg_stat_database``) per
    execution, for each AsyncJobRunner job shape (not timed)."""
    counts, n = {}, 100
    for label, job in (("no-op execute", AsyncNoop), ("load+execute+record", AsyncNoopPhases)):
        await _runs(url, job, 1)  # compile, connect
        before = _server_commits(url)
        statements = await _runs(url, job, n)
        counts[label] = (statements / n, (_server_commits(url) - before) / n)
    return counts


async def _runs(url: sa.URL, job: type[Any], n: int) -> int:
    runner = AsyncJobRunner(url.set(drivername="postgresql+asyncpg"), registry=Registry([job]))
    with StatementCounter() as counter:
        for _ in range(n):
            await runner.run(job)
        await runner.aclose()  # backends exit and flush their statistics
    return counter.statements


def _server_commits(url: sa.URL) -> int:
    """Committed transactions in the scratch database, as PostgreSQL counts them."""
    time.sleep(0.5)  # let exiting backends flush their counters
    engine = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        commits = conn.execute(
            sa.text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()
    engine.dispose()
    return int(commits)


def _notes(bench: Bench, counts: dict[str, tuple[float, float]]) -> None:
    for label, (statements, commits) in counts.items():
        bench.note(
            f"AsyncJobRunner {label}: {statements:.1f} statements (SQLAlchemy events) and "
            f"{commits:.1f} commits (pg_stat_database) per execution"
        )
    bench.note(
        f"SQLAlchemy {sa.__version__}; 'client CPU' = this process's CPU time per execution "
        "(PostgreSQL's and the Celery worker's not included); 'new conns' = connections "
        "opened during the timed runs"
    )
    best = next(
        (m for m in bench.measurements if m.system == "AsyncJobRunner" and m.concurrency > 1),
        None,
    )
    if best is None or best.median_rate is None:
        return
    ratio = best.ratio_to_floor or 0.0
    verdict = "met" if ratio >= 0.5 else "NOT met"
    bench.note(f"target AsyncJobRunner 8-way >= 0.5x floor: {verdict} ({ratio:.2f}x)")
    for system in ("procrastinate", "Celery + DB backend"):
        rival = next((m for m in bench.measurements if m.system == system), None)
        if rival is None or rival.median_rate is None:
            bench.note(f"target AsyncJobRunner >= 2x {system}: not measured in this run")
            continue
        times = best.median_rate / rival.median_rate
        verdict = "met" if times >= 2 else "NOT met"
        bench.note(f"target AsyncJobRunner 8-way >= 2x {system}: {verdict} ({times:.2f}x)")
