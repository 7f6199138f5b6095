"""One rival's round, in a process of its own: enqueue N no-op jobs, then drain them.

``python benchmarks/_rival_child.py SYSTEM --dsn URL --server-dsn URL -n N [--batch]``
prints one JSON object: the seconds to enqueue and to drain, the CPU seconds spent (this
process with all its threads, plus any child processes it started: Celery's prefork
worker), the rival's version, and ``pg_stat_database`` / ``pg_stat_wal`` before and after.

It imports only the rival, psycopg and psutil (no jobrunner), so the same file runs under
another interpreter: oban-py needs Python >= 3.12 and runs from its own venv. Each run
first installs the rival's schema and runs an untimed warm-up of a few jobs, whose
connections are closed before the counters are read; the timed run's connections are
closed before they are read again (an exiting backend flushes its statistics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "bench"
WARM_UP = 40


def cpu_seconds() -> float:
    """CPU of this process (all threads) and of its live descendants (Celery's worker)."""
    me = psutil.Process()
    total = time.process_time()
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system
    return total


def server_counters(server_dsn: str, database: str) -> dict[str, float]:
    """Committed transactions in ``database`` and the server's WAL syncs and records."""
    time.sleep(0.3)  # let exiting backends flush their statistics
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        commits = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (database,)
        ).fetchone()
        wal = conn.execute("SELECT wal_sync, wal_records, wal_write FROM pg_stat_wal").fetchone()
    assert commits is not None and wal is not None
    return {
        "xact_commit": float(commits[0]),
        "wal_sync": float(wal[0]),
        "wal_records": float(wal[1]),
        "wal_write": float(wal[2]),
    }


_POLLER: dict[str, psycopg.Connection[Any]] = {}
#: Transactions the harness itself ran in the scratch database (subtracted from commits).
POLLS = [0]


def count(dsn: str, sql: str) -> int:
    """One number from the scratch database, on one kept connection; each call is counted
    so that its transaction can be taken off the rival's commits."""
    conn = _POLLER.get(dsn)
    if conn is None:
        conn = _POLLER[dsn] = psycopg.connect(dsn, autocommit=True)
    POLLS[0] += 1
    row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def close_poller() -> None:
    for conn in _POLLER.values():
        conn.close()
    _POLLER.clear()


# -- the rivals: each has setup (untimed), enqueue(n) and drain(n) on a fresh client ---------


class PgQueuer:
    """pgqueuer: asyncpg, one connection each for enqueue and for the QueueManager,
    ``run(batch_size=4, max_concurrent_tasks=8, mode=drain)``."""

    package = "pgqueuer"

    def __init__(self, dsn: str, concurrency: int, batch: bool) -> None:
        self.dsn, self.concurrency, self.batch = dsn, concurrency, batch

    async def setup(self) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(self.dsn)
        queries = Queries(AsyncpgDriver(conn))
        if not await queries.schema_is_installed():
            await queries.install()
        await conn.close()

    async def enqueue(self, n: int) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(self.dsn)
        queries = Queries(AsyncpgDriver(conn))
        if self.batch:
            await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
        else:
            for _ in range(n):
                await queries.enqueue("noop", None)
        await conn.close()

    async def drain(self, n: int) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries, QueueManager
        from pgqueuer.types import QueueExecutionMode

        conn = await asyncpg.connect(self.dsn)
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            return None

        await qm.run(
            batch_size=self.concurrency // 2,
            max_concurrent_tasks=self.concurrency,
            mode=QueueExecutionMode.drain,
            dequeue_timeout=timedelta(seconds=0.5),
        )
        await conn.close()
        left = count(self.dsn, "SELECT count(*) FROM pgqueuer")
        if left:
            raise RuntimeError(f"pgqueuer left {left} jobs")


class Procrastinate:
    """procrastinate: PsycopgConnector (pool of concurrency + 4), one worker with
    ``concurrency=8, wait=False``; ``defer_async`` per job, or ``batch_defer_async``."""

    package = "procrastinate"

    def __init__(self, dsn: str, concurrency: int, batch: bool) -> None:
        import procrastinate

        self.dsn, self.concurrency, self.batch = dsn, concurrency, batch
        size = concurrency + 4
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=size, max_size=size)
        )

        @self.app.task(name="bench.noop", queue=QUEUE)
        async def noop() -> None:
            return None

        self.task = noop

    async def setup(self) -> None:
        async with self.app.open_async():
            with contextlib.suppress(Exception):  # already there
                await self.app.schema_manager.apply_schema_async()

    async def enqueue(self, n: int) -> None:
        async with self.app.open_async():
            if self.batch:
                await self.task.batch_defer_async(*({} for _ in range(n)))
            else:
                for _ in range(n):
                    await self.task.defer_async()

    async def drain(self, n: int) -> None:
        async with self.app.open_async():
            await self.app.run_worker_async(
                queues=[QUEUE],
                concurrency=self.concurrency,
                wait=False,
                install_signal_handlers=False,
            )
        sql = "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"
        left = count(self.dsn, sql)
        if left:
            raise RuntimeError(f"procrastinate left {left} jobs")


class Oban:
    """oban-py: a psycopg pool; enqueue through a client-mode Oban (no queues), drain with
    ``queues={"bench": 8}`` until every job is ``completed``."""

    package = "oban"

    def __init__(self, dsn: str, concurrency: int, batch: bool) -> None:
        from oban import worker

        self.dsn, self.concurrency, self.batch = dsn, concurrency, batch

        @worker(queue=QUEUE)
        class Noop:
            async def process(self, job: Any) -> None:
                return None

        self.worker = Noop

    async def _pool(self) -> Any:
        from oban import Oban as O

        return await O.create_pool(self.dsn, min_size=1, max_size=self.concurrency + 2)

    async def setup(self) -> None:
        from oban import schema

        pool = await self._pool()
        with contextlib.suppress(Exception):  # already there
            await schema.install(pool)
        await pool.close()

    async def enqueue(self, n: int) -> None:
        from oban import Oban as O

        pool = await self._pool()
        async with O(pool=pool):
            if self.batch:
                await O.get_instance().enqueue_many([self.worker.new() for _ in range(n)])
            else:
                for _ in range(n):
                    await self.worker.enqueue()
        await pool.close()

    async def drain(self, n: int) -> None:
        from oban import Oban as O

        pool = await self._pool()
        sql = "SELECT count(*) FROM oban_jobs WHERE state <> 'completed'"
        async with O(pool=pool, queues={QUEUE: self.concurrency}):
            while count(self.dsn, sql):
                await asyncio.sleep(0.005)
        await pool.close()


class Dbos:
    """DBOS: a no-op workflow on a queue with ``worker_concurrency=8`` polled every 10 ms;
    enqueued by ``DBOSClient.enqueue`` while DBOS is not launched (a pre-filled queue), then
    drained by ``DBOS.launch()`` until every workflow is ``SUCCESS`` (launch is timed)."""

    package = "dbos"

    def __init__(self, dsn: str, concurrency: int, batch: bool) -> None:
        from dbos import DBOS

        self.dsn, self.concurrency, self.batch = dsn, concurrency, batch
        self.config: Any = {
            "name": "jobrunner-bench",
            "system_database_url": dsn.replace("postgresql://", "postgresql+psycopg://", 1),
            "log_level": "WARNING",
            "run_admin_server": False,
        }
        self.dbos = DBOS

        @DBOS.workflow(name="bench_noop")
        def noop() -> None:
            return None

    def _launch(self) -> None:
        self.dbos(config=self.config)
        self.dbos.launch()  # registering a queue needs the system database
        self.dbos.register_queue(
            QUEUE, worker_concurrency=self.concurrency, polling_interval_sec=0.01
        )

    async def setup(self) -> None:
        await asyncio.to_thread(self._setup)  # DBOS's sync API refuses a running loop

    def _setup(self) -> None:
        self._launch()  # creates the dbos schema
        self.dbos.destroy()

    async def enqueue(self, n: int) -> None:
        await asyncio.to_thread(self._enqueue, n)

    def _enqueue(self, n: int) -> None:
        from dbos import DBOSClient

        client = DBOSClient(system_database_url=self.config["system_database_url"],
                            application_name="jobrunner-bench")  # fmt: skip
        options: Any = {"queue_name": QUEUE, "workflow_name": "bench_noop"}
        for _ in range(n):
            client.enqueue(options)
        client.destroy()

    async def drain(self, n: int) -> None:
        await asyncio.to_thread(self._drain, n)

    def _drain(self, n: int) -> None:
        sql = "SELECT count(*) FROM dbos.workflow_status WHERE status <> 'SUCCESS'"
        self._launch()
        try:
            deadline = time.monotonic() + max(120, n / 5)
            while count(self.dsn, sql):
                if time.monotonic() > deadline:
                    raise RuntimeError("DBOS did not finish in time")
                time.sleep(0.01)
        finally:
            self.dbos.destroy()


class Celery:
    """Celery: a prefork worker subprocess (concurrency 8), Redis broker, SQLAlchemy result
    backend in the scratch database; ``apply_async`` per job to a queue the worker does not
    consume, then ``add_consumer`` starts the drain, which ends at N ``SUCCESS`` rows."""

    package = "celery"

    def __init__(self, dsn: str, concurrency: int, batch: bool) -> None:
        self.dsn, self.concurrency = dsn, concurrency
        backend = "db+" + dsn.replace("postgresql://", "postgresql+psycopg://", 1)
        os.environ["JOBRUNNER_BENCH_RESULT_BACKEND"] = backend
        os.environ.setdefault("JOBRUNNER_BENCH_BROKER", "redis://127.0.0.1:6379/14")
        sys.path.insert(0, str(ROOT))
        from benchmarks import _celery_app

        self.app, self.task = _celery_app.app, _celery_app.noop
        self.app.conf.update(result_backend=backend)
        self.node = f"jobrunner-bench-{uuid.uuid4().hex[:8]}@localhost"
        self.queue = f"jobrunner-bench-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def setup(self) -> None:
        (ROOT / ".bench").mkdir(exist_ok=True)
        args = [sys.executable, "-m", "celery", "-A", "benchmarks._celery_app", "worker",
                "--pool=prefork", f"--concurrency={self.concurrency}", "-n", self.node,
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "--loglevel=WARNING"]  # fmt: skip
        log = (ROOT / ".bench" / "celery-rivals-worker.log").open("w")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (untimed set-up)
            args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while not self.app.control.ping(destination=[self.node], timeout=0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Celery worker did not start")
        for _ in range(WARM_UP):  # each child gets its engine; the result table exists
            self.task.apply_async()
        self._wait(WARM_UP)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM celery_taskmeta")

    async def enqueue(self, n: int) -> None:
        for _ in range(n):
            self.task.apply_async(queue=self.queue)

    async def drain(self, n: int) -> None:
        self.app.control.add_consumer(self.queue, destination=[self.node], reply=True)
        self._wait(n)

    def _wait(self, n: int) -> None:
        deadline = time.monotonic() + max(60, n / 10)
        sql = "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'"
        while True:
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                if count(self.dsn, sql) >= n:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Celery did not finish {n} tasks in time")
            time.sleep(0.01)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(os.environ["JOBRUNNER_BENCH_BROKER"])
            client.delete(self.queue, f"_kombu.binding.{self.queue}")
            client.close()


SYSTEMS: dict[str, Any] = {
    "pgqueuer": PgQueuer,
    "procrastinate": Procrastinate,
    "oban": Oban,
    "dbos": Dbos,
    "celery": Celery,
}


async def one_round(args: argparse.Namespace) -> dict[str, Any]:
    rival = SYSTEMS[args.system](args.dsn, args.concurrency, args.batch)
    database = args.dsn.rsplit("/", 1)[1].split("?")[0]
    try:
        await rival.setup()
        if args.system != "celery":  # warm up: imports, statements, the first connections
            await rival.enqueue(WARM_UP)
            await rival.drain(WARM_UP)
        close_poller()
        before = server_counters(args.server_dsn, database)
        POLLS[0] = 0
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await rival.enqueue(args.n)
        cpu1, t1 = cpu_seconds(), time.perf_counter()
        await rival.drain(args.n)
        cpu2, t2 = cpu_seconds(), time.perf_counter()
        polls = POLLS[0]
        close_poller()
        after = server_counters(args.server_dsn, database)
    finally:
        if hasattr(rival, "close"):
            rival.close()
    return {
        "system": args.system,
        "version": version(rival.package),
        "python": sys.version.split()[0],
        "enqueue_s": t1 - t0,
        "drain_s": t2 - t1,
        "cpu_enqueue_s": cpu1 - cpu0,
        "cpu_drain_s": cpu2 - cpu1,
        "counters": {
            **{k: after[k] - before[k] for k in after},
            "xact_commit": after["xact_commit"] - before["xact_commit"] - polls,
        },
        "harness_polls": polls,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--dsn", required=True, help="the scratch database (postgresql://...)")
    parser.add_argument("--server-dsn", required=True, help="where pg_stat_* is read")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", action="store_true", help="enqueue all in one call")
    args = parser.parse_args()
    result = asyncio.run(one_round(args))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
