"""reads: ``list``, ``show`` and ``stats`` over a long history, PostgreSQL and SQLite.

The store is filled (not timed) by bulk SQL with ``n`` executions created over the last 30
days (1,000,000 on PostgreSQL, 200,000 on a SQLite file), one attempt row each: twelve
jobs over three queues, mostly ``succeeded``, every 50th ``failed``, every 499th
``cancelled``, every 997th ``timed_out``, and the newest 100 ``pending`` and 20 ``running``
(all of job ``bench.job00``); then ``ANALYZE`` (and ``VACUUM`` on PostgreSQL). Timed, through
``JobRunner`` (what the CLI calls): ``list`` in several filter shapes, ``show`` (``get`` +
``attempts``), and ``stats`` over 24 hours and over everything. Each query runs once to warm
the cache, then ``repeat`` times (default 5); the table shows the median ms per query.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from jobrunner import JobRunner, Registry
from jobrunner._schema import metadata

from ._harness import Bench, Sample

DAYS = 30
JOBS = 12

# One row per g in 1..n; row n is the newest. Shared by both backends: each supplies the
# id, the times (created t, started t + 10 ms, finished t + 10 ms + a 0..2 s duration)
# and the series.
_STATUS = """CASE
    WHEN g > :n - 20 THEN 'running'
    WHEN g > :n - 120 THEN 'pending'
    WHEN g % 997 = 0 THEN 'timed_out'
    WHEN g % 499 = 0 THEN 'cancelled'
    WHEN g % 50 = 0 THEN 'failed'
    ELSE 'succeeded' END"""
_JOB = "CASE WHEN g > :n - 120 THEN 'bench.job00' ELSE 'bench.job' || printf_job END"
_COLUMNS = """id, job, handler, args, status, queue, priority, attempt, max_attempts,
    triggered_by, worker, lease_token, cancel_requested, checkpointed, created_at,
    started_at, finished_at, due_at, error_type, error_message"""

PG_FILL = f"""
INSERT INTO jobrunner_executions ({_COLUMNS})
SELECT gen_random_uuid(), job, 'benchmarks.reads:Job', '{{"n": 1}}'::jsonb, status,
       'q' || (g % {JOBS} % 3), 0, 1, 1, 'bench', 'bench-worker', 1, false, false, t,
       CASE WHEN status = 'pending' THEN NULL ELSE t + interval '10 ms' END,
       CASE WHEN status IN ('pending', 'running') THEN NULL
            ELSE t + interval '10 ms' + (g::bigint * 7919 % 2000) * interval '1 ms' END,
       t,
       CASE WHEN status = 'failed' THEN 'ValueError' END,
       CASE WHEN status = 'failed' THEN 'boom' END
FROM (
    SELECT g, now() - (:n - g) * :spacing AS t, {_STATUS} AS status,
           {_JOB.replace("printf_job", f"lpad((g % {JOBS})::text, 2, '0')")} AS job
    FROM generate_series(1, :n) g
) s
"""

# SQLite keeps times as 'YYYY-MM-DD HH:MM:SS.ffffff' text (SQLAlchemy's format).
_SQLITE_TIME = (
    "(strftime('%Y-%m-%d %H:%M:%S', {us} / 1000000, 'unixepoch')"
    " || '.' || printf('%06d', {us} % 1000000))"
)
SQLITE_FILL = f"""
WITH RECURSIVE series(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM series WHERE g < :n),
rows AS (
    SELECT g, :now_us - (:n - g) * :spacing_us AS t, {_STATUS} AS status,
           {_JOB.replace("printf_job", f"printf('%02d', g % {JOBS})")} AS job
    FROM series
)
INSERT INTO jobrunner_executions ({_COLUMNS})
SELECT lower(hex(randomblob(16))), job, 'benchmarks.reads:Job', '{{"n": 1}}', status,
       'q' || (g % {JOBS} % 3), 0, 1, 1, 'bench', 'bench-worker', 1, 0, 0,
       {_SQLITE_TIME.format(us="t")},
       CASE WHEN status = 'pending' THEN NULL ELSE {_SQLITE_TIME.format(us="(t + 10000)")} END,
       CASE WHEN status IN ('pending', 'running') THEN NULL
            ELSE {_SQLITE_TIME.format(us="(t + 10000 + (g * 7919 % 2000) * 1000)")} END,
       {_SQLITE_TIME.format(us="t")},
       CASE WHEN status = 'failed' THEN 'ValueError' END,
       CASE WHEN status = 'failed' THEN 'boom' END
FROM rows
"""

ATTEMPTS_FILL = """
INSERT INTO jobrunner_attempts (
    execution_id, number, status, phase, resumed_from, worker, triggered_by, started_at,
    finished_at, execute_ms)
SELECT id, 1, status, 'execute', 'load', worker, triggered_by, started_at, finished_at, 1.0
FROM jobrunner_executions WHERE finished_at IS NOT NULL
"""

#: (label, keyword arguments of JobRunner.list) for the timed ``list`` shapes.
LIST_SHAPES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("list", {}),
    ("list --status failed", {"status": "failed"}),
    ("list --status failed,timed_out", {"status": ["failed", "timed_out"]}),
    ("list --job J", {"job": "bench.job02"}),
    ("list --job J --status failed", {"job": "bench.job02", "status": "failed"}),
    ("list --job K --status failed (none)", {"job": "bench.job03", "status": "failed"}),
    ("list --since 1h", {"since": timedelta(hours=1)}),
    ("list(queue=Q, status=failed)", {"queue": "q1", "status": "failed"}),
)


def run(bench: Bench) -> None:
    repeat = max(bench.repeat, 5) if not bench.quick else 1
    pg_n = bench.size(full=1_000_000, quick=20_000)
    lite_n = bench.size(full=200_000, quick=10_000)
    with bench.scratch_database() as url:
        pg = url.set(drivername="postgresql+psycopg")
        fill_postgres(pg, pg_n)
        _measure_all(bench, "PostgreSQL", pg.render_as_string(hide_password=False), pg_n, repeat)
    with tempfile.TemporaryDirectory() as tmp:
        lite = f"sqlite:///{Path(tmp) / 'reads.db'}"
        fill_sqlite(lite, lite_n)
        _measure_all(bench, "SQLite", lite, lite_n, repeat)
    bench.note("one query per run: ms/exec is milliseconds per query; rows = rows returned")
    bench.table(
        f"reads over {pg_n:,} executions (PostgreSQL) and {lite_n:,} (SQLite file)",
        {"rows": "rows"},
    )


def fill_postgres(url: sa.URL, n: int) -> None:
    """Create the schema and ``n`` executions with one attempt each (bulk SQL)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(sa.text(PG_FILL), {"n": n, "spacing": timedelta(days=DAYS) / n})
        conn.execute(sa.text(ATTEMPTS_FILL))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE jobrunner_executions, jobrunner_attempts"))
    engine.dispose()


def fill_sqlite(url: str, n: int) -> None:
    """Create the schema and ``n`` executions with one attempt each (a recursive CTE)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    with engine.begin() as conn:
        metadata.create_all(conn)
        spacing_us = int(timedelta(days=DAYS).total_seconds() * 1_000_000 / n)
        conn.execute(sa.text(SQLITE_FILL), {"n": n, "now_us": now_us, "spacing_us": spacing_us})
        conn.execute(sa.text(ATTEMPTS_FILL))
        conn.execute(sa.text("ANALYZE"))
    engine.dispose()


def _measure_all(bench: Bench, backend: str, url: str, n: int, repeat: int) -> None:
    runner = JobRunner(url, registry=Registry())
    try:
        some_id = runner.list(status="failed", limit=1)[0].id
        calls: list[tuple[str, Callable[[], Any]]] = [
            (label, lambda kw=kw: runner.list(limit=50, **kw)) for label, kw in LIST_SHAPES
        ]
        calls += [
            ("show (get + attempts)", lambda: [runner.get(some_id), *runner.attempts(some_id)]),
            ("stats --since 24h", lambda: runner.stats(timedelta(hours=24))),
            ("stats --since all", lambda: runner.stats(None)),
        ]
        for label, call in calls:
            call()  # warm: statements compiled, pages cached
            bench.measure(
                system=f"{backend}",
                variant=label,
                n=1,
                concurrency=1,
                fn=lambda call=call: _time(call),
                repeat=repeat,
                unit="queries",
            )
    finally:
        runner.close()


def _time(call: Callable[[], Any]) -> Sample:
    start = time.perf_counter()
    rows = call()
    return Sample(seconds=time.perf_counter() - start, extra={"rows": len(rows)})
