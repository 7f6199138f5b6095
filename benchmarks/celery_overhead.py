"""celery_overhead: jobrunner's Celery task vs a plain Celery task doing the same writes by hand.

One prefork worker (concurrency 2), one Redis broker, one scratch PostgreSQL database, one
run. The plain task is what a careful user writes without jobrunner: the pending row is
inserted before sending, and the task claims it (``running``), checkpoints the result and
marks it ``succeeded`` with an attempt row — jobrunner's three transactions, by hand, with
psycopg. jobrunner's rows run the same no-op job through ``jobrunner.run_execution``, sync
(``JobRunner``, psycopg) and async (``AsyncJobRunner`` on the worker's loop, asyncpg).
Each measurement fills a fresh queue first and then times the worker draining it, so
enqueueing is not timed. Target: jobrunner / plain >= 0.8.

This module is also the worker's app: ``celery -A benchmarks.celery_overhead worker``
(``JOBRUNNER_DATABASE_URL``, ``JOBRUNNER_BENCH_BROKER`` from the environment).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from celery import Celery

from jobrunner import Registry
from jobrunner._schema import attempts, executions
from jobrunner.contrib.celery import install

from ._harness import Bench, Measurement, Sample, celery_worker
from ._jobs import AsyncNoop, SyncNoop, create_schema, truncate

BROKER_ENV = "JOBRUNNER_BENCH_BROKER"
DEFAULT_BROKER = "redis://127.0.0.1:6379/13"
CONCURRENCY = 2
PLAIN_JOB = "bench.plain"
E = executions.c

app = Celery("jobrunner_celery_overhead", broker=os.environ.get(BROKER_ENV, DEFAULT_BROKER))
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
)
# The worker runs the jobs registered here: a message's job name is never imported.
# Database from JOBRUNNER_DATABASE_URL (the worker) or set in run().
jobs = install(app, registry=Registry([SyncNoop, AsyncNoop]))


# -- the plain Celery task: jobrunner's writes, by hand ---------------------------------------

_engine: tuple[int, sa.Engine] | None = None


def _plain_engine() -> sa.Engine:
    global _engine
    if _engine is None or _engine[0] != os.getpid():
        url = sa.make_url(os.environ["JOBRUNNER_DATABASE_URL"])
        _engine = (os.getpid(), sa.create_engine(url.set(drivername="postgresql+psycopg")))
    return _engine[1]


_CLAIM = (
    sa.update(executions)
    .where(E.id == sa.bindparam("eid"), E.status.in_(("pending", "retrying")))
    .values(
        status="running",
        attempt=E.attempt + 1,
        lease_token=E.lease_token + 1,
        worker=sa.bindparam("worker"),
        started_at=sa.bindparam("now"),
        heartbeat_at=sa.bindparam("now"),
        phase="load",
    )
    .returning(E.lease_token, E.attempt)
)


def _owned(eid: uuid.UUID, token: int) -> Any:
    return sa.and_(E.id == eid, E.status == "running", E.lease_token == token)


@app.task(name="bench.plain_tracked", shared=False)
def plain_tracked(execution_id: str) -> None:
    """Claim, checkpoint, finish + ledger row: three transactions, like jobrunner's."""
    engine, eid, worker = _plain_engine(), uuid.UUID(execution_id), f"plain:{os.getpid()}"
    start = datetime.now(UTC)
    with engine.begin() as conn:
        claimed = conn.execute(_CLAIM, {"eid": eid, "worker": worker, "now": start}).first()
    if claimed is None:
        return  # finished or running elsewhere
    owned = _owned(eid, claimed.lease_token)
    with engine.begin() as conn:
        checkpoint = sa.update(executions).where(owned).returning(E.cancel_requested)
        conn.execute(checkpoint.values(result=None, checkpointed=True, phase="record"))
    now = datetime.now(UTC)
    with engine.begin() as conn:
        done = sa.update(executions).where(owned).returning(executions)
        conn.execute(done.values(status="succeeded", finished_at=now, heartbeat_at=now)).one()
        conn.execute(sa.insert(attempts).values(_attempt(eid, claimed.attempt, worker, start)))


def _attempt(eid: uuid.UUID, number: int, worker: str, start: datetime) -> dict[str, Any]:
    return {
        "execution_id": eid, "number": number, "status": "succeeded", "phase": "record",
        "resumed_from": "load", "worker": worker, "triggered_by": "celery",
        "started_at": start, "finished_at": datetime.now(UTC),
    }  # fmt: skip


def _pending_row(eid: uuid.UUID) -> dict[str, Any]:
    return {
        "id": eid, "job": PLAIN_JOB, "handler": "benchmarks.celery_overhead:plain_tracked",
        "args": {}, "status": "pending", "attempt": 0, "max_attempts": 1,
        "triggered_by": "celery", "lease_token": 0, "created_at": datetime.now(UTC),
    }  # fmt: skip


# -- the rig: one worker, a fresh queue per measurement ------------------------------------------


class Rig:
    """The worker subprocess, and how to fill a queue and time the worker draining it."""

    def __init__(self, url: sa.URL, broker: str) -> None:
        self.url = url
        self.broker = broker
        self.node = f"jobrunner-overhead-{uuid.uuid4().hex[:8]}@localhost"
        self.idle = f"jobrunner-overhead-idle-{uuid.uuid4().hex[:8]}"
        self.queues: list[str] = [self.idle]
        self.engine = sa.create_engine(url.set(drivername="postgresql+psycopg"))
        app.conf.broker_url = broker
        jobs.database_url = url.render_as_string(hide_password=False)

    @contextlib.contextmanager
    def worker(self) -> Iterator[Rig]:
        env = {**os.environ, BROKER_ENV: self.broker, "JOBRUNNER_DATABASE_URL": jobs.database_url}
        worker = celery_worker(
            app,
            module="benchmarks.celery_overhead",
            node=self.node,
            concurrency=CONCURRENCY,
            log_name="celery-overhead-worker.log",
            queues=[self.idle],
            env=env,
        )
        try:
            with worker:
                yield self
        finally:
            self._forget_queues()
            jobs.close()
            self.engine.dispose()

    def send_plain(self, n: int, queue: str) -> None:
        ids = [uuid.uuid4() for _ in range(n)]
        with self.engine.begin() as conn:
            conn.execute(sa.insert(executions), [_pending_row(eid) for eid in ids])
        for eid in ids:
            plain_tracked.apply_async((str(eid),), queue=queue)

    def drain(self, n: int, job: str, fill: Callable[[int, str], None]) -> Sample:
        """Fill a queue nobody consumes with ``n`` messages, then time the worker on it."""
        truncate(self.url)
        queue = f"jobrunner-overhead-{uuid.uuid4().hex[:8]}"
        self.queues.append(queue)
        fill(n, queue)
        start = time.perf_counter()
        app.control.add_consumer(queue, destination=[self.node], reply=True)
        self._wait_done(n, job, deadline=time.monotonic() + max(60, n / 10))
        seconds = time.perf_counter() - start
        app.control.cancel_consumer(queue, destination=[self.node], reply=True)
        return Sample(seconds=seconds)

    def warm_up(self, n: int) -> None:
        """Each child: engines connected, statements compiled, the process loop's engine."""
        for job in (SyncNoop, AsyncNoop):
            for _ in range(n):
                jobs.enqueue(job, queue=self.idle)
        self.send_plain(n, self.idle)
        for job in (SyncNoop.name, AsyncNoop.name, PLAIN_JOB):
            self._wait_done(n, job, deadline=time.monotonic() + 120)

    def _wait_done(self, n: int, job: str, *, deadline: float) -> None:
        count = sa.select(sa.func.count()).where(E.job == job, E.status == "succeeded")
        while True:
            with self.engine.connect() as conn:
                if conn.execute(count).scalar_one() >= n:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not finish {n} {job} executions in time")
            time.sleep(0.02)

    def _forget_queues(self) -> None:
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(self.broker)
            for q in self.queues:  # messages and bindings of this run's queues
                for key in client.scan_iter(match=f"*{q}*"):
                    client.delete(key)
            client.close()


def _enqueue(job: type[Any]) -> Callable[[int, str], None]:
    def fill(n: int, queue: str) -> None:
        for _ in range(n):
            jobs.enqueue(job, queue=queue)

    return fill


def run(bench: Bench) -> None:
    n = bench.size(full=2_000, quick=100)
    with bench.scratch_database() as url:
        create_schema(url)
        rig = Rig(url, os.environ.get(BROKER_ENV, DEFAULT_BROKER))
        try:
            with rig.worker():
                rig.warm_up(20)
                _, sync, asyn = _measure_interleaved(bench, rig, n)
            _notes(bench, sync, asyn)
        except Exception as exc:  # no broker here: say why instead of failing the whole run
            bench.note(f"not measured: {type(exc).__name__}: {exc}")
    bench.table(
        f"celery_overhead: {n:,} no-op executions, prefork x{CONCURRENCY}, Redis, PostgreSQL "
        "(x floor = / plain Celery task)"
    )


def _measure_interleaved(bench: Bench, rig: Rig, n: int) -> list[Measurement]:
    """Plain, sync and async runs take turns (order rotating), so load drift hits all three."""
    systems: list[tuple[str, str, Callable[[], Sample]]] = [
        ("plain Celery task", "3 tx by hand, psycopg",
         lambda: rig.drain(n, PLAIN_JOB, rig.send_plain)),
        ("jobrunner task", "sync job, JobRunner",
         lambda: rig.drain(n, SyncNoop.name, _enqueue(SyncNoop))),
        ("jobrunner task", "async job, process loop",
         lambda: rig.drain(n, AsyncNoop.name, _enqueue(AsyncNoop))),
    ]  # fmt: skip
    samples: list[list[Sample]] = [[] for _ in systems]
    for round_ in range(bench.repeat):
        for k in range(len(systems)):
            i = (round_ + k) % len(systems)
            samples[i].append(systems[i][2]())
    measured: list[Measurement] = []
    for (system, variant, _), taken in zip(systems, samples, strict=True):
        measured.append(
            bench.measure(
                system=system,
                variant=variant,
                n=n,
                concurrency=CONCURRENCY,
                fn=functools.partial(taken.pop, 0),  # timed above, in turns
                ratio_to=measured[0] if measured else None,
            )
        )
    return measured


def _notes(bench: Bench, *measured: Measurement) -> None:
    for m in measured:
        ratio = m.ratio_to_floor or 0.0
        verdict = "met" if ratio >= 0.8 else "NOT met"
        bench.note(f"{m.variant}: {ratio:.2f} x the plain task (target >= 0.8: {verdict})")
