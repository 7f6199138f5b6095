"""prune: deleting 100,000 old executions (and their attempts) from PostgreSQL.

The store is seeded (not timed) with ``n`` succeeded executions finished 30 days ago, one
attempt each, plus 1,000 recent ones that must survive. Timed: ``runner.prune(older_than=
7 days, batch_size=...)``, which deletes in batches, one short transaction each. The longest
single transaction is measured client-side from SQLAlchemy's begin/commit events. The floor
is one ``DELETE`` by hand: fastest, but one transaction holding every row lock to the end.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from jobrunner import AsyncJobRunner, JobRunner, Registry

from ._harness import Bench, Sample
from ._jobs import create_schema, truncate

RECENT = 1_000
SEED = """
INSERT INTO jobrunner_executions (
    id, job, handler, args, status, phase, attempt, max_attempts, triggered_by, worker,
    lease_token, cancel_requested, created_at, started_at, finished_at, heartbeat_at,
    checkpointed, result, load_ms, execute_ms, record_ms)
SELECT gen_random_uuid(), 'bench.old', 'benchmarks.prune:Old', '{}'::jsonb, 'succeeded',
       'record', 1, 1, 'bench', 'bench-worker', 1, false, t, t, t, t, true, 'null'::jsonb,
       0.1, 0.1, 0.1
FROM (SELECT now() - :age + g * interval '1 ms' AS t FROM generate_series(1, :n) g) s;
"""
SEED_ATTEMPTS = """
INSERT INTO jobrunner_attempts (
    execution_id, number, status, phase, resumed_from, worker, triggered_by, started_at,
    finished_at, load_ms, execute_ms, record_ms)
SELECT id, 1, status, phase, 'load', worker, triggered_by, started_at, finished_at, 0.1, 0.1, 0.1
FROM jobrunner_executions;
"""
FLOOR = """
DELETE FROM jobrunner_executions
WHERE created_at < now() - interval '7 days'
  AND status IN ('cancelled', 'failed', 'succeeded', 'timed_out')
"""


class TxTimer:
    """Times every transaction on a sync engine (begin to commit/rollback)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.durations: list[float] = []
        self._started: dict[int, float] = {}
        event.listen(engine, "begin", self._begin)
        event.listen(engine, "commit", self._end)
        event.listen(engine, "rollback", self._end)

    def _begin(self, conn: Any) -> None:
        self._started[id(conn)] = time.perf_counter()

    def _end(self, conn: Any) -> None:
        started = self._started.pop(id(conn), None)
        if started is not None:
            self.durations.append(time.perf_counter() - started)

    def extra(self, deleted: int) -> dict[str, Any]:
        return {
            "deleted": deleted,
            "transactions": len(self.durations),
            "longest_tx_ms": 1000 * max(self.durations, default=0.0),
        }


def run(bench: Bench) -> None:
    n = bench.size(full=100_000, quick=2_000)
    with bench.scratch_database() as url:
        create_schema(url)
        floor = bench.measure(
            system="floor (psycopg)",
            variant="one DELETE, one tx",
            n=n,
            concurrency=1,
            fn=lambda: _floor(url, n),
            unit="deletions",
        )
        bench.measure(
            system="JobRunner.prune",
            variant="batch_size=1000",
            n=n,
            concurrency=1,
            fn=lambda: _sync_prune(url, n, 1000),
            ratio_to=floor,
            unit="deletions",
        )
        bench.measure(
            system="AsyncJobRunner.prune",
            variant="batch_size=1000",
            n=n,
            concurrency=1,
            fn=lambda: asyncio.run(_async_prune(url, n, 1000)),
            ratio_to=floor,
            unit="deletions",
        )
    bench.note("exec/s here is executions deleted per second (with their attempt rows)")
    bench.table(
        f"prune: delete {n:,} old executions + attempts, {RECENT:,} recent kept",
        {"transactions": "transactions", "longest_tx_ms": "longest tx ms"},
    )


def _seed(url: sa.URL, n: int) -> sa.Engine:
    truncate(url)
    engine = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(SEED), {"age": timedelta(days=30), "n": n})
        conn.execute(sa.text(SEED), {"age": timedelta(minutes=5), "n": RECENT})
        conn.execute(sa.text(SEED_ATTEMPTS))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE jobrunner_executions, jobrunner_attempts"))
    return engine


def _check(engine: sa.Engine, deleted: int, n: int) -> None:
    with engine.connect() as conn:
        left = conn.execute(sa.text("SELECT count(*) FROM jobrunner_executions")).scalar_one()
    engine.dispose()
    if deleted != n or left != RECENT:
        raise RuntimeError(f"prune deleted {deleted} of {n}; {left} rows left, {RECENT} expected")


def _floor(url: sa.URL, n: int) -> Sample:
    engine = _seed(url, n)
    timer = TxTimer(engine)
    start = time.perf_counter()
    with engine.begin() as conn:
        deleted = conn.execute(sa.text(FLOOR)).rowcount  # attempts go by ON DELETE CASCADE
    seconds, extra = time.perf_counter() - start, timer.extra(deleted)
    _check(engine, deleted, n)
    return Sample(seconds=seconds, extra=extra)


def _sync_prune(url: sa.URL, n: int, batch_size: int) -> Sample:
    seeded = _seed(url, n)
    runner = JobRunner(url.set(drivername="postgresql+psycopg"), registry=Registry())
    timer = TxTimer(runner.engine)
    try:
        start = time.perf_counter()
        deleted = runner.prune(older_than=timedelta(days=7), batch_size=batch_size)
        seconds = time.perf_counter() - start
    finally:
        runner.close()
    _check(seeded, deleted, n)
    return Sample(seconds=seconds, extra=timer.extra(deleted))


async def _async_prune(url: sa.URL, n: int, batch_size: int) -> Sample:
    seeded = _seed(url, n)
    runner = AsyncJobRunner(url.set(drivername="postgresql+asyncpg"), registry=Registry())
    timer = TxTimer(runner.engine.sync_engine)
    try:
        start = time.perf_counter()
        deleted = await runner.prune(older_than=timedelta(days=7), batch_size=batch_size)
        seconds = time.perf_counter() - start
    finally:
        await runner.aclose()
    _check(seeded, deleted, n)
    return Sample(seconds=seconds, extra=timer.extra(deleted))
