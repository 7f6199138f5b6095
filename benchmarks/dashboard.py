"""dashboard: server time per dashboard page over 1,000,000 executions in PostgreSQL,
and over 200,000 in a SQLite file.

The PostgreSQL store is filled (not timed) by one ``INSERT ... SELECT generate_series``:
``n`` executions created over the last 30 days, twelve jobs over three queues, mostly
``succeeded``, every 50th ``failed`` (``ValueError: boom``), every 499th ``cancelled``,
every 997th ``timed_out``, the newest 2,000 ``pending`` and 20 ``running``; one attempt
each for the finished ones; then ``VACUUM ANALYZE``. The SQLite file is filled as the
reads benchmark fills it (the same jobs and queues, 100 pending, 20 running), with the
same per-phase durations.

Timed: one request to the ASGI app in process (httpx's ASGI transport), so a sample is
the server's whole time for the page: routing, the queries, the template, no network.
The overview's two-second cache is switched off (every sample reads the database).
Each page is requested once to warm up, then ``repeat`` times (default 5); the table
shows the median ms per page. Target: every page under 150 ms.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from jobrunner import JobRunner, PhasedJob, Registry, RetryPolicy
from jobrunner._schema import metadata

from ._harness import Bench, Sample
from .reads import fill_sqlite

DAYS = 30
JOBS = 12
PENDING = 2_000
RUNNING = 20
TARGET_MS = 150.0

_STATUS = f"""CASE
    WHEN g > :n - {RUNNING} THEN 'running'
    WHEN g > :n - {PENDING + RUNNING} THEN 'pending'
    WHEN g % 997 = 0 THEN 'timed_out'
    WHEN g % 499 = 0 THEN 'cancelled'
    WHEN g % 50 = 0 THEN 'failed'
    ELSE 'succeeded' END"""

FILL = f"""
INSERT INTO jobrunner_executions (
    id, job, handler, args, status, queue, priority, attempt, max_attempts, triggered_by,
    worker, lease_token, cancel_requested, checkpointed, created_at, started_at,
    finished_at, heartbeat_at, lease_expires_at, due_at, load_ms, execute_ms, record_ms,
    error_type, error_message, error_traceback)
SELECT gen_random_uuid(), 'bench.job' || lpad((g % {JOBS})::text, 2, '0'),
       'benchmarks.dashboard:Job', '{{"n": 1}}'::jsonb, status, 'q' || (g % {JOBS} % 3),
       0, 1, 1, 'bench', CASE WHEN status = 'running' THEN 'bench-worker' END, 1, false,
       false, t,
       CASE WHEN status = 'pending' THEN NULL ELSE t + interval '10 ms' END,
       CASE WHEN status IN ('pending', 'running') THEN NULL
            ELSE t + interval '10 ms' + (g::bigint * 7919 % 2000) * interval '1 ms' END,
       CASE WHEN status = 'running' THEN now() END,
       CASE WHEN status = 'running' THEN now() + interval '30 s' END,
       t,
       CASE WHEN status IN ('pending', 'running') THEN NULL ELSE 0.5 + g % 7 END,
       CASE WHEN status IN ('pending', 'running') THEN NULL ELSE g::bigint * 7919 % 2000 END,
       CASE WHEN status IN ('pending', 'running') THEN NULL ELSE 1.0 + g % 5 END,
       CASE WHEN status = 'failed' THEN 'ValueError' END,
       CASE WHEN status = 'failed' THEN 'boom ' || g END,
       CASE WHEN status = 'failed' THEN 'Traceback (most recent call last): ...' END
FROM (
    SELECT g, now() - (:n - g) * :spacing AS t, {_STATUS} AS status
    FROM generate_series(1, :n) g
) s
"""

SQLITE_PHASES = """
UPDATE jobrunner_executions
SET load_ms = 0.5 + rowid % 7, execute_ms = rowid * 7919 % 2000, record_ms = 1.0 + rowid % 5
WHERE finished_at IS NOT NULL
"""

ATTEMPTS = """
INSERT INTO jobrunner_attempts (
    execution_id, number, status, phase, resumed_from, worker, triggered_by, started_at,
    finished_at, load_ms, execute_ms, record_ms)
SELECT id, 1, status, 'record', 'load', 'bench-worker', triggered_by, started_at,
       finished_at, load_ms, execute_ms, record_ms
FROM jobrunner_executions WHERE finished_at IS NOT NULL
"""


def _job(i: int) -> type[PhasedJob]:
    """A registered job per name in the data, for the jobs page."""

    def execute(self: PhasedJob, args: Any) -> None:
        return None

    return type(
        f"Job{i:02d}",
        (PhasedJob,),
        {
            "name": f"bench.job{i:02d}",
            "queue": f"q{i % 3}",
            "retry": RetryPolicy(max_attempts=3),
            "execute": execute,
            "__module__": __name__,
        },
    )


def run(bench: Bench) -> None:
    n = bench.size(full=1_000_000, quick=20_000)
    lite_n = bench.size(full=200_000, quick=10_000)
    repeat = 1 if bench.quick else max(bench.repeat, 5)
    with bench.scratch_database() as url:
        pg = url.set(drivername="postgresql+psycopg")
        fill(pg, n)
        _measure_on(bench, "PostgreSQL", pg.render_as_string(hide_password=False), repeat)
    with tempfile.TemporaryDirectory() as tmp:
        lite = f"sqlite:///{Path(tmp) / 'dashboard.db'}"
        fill_sqlite(lite, lite_n)  # the reads benchmark's SQLite history: same jobs, queues
        _phase_times(lite)
        _measure_on(bench, "SQLite", lite, repeat)
    slow = [m for m in bench.measurements if m.median_seconds * 1000 > TARGET_MS]
    bench.note(
        f"target: every page under {TARGET_MS:.0f} ms of server time; "
        + ("met" if not slow else "missed by: " + ", ".join(m.variant for m in slow))
    )
    bench.table(
        f"dashboard pages over {n:,} executions (PostgreSQL) and {lite_n:,} (SQLite file)",
        {"bytes": "bytes"},
    )


def _phase_times(url: str) -> None:
    """Per-phase durations on the finished rows, as the PostgreSQL fill writes them."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(SQLITE_PHASES))
    engine.dispose()


def _measure_on(bench: Bench, backend: str, url: str, repeat: int) -> None:
    runner = JobRunner(url, registry=Registry([_job(i) for i in range(JOBS)]))
    try:
        asyncio.run(_measure(bench, backend, runner, repeat))
    finally:
        runner.close()


def fill(url: sa.URL, n: int) -> None:
    """The schema and ``n`` executions (bulk SQL), analysed."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(sa.text(FILL), {"n": n, "spacing": timedelta(days=DAYS) / n})
        conn.execute(sa.text(ATTEMPTS))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE jobrunner_executions, jobrunner_attempts"))
    engine.dispose()


def _pages(runner: JobRunner) -> list[tuple[str, str]]:
    from jobrunner.web._filters import Cursor

    with runner.engine.connect() as conn:
        some = uuid.UUID(
            str(
                conn.execute(
                    sa.text("SELECT id FROM jobrunner_executions WHERE status = 'failed' LIMIT 1")
                ).scalar_one()
            )
        )
    deep = Cursor(created_at=datetime.now(UTC) - timedelta(days=15), id=some).encode()
    return [
        ("overview", "/"),
        ("executions", "/executions"),
        ("executions, page in mid-history", f"/executions?cursor={deep}"),
        ("status=failed", "/executions?status=failed"),
        ("status=failed,timed_out", "/executions?status=failed,timed_out"),
        ("job=J", "/executions?job=bench.job02"),
        ("job=J, status=failed", "/executions?job=bench.job02&status=failed"),
        ("queue=Q", "/executions?queue=q1"),
        ("since=1h", "/executions?since=1h"),
        ("status=failed, error=boom 1", "/executions?status=failed&error=boom%201"),
        ("error=no-such-text (window)", "/executions?error=no-such-text"),
        ("oldest first", "/executions?sort=oldest"),
        ("execution detail", f"/executions/{some}"),
        ("jobs, window 24h", "/jobs?window=24h"),
        ("jobs, window 7d", "/jobs?window=7d"),
        ("queues", "/queues"),
    ]


async def _measure(bench: Bench, backend: str, runner: JobRunner, repeat: int) -> None:
    from jobrunner.web import _pages as pages_module
    from jobrunner.web import create_app

    pages_module.OVERVIEW_TTL_S = 0.0  # measure the database every time
    app = create_app(runner)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for label, path in _pages(runner):
            await _get(client, path)  # warm: statements compiled, pages cached
            await bench.ameasure(
                system=backend,
                variant=label,
                n=1,
                concurrency=1,
                fn=lambda path=path: _get(client, path),
                repeat=repeat,
                unit="pages",
            )


async def _get(client: httpx.AsyncClient, path: str) -> Sample:
    start = time.perf_counter()
    response = await client.get(path)
    seconds = time.perf_counter() - start
    response.raise_for_status()
    return Sample(seconds=seconds, extra={"bytes": len(response.content)})
