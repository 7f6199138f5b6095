"""What users would write instead: naive SQLAlchemy, procrastinate, Celery + a DB backend."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from jobrunner._schema import attempts, executions

from ._harness import Sample, celery_worker
from ._jobs import cpu_ms, run_many, run_many_sample, truncate

E = executions.c

# -- naive SQLAlchemy: an AsyncSession per transaction, the same three transactions ---------


async def run_naive_sqlalchemy(url: sa.URL, n: int, concurrency: int) -> Sample:
    """The floor's three transactions written the obvious way with ``AsyncSession``."""
    engine = create_async_engine(url.set(drivername="postgresql+asyncpg"), pool_size=concurrency)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def one() -> None:
        eid, now = uuid.uuid4(), datetime.now(UTC)
        async with sessions.begin() as s:
            await s.execute(sa.insert(executions).values(_running_row(eid, now)))
        async with sessions.begin() as s:
            owned = sa.and_(E.id == eid, E.status == "running", E.lease_token == 1)
            stmt = sa.update(executions).where(owned).values(result=None, checkpointed=True)
            await s.execute(stmt.returning(E.cancel_requested))
        async with sessions.begin() as s:
            done = sa.update(executions).where(owned).values(status="succeeded", finished_at=now)
            (await s.execute(done.returning(executions))).one()
            await s.execute(sa.insert(attempts).values(_attempt_row(eid, now)))

    try:
        await run_many(one, 10 * concurrency, concurrency)  # warm up: pool, compiled cache
        truncate(url)
        return await run_many_sample(one, n, concurrency)
    finally:
        await engine.dispose()


def _running_row(eid: uuid.UUID, now: datetime) -> dict[str, Any]:
    return {
        "id": eid, "job": "bench.naive", "handler": "benchmarks._rivals:naive", "args": {},
        "status": "running", "phase": "load", "attempt": 1, "max_attempts": 1,
        "triggered_by": "inline", "worker": "bench-naive", "lease_token": 1,
        "created_at": now, "started_at": now, "heartbeat_at": now,
    }  # fmt: skip


def _attempt_row(eid: uuid.UUID, now: datetime) -> dict[str, Any]:
    return {
        "execution_id": eid, "number": 1, "status": "succeeded", "phase": "record",
        "resumed_from": "load", "worker": "bench-naive", "triggered_by": "inline",
        "started_at": now, "finished_at": now,
    }  # fmt: skip


# -- procrastinate: defer n no-op tasks, then time one worker (concurrency 8) draining them --


async def run_procrastinate(url: sa.URL, n: int, concurrency: int) -> Sample:
    """Seconds for one procrastinate worker to process ``n`` deferred no-op tasks."""
    import procrastinate

    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    size = concurrency + 4
    connector = procrastinate.PsycopgConnector(conninfo=conninfo, min_size=size, max_size=size)
    app = procrastinate.App(connector=connector)

    @app.task(name="bench.noop", queue="bench")
    async def noop() -> None:
        return None

    async with app.open_async():
        with contextlib.suppress(Exception):  # already there on the second run
            await app.schema_manager.apply_schema_async()
        await _procrastinate_batch(app, noop, 10 * concurrency, concurrency)  # warm up
        truncate(url, "procrastinate_jobs")
        await noop.batch_defer_async(*({} for _ in range(n)))
        start, cpu = time.perf_counter(), time.process_time()
        await _procrastinate_batch(app, noop, 0, concurrency)
        seconds, cpu_per_job = time.perf_counter() - start, cpu_ms(cpu, n)
        done = await _procrastinate_done(app)
    if done != n:
        raise RuntimeError(f"procrastinate finished {done} of {n} jobs")
    return Sample(seconds=seconds, extra={"cpu_ms": cpu_per_job})


async def _procrastinate_batch(app: Any, task: Any, n: int, concurrency: int) -> None:
    if n:
        await task.batch_defer_async(*({} for _ in range(n)))
    await app.run_worker_async(
        queues=["bench"], concurrency=concurrency, wait=False, install_signal_handlers=False
    )


async def _procrastinate_done(app: Any) -> int:
    rows = await app.connector.execute_query_all_async(
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'succeeded'"
    )
    return int(rows[0]["n"])


# -- Celery: prefork worker (concurrency 2), Redis broker, SQLAlchemy result backend ---------


class CeleryRig:
    """A Celery worker subprocess for the benchmark; each run uses a fresh queue."""

    def __init__(self, url: sa.URL, broker: str, concurrency: int) -> None:
        self.url = url
        self.backend = "db+" + url.set(drivername="postgresql+psycopg").render_as_string(
            hide_password=False
        )
        self.broker = broker
        self.concurrency = concurrency
        self.node = f"jobrunner-bench-{uuid.uuid4().hex[:8]}@localhost"
        self.queues: list[str] = []
        os.environ["JOBRUNNER_BENCH_BROKER"] = broker
        os.environ["JOBRUNNER_BENCH_RESULT_BACKEND"] = self.backend
        from . import _celery_app

        self.app, self.task = _celery_app.app, _celery_app.noop
        self.app.conf.update(broker_url=broker, result_backend=self.backend)
        self.engine = sa.create_engine(url.set(drivername="postgresql+psycopg"))

    @contextlib.contextmanager
    def worker(self) -> Iterator[CeleryRig]:
        worker = celery_worker(
            self.app,
            module="benchmarks._celery_app",
            node=self.node,
            concurrency=self.concurrency,
            log_name="celery-worker.log",
        )
        try:
            with worker:
                yield self
        finally:
            self._forget_queues()
            self.engine.dispose()

    def run(self, n: int) -> Sample:
        """Send ``n`` tasks to a queue nobody consumes, then time the worker draining it."""
        queue = f"jobrunner-bench-{uuid.uuid4().hex[:8]}"
        self.queues.append(queue)
        with self.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM celery_taskmeta"))
        for _ in range(n):
            self.task.apply_async(queue=queue)
        start = time.perf_counter()
        self.app.control.add_consumer(queue, destination=[self.node], reply=True)
        self._wait_done(n, deadline=time.monotonic() + max(60, n / 10))
        seconds = time.perf_counter() - start
        self.app.control.cancel_consumer(queue, destination=[self.node], reply=True)
        return Sample(seconds=seconds)

    def warm_up(self, n: int) -> None:
        """Run a few tasks so each child has its engine and the result table exists."""
        from ._celery_app import IDLE_QUEUE

        for _ in range(n):
            self.task.apply_async(queue=IDLE_QUEUE)
        self._wait_done(n, deadline=time.monotonic() + 120)

    def _wait_done(self, n: int, *, deadline: float) -> None:
        count = sa.text("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
        while True:
            with contextlib.suppress(sa.exc.ProgrammingError), self.engine.connect() as conn:
                if conn.execute(count).scalar_one() >= n:  # no table before the first task
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Celery did not finish {n} tasks in time")
            time.sleep(0.02)

    def _forget_queues(self) -> None:
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(self.broker)
            for q in self.queues:
                client.delete(q, f"_kombu.binding.{q}")
            client.close()
