"""rivals: jobrunner beside pgqueuer, procrastinate, DBOS, Celery and oban-py, in one run.

N no-op jobs (2,000; 100 with ``--quick``), 8-way. Each round runs every row once, in the
same order (3 rounds by default, so rows interleave: A, B, C, ..., A, B, C, ...); a row's
numbers are the median and min-max over the rounds, and a target holds only when every
round meets it.

- jobrunner, in this process: ``AsyncJobRunner.run()`` and ``JobRunner.run()`` inline, 8 at
  a time (tasks; threads), a job with only ``execute`` and one with session ``load`` and
  ``record``; the worker end to end on both runners: ``submit()`` x N (one call per job) or
  ``submit_many(job, [args] * N)`` (one call), then ``work(concurrency=8, until_idle=True)``.
- the floor: jobrunner's three transactions by hand with raw asyncpg (``_floor.py``).
- each rival in a fresh process and a fresh scratch database per round
  (``_rival_child.py``): enqueue N one call per job (``batch``: one call for all), then
  drain with 8-way concurrency. oban-py needs Python >= 3.12 and runs from its own venv
  (``.bench/oban-venv``, made on first use, or ``$JOBRUNNER_BENCH_OBAN_PYTHON``).

Per row: enqueue/s, drain (processing of a pre-filled queue)/s, end to end = N / (enqueue +
drain); client CPU ms per job = CPU of the process(es) that enqueue and run the jobs (for
Celery, its prefork worker's too); commits per job = ``pg_stat_database.xact_commit`` delta
of the row's database (every transaction, read-only ones included; the harness's own
polling subtracted), WAL syncs and records per job = ``pg_stat_wal`` delta (server-wide).
For jobrunner and floor rows the counters span warm-up + timed jobs and are divided by both.
``--quick`` runs the jobrunner rows, the floor, pgqueuer and procrastinate (DBOS, Celery and
oban-py are skipped with a note).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from jobrunner import AsyncJobRunner, JobRunner, Registry

from ._floor import run_floor
from ._harness import ROOT, Bench, Sample, console, load_average
from ._jobs import (
    AsyncNoop,
    AsyncNoopPhases,
    SyncNoop,
    SyncNoopPhases,
    create_schema,
    run_many,
    truncate,
)
from ._rival_child import server_counters

CONCURRENCY = 8
WARM_UP = 40
OBAN_ENV = "JOBRUNNER_BENCH_OBAN_PYTHON"
OBAN_VENV = ROOT / ".bench" / "oban-venv"
CHILD = Path(__file__).resolve().parent / "_rival_child.py"
EXTRAS = {
    "enqueue_per_s": "enqueue/s",
    "drain_per_s": "drain/s",
    "cpu_ms": "client CPU ms/job",
    "commits": "commits/job",
    "wal_syncs": "WAL syncs/job",
    "wal_records": "WAL records/job",
}


@dataclass
class Row:
    """One row of the table: a system and variant, run once per round by ``fn``."""

    system: str
    variant: str
    fn: Callable[[sa.URL, int], Sample]
    samples: list[Sample] = field(default_factory=list)
    failed: str | None = None


# -- counters -------------------------------------------------------------------------------


class Counters:
    """``pg_stat_database`` / ``pg_stat_wal`` deltas around a block, per job."""

    def __init__(self, bench: Bench, url: sa.URL) -> None:
        self.server = bench.server_url("psycopg").set(drivername="postgresql")
        self.server_dsn = self.server.render_as_string(hide_password=False)
        self.database = url.database or ""

    def read(self) -> dict[str, float]:
        return server_counters(self.server_dsn, self.database)

    @staticmethod
    def per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
        return {
            "commits": (after["xact_commit"] - before["xact_commit"]) / jobs,
            "wal_syncs": (after["wal_sync"] - before["wal_sync"]) / jobs,
            "wal_records": (after["wal_records"] - before["wal_records"]) / jobs,
        }


# -- jobrunner rows ---------------------------------------------------------------------------


def _inline_async(
    bench: Bench, job: type[Any], **engine_options: Any
) -> Callable[[sa.URL, int], Sample]:
    def once(url: sa.URL, n: int) -> Sample:
        truncate(url)
        counters = Counters(bench, url)

        async def go() -> Sample:
            before = counters.read()
            runner = AsyncJobRunner(
                url.set(drivername="postgresql+asyncpg"), registry=Registry([job]),
                pool_size=CONCURRENCY, **engine_options,
            )  # fmt: skip
            try:
                await run_many(lambda: runner.run(job), WARM_UP, CONCURRENCY)
                cpu, start = time.process_time(), time.perf_counter()
                await run_many(lambda: runner.run(job), n, CONCURRENCY)
                seconds = time.perf_counter() - start
                cpu_ms = 1000 * (time.process_time() - cpu) / n
            finally:
                await runner.aclose()
            extra = {"drain_per_s": n / seconds, "cpu_ms": cpu_ms}
            per_job = Counters.per_job(before, counters.read(), n + WARM_UP)
            return Sample(seconds=seconds, extra={**extra, **per_job})

        return asyncio.run(go())

    return once


def _inline_sync(
    bench: Bench, job: type[Any], **engine_options: Any
) -> Callable[[sa.URL, int], Sample]:
    def once(url: sa.URL, n: int) -> Sample:
        truncate(url)
        counters = Counters(bench, url)
        before = counters.read()
        runner = JobRunner(
            url.set(drivername="postgresql+psycopg"), registry=Registry([job]),
            pool_size=CONCURRENCY, **engine_options,
        )  # fmt: skip
        try:
            with ThreadPoolExecutor(CONCURRENCY) as threads:
                _threaded(threads, lambda: runner.run(job), WARM_UP)
                cpu, start = time.process_time(), time.perf_counter()
                _threaded(threads, lambda: runner.run(job), n)
                seconds = time.perf_counter() - start
                cpu_ms = 1000 * (time.process_time() - cpu) / n
        finally:
            runner.close()
        extra = {"drain_per_s": n / seconds, "cpu_ms": cpu_ms}
        per_job = Counters.per_job(before, counters.read(), n + WARM_UP)
        return Sample(seconds=seconds, extra={**extra, **per_job})

    return once


def _threaded(threads: ThreadPoolExecutor, one: Callable[[], Any], n: int) -> None:
    """``one()`` n times from CONCURRENCY threads."""
    lock, left = threading.Lock(), [n]

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            one()

    for f in [threads.submit(worker) for _ in range(CONCURRENCY)]:
        f.result()


def _worker_async(bench: Bench, many: bool) -> Callable[[sa.URL, int], Sample]:
    def once(url: sa.URL, n: int) -> Sample:
        truncate(url)
        counters = Counters(bench, url)

        async def submit(runner: AsyncJobRunner, k: int) -> None:
            if many:
                await runner.submit_many(AsyncNoop, [None] * k)
            else:
                for _ in range(k):
                    await runner.submit(AsyncNoop)

        async def go() -> Sample:
            before = counters.read()
            runner = AsyncJobRunner(
                url.set(drivername="postgresql+asyncpg"), registry=Registry([AsyncNoop]),
                pool_size=CONCURRENCY + 2,
            )  # fmt: skip
            try:
                await submit(runner, WARM_UP)
                await runner.work(concurrency=CONCURRENCY, until_idle=True)
                cpu0, t0 = time.process_time(), time.perf_counter()
                await submit(runner, n)
                _cpu1, t1 = time.process_time(), time.perf_counter()
                await runner.work(concurrency=CONCURRENCY, until_idle=True)
                cpu2, t2 = time.process_time(), time.perf_counter()
            finally:
                await runner.aclose()
            return _e2e(n, t0, t1, t2, cpu0, cpu2, Counters.per_job(before, counters.read(),
                                                                     n + WARM_UP))  # fmt: skip

        return asyncio.run(go())

    return once


def _worker_sync(bench: Bench, many: bool) -> Callable[[sa.URL, int], Sample]:
    def once(url: sa.URL, n: int) -> Sample:
        truncate(url)
        counters = Counters(bench, url)

        def submit(runner: JobRunner, k: int) -> None:
            if many:
                runner.submit_many(SyncNoop, [None] * k)
            else:
                for _ in range(k):
                    runner.submit(SyncNoop)

        before = counters.read()
        runner = JobRunner(
            url.set(drivername="postgresql+psycopg"), registry=Registry([SyncNoop]),
            pool_size=CONCURRENCY + 2,
        )  # fmt: skip
        try:
            submit(runner, WARM_UP)
            runner.work(concurrency=CONCURRENCY, until_idle=True)
            cpu0, t0 = time.process_time(), time.perf_counter()
            submit(runner, n)
            t1 = time.perf_counter()
            runner.work(concurrency=CONCURRENCY, until_idle=True)
            cpu2, t2 = time.process_time(), time.perf_counter()
        finally:
            runner.close()
        per_job = Counters.per_job(before, counters.read(), n + WARM_UP)
        return _e2e(n, t0, t1, t2, cpu0, cpu2, per_job)

    return once


def _e2e(
    n: int, t0: float, t1: float, t2: float, cpu0: float, cpu2: float, per_job: dict[str, float]
) -> Sample:
    extra = {
        "enqueue_per_s": n / (t1 - t0),
        "drain_per_s": n / (t2 - t1),
        "cpu_ms": 1000 * (cpu2 - cpu0) / n,
        **per_job,
    }
    return Sample(seconds=t2 - t0, extra=extra)


def _floor(bench: Bench) -> Callable[[sa.URL, int], Sample]:
    def once(url: sa.URL, n: int) -> Sample:
        truncate(url)
        counters = Counters(bench, url)
        before = counters.read()
        sample = asyncio.run(run_floor(url, n, CONCURRENCY))
        warm = 20 * CONCURRENCY  # run_floor's own warm-up
        extra = {"drain_per_s": n / sample.seconds, **sample.extra}
        per_job = Counters.per_job(before, counters.read(), n + warm)
        return Sample(seconds=sample.seconds, extra={**extra, **per_job})

    return once


# -- rivals, each in a child process ---------------------------------------------------------


def _rival(bench: Bench, system: str, python: str, batch: bool) -> Callable[[sa.URL, int], Sample]:
    def once(_url: sa.URL, n: int) -> Sample:
        with bench.scratch_database() as url:  # a fresh database per round
            dsn = url.render_as_string(hide_password=False)
            server = bench.server_url().set(drivername="postgresql")
            args = [python, str(CHILD), system, "--dsn", dsn, "--server-dsn",
                    server.render_as_string(hide_password=False), "-n", str(n),
                    "--concurrency", str(CONCURRENCY)]  # fmt: skip
            if batch:
                args.append("--batch")
            proc = subprocess.run(
                args, cwd=ROOT, capture_output=True, text=True, timeout=max(300, n / 5)
            )
        result = next(
            (json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None
        )
        if proc.returncode != 0 or result is None:
            raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[-1][:300])
        VERSIONS[system] = f"{result['version']} (Python {result['python']})"
        c, enq, drain = result["counters"], result["enqueue_s"], result["drain_s"]
        extra = {
            "enqueue_per_s": n / enq,
            "drain_per_s": n / drain,
            "cpu_ms": 1000 * (result["cpu_enqueue_s"] + result["cpu_drain_s"]) / n,
            "commits": c["xact_commit"] / n,
            "wal_syncs": c["wal_sync"] / n,
            "wal_records": c["wal_records"] / n,
        }
        return Sample(seconds=enq + drain, extra=extra)

    return once


VERSIONS: dict[str, str] = {}


def oban_python(bench: Bench) -> tuple[str | None, str]:
    """An interpreter with oban-py installed (Python >= 3.12), or None and why not."""
    if os.environ.get(OBAN_ENV):
        return os.environ[OBAN_ENV], f"${OBAN_ENV}"
    python = OBAN_VENV / "bin" / "python"
    if python.exists():
        return str(python), str(OBAN_VENV.relative_to(ROOT))
    base = _python312()
    if base is None:
        return None, "no Python >= 3.12 found (oban-py needs it)"
    console.print(f"[dim]  rivals: making {OBAN_VENV} with {base} and pip install oban[/]")
    try:
        subprocess.run([base, "-m", "venv", str(OBAN_VENV)], check=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "oban", "psutil",
                        "psycopg[binary]"], check=True, timeout=600)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(OBAN_VENV, ignore_errors=True)
        return None, f"could not install oban into a Python >= 3.12 venv: {exc}"
    return str(python), str(OBAN_VENV.relative_to(ROOT))


def _python312() -> str | None:
    """A Python >= 3.12 that runs: on the PATH, else under pyenv's versions (a pyenv
    shim on the PATH may name a version that is not selected, and exit 127)."""
    candidates = [shutil.which(name) for name in ("python3.13", "python3.12")]
    for pattern in ("3.13*", "3.12*"):
        candidates += [
            str(version / "bin" / "python")
            for version in sorted(Path("/root/.pyenv/versions").glob(pattern))
        ]
    for candidate in candidates:
        if candidate is not None and _runs_312(candidate):
            return candidate
    return None


def _runs_312(python: str) -> bool:
    check = "import sys; sys.exit(sys.version_info < (3, 12))"
    try:
        done = subprocess.run([python, "-c", check], capture_output=True, timeout=30)
    except (subprocess.SubprocessError, OSError):
        return False
    return done.returncode == 0


def _importable(package: str) -> bool:
    try:
        version(package)
    except PackageNotFoundError:
        return False
    return True


# -- the run ---------------------------------------------------------------------------------


def _rows(bench: Bench) -> list[Row]:
    rows = [
        Row("floor (asyncpg)", "3 tx by hand, 8 connections", _floor(bench)),
        Row("AsyncJobRunner", "run() inline, execute only", _inline_async(bench, AsyncNoop)),
        Row("AsyncJobRunner", "run() inline, load+record", _inline_async(bench, AsyncNoopPhases)),
        Row("JobRunner", "run() inline, execute only, 8 threads", _inline_sync(bench, SyncNoop)),
        Row(
            "JobRunner", "run() inline, load+record, 8 threads", _inline_sync(bench, SyncNoopPhases)
        ),
        # Diagnostics: the default stale-connection check against none at all
        # (pool_pre_ping=False turns jobrunner's check off too).
        Row("AsyncJobRunner", "run() inline, execute only, pool_pre_ping=False",
            _inline_async(bench, AsyncNoop, pool_pre_ping=False)),
        Row("JobRunner", "run() inline, execute only, 8 threads, pool_pre_ping=False",
            _inline_sync(bench, SyncNoop, pool_pre_ping=False)),
        Row("AsyncJobRunner worker", "submit() x N, work(8)", _worker_async(bench, False)),
        Row("AsyncJobRunner worker", "submit_many, work(8)", _worker_async(bench, True)),
        Row("JobRunner worker", "submit() x N, work(8)", _worker_sync(bench, False)),
        Row("JobRunner worker", "submit_many, work(8)", _worker_sync(bench, True)),
    ]
    me = sys.executable
    rivals = [
        ("pgqueuer", "enqueue() x N; batch 4, 8 tasks", me, False),
        ("pgqueuer", "enqueue(lists); batch 4, 8 tasks", me, True),
        ("procrastinate", "defer_async() x N; concurrency 8", me, False),
        ("procrastinate", "batch_defer_async; concurrency 8", me, True),
        ("dbos", "DBOSClient.enqueue x N; queue worker_concurrency 8", me, False),
        ("celery", "apply_async x N; prefork 8, Redis, DB results", me, False),
        ("oban", "enqueue() x N; queue limit 8", None, False),
    ]
    for system, variant, python, batch in rivals:
        label = {"oban": "oban-py", "dbos": "DBOS", "celery": "Celery"}.get(system, system)
        if bench.quick and (system in ("dbos", "celery", "oban") or batch):
            if not batch:
                bench.note(f"{label}: skipped in --quick (run without --quick to measure it)")
            continue
        if system == "oban":
            python, where = oban_python(bench)
            if python is None:
                bench.note(f"oban-py: not run: {where}")
                continue
        elif not _importable(system):
            bench.note(f"{label}: not run: not installed (pip install -e '.[dev]')")
            continue
        assert python is not None
        rows.append(Row(label, variant, _rival(bench, system, python, batch)))
    return rows


def run(bench: Bench) -> None:
    n = bench.size(full=2_000, quick=100)
    load_before = load_average()
    rows = _rows(bench)
    with bench.scratch_database() as url:
        create_schema(url)
        for round_ in range(bench.repeat):
            for row in rows:
                if row.failed:
                    continue
                console.print(f"[dim]  rivals: round {round_ + 1}/{bench.repeat}: "
                              f"{row.system} {row.variant}[/]")  # fmt: skip
                try:
                    row.samples.append(row.fn(url, n))
                except Exception as exc:  # one rival failing keeps the others' rows
                    row.failed = f"{type(exc).__name__}: {exc}"
                    bench.note(f"{row.system} {row.variant}: failed, not reported: {row.failed}")
    floor = None
    for row in rows:
        if row.samples and not row.failed:
            m = bench.record(
                system=row.system, variant=row.variant, n=n, concurrency=CONCURRENCY,
                samples=row.samples, ratio_to=floor, unit="jobs",
            )  # fmt: skip
            floor = floor or m
    if floor is None:
        raise RuntimeError("no row of the rivals benchmark ran; see the notes above")
    _context_notes(bench, load_before)
    _targets(bench, rows)
    bench.table(f"rivals: {n:,} no-op jobs, 8-way, PostgreSQL (exec/s = end to end)", EXTRAS)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _context_notes(bench: Bench, load_before: str) -> None:
    libs = ["sqlalchemy", "asyncpg", "psycopg", "pgqueuer", "procrastinate", "dbos", "celery"]
    versions = {lib: version(lib) for lib in libs if _importable(lib)}
    if "oban" in VERSIONS:
        versions["oban"] = VERSIONS["oban"]
    server = bench.server_url()
    engine = sa.create_engine(server, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        pg = conn.execute(sa.text("SHOW server_version")).scalar_one()
    engine.dispose()
    bench.note(
        f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; PostgreSQL {pg}; Python "
        f"{platform.python_version()}; load average before {load_before}, after {load_average()}"
    )
    bench.note("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    bench.note(
        "exec/s = end to end (enqueue N, then drain) for queue rows, run() rate for inline "
        "rows; client CPU counts every process that enqueues or runs jobs; commits = "
        "pg_stat_database.xact_commit (read-only transactions too) of the row's database; "
        "WAL syncs = pg_stat_wal.wal_sync (server-wide: other work on the server counts too)"
    )


def _targets(bench: Bench, rows: list[Row]) -> None:
    by = {(r.system, r.variant): r for r in rows if r.samples and not r.failed}

    def extra(system: str, variant: str, key: str) -> list[float] | None:
        row = by.get((system, variant))
        return [s.extra[key] for s in row.samples] if row else None

    def e2e(system: str, variant: str) -> list[float] | None:  # jobs/s would be n / seconds
        row = by.get((system, variant))
        return [1 / s.seconds for s in row.samples] if row else None  # only ratios are used

    targets: list[tuple[str, list[float] | None, float, str]] = []
    for runner in ("AsyncJobRunner", "JobRunner"):
        suffix = "" if runner == "AsyncJobRunner" else ", 8 threads"
        targets += [
            (f"{runner} client CPU/exec <= 0.6 ms (execute only)",
             extra(runner, f"run() inline, execute only{suffix}", "cpu_ms"), -0.6, "ms"),
            (f"{runner} client CPU/exec <= 0.9 ms (load+record)",
             extra(runner, f"run() inline, load+record{suffix}", "cpu_ms"), -0.9, "ms"),
        ]  # fmt: skip
    for runner in ("AsyncJobRunner worker", "JobRunner worker"):
        for how, pgq, proc in (
            ("submit() x N, work(8)", "enqueue() x N; batch 4, 8 tasks",
             "defer_async() x N; concurrency 8"),
            ("submit_many, work(8)", "enqueue(lists); batch 4, 8 tasks",
             "batch_defer_async; concurrency 8"),
        ):  # fmt: skip
            mine = e2e(runner, how)
            for rival, variant, times in (("pgqueuer", pgq, 0.75), ("procrastinate", proc, 2.0)):
                theirs = e2e(rival, variant)
                ratios = (
                    [a / b for a, b in zip(mine, theirs, strict=False)] if mine and theirs else None
                )
                targets.append(
                    (
                        f"{runner} e2e ({how}) >= {times}x {rival} e2e ({variant.split(';')[0]})",
                        ratios,
                        times,
                        "x",
                    )
                )
        targets += [
            (f"{runner} submit_many >= 10,000/s",
             extra(runner, "submit_many, work(8)", "enqueue_per_s"), 10_000, "/s"),
            (f"{runner} submit() >= 2,000/s",
             extra(runner, "submit() x N, work(8)", "enqueue_per_s"), 2_000, "/s"),
        ]  # fmt: skip
    for text, values, bound, unit in targets:
        if not values:
            bench.note(f"target {text}: not measured in this run")
            continue
        ok = all(v <= -bound for v in values) if bound < 0 else all(v >= bound for v in values)
        shown = ", ".join(f"{v:,.2f}" if unit != "/s" else f"{v:,.0f}" for v in values)
        med = statistics.median(values)
        bench.note(
            f"target {text}: {'met' if ok else 'NOT met'} (rounds: {shown} {unit}; median "
            f"{med:,.2f})"
        )
