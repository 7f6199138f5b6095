"""Promises the documentation makes that no other test proved (issue 19, docs that tell the
truth): each test here is named in docs/guarantees.md or on the page that makes the promise."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from jobrunner import (
    AsyncJobRunner,
    ExecutionStatus,
    JobRunner,
    JobRunnerError,
    PhasedJob,
    Registry,
)
from jobrunner import _queries as q
from jobrunner._attempt import utcnow
from jobrunner._schema import executions
from jobrunner.contrib.celery import install

from . import celery_jobs  # noqa: F401  (registers tests.celery.* by name)
from .conftest import Backend


def test_the_relay_reaps_a_dead_celery_workers_execution_and_sends_it_again(
    backend: Backend,
) -> None:
    """A Celery execution whose worker died holding it: once its lease has expired, one
    relay() reaps it (retrying, an abandoned attempt) and sends it again as a new task."""
    app = Celery("relay-reaps", broker="memory://")
    jobs = install(app, database_url=backend.url, relay_interval=None)
    jobs.grace = 0.0  # the reaped row is sent at this relay, not after the grace window
    try:
        eid = jobs.enqueue("tests.celery.async_flaky")  # three attempts allowed
        first = jobs.runner.get(eid)
        assert first.dispatch == "celery" and first.dispatched_at is not None
        with jobs.runner.engine.begin() as conn:  # its task started, then the worker died
            assert q.claim_one(conn, eid, worker="celery-dead", lease_s=60)
            conn.execute(sa.update(executions).where(executions.c.id == eid).values(
                lease_expires_at=utcnow() - timedelta(hours=1)))
        assert jobs.relay() == 1
        again = jobs.runner.get(eid)
        assert again.status is ExecutionStatus.RETRYING
        assert again.dispatched_at is not None and again.external_id != first.external_id
        [lost] = jobs.runner.attempts(eid)
        assert lost.status is ExecutionStatus.ABANDONED
        assert lost.error_type == "jobrunner.WorkerLost"
        assert jobs.runner.run_due() == []  # still Celery's to run, not a jobrunner worker's
        assert jobs.relay() == 0  # sent once: nothing to send again yet
    finally:
        jobs.close()


def test_a_sync_worker_past_its_grace_period_asks_threads_to_stop(backend: Backend) -> None:
    """JobRunner.work(): after the grace period, self.cancelled() turns true; code that
    returns then ends as usual, and work() returns."""
    started = threading.Event()

    class Cooperative(PhasedJob):
        name = "promises.cooperative"

        def execute(self, loaded: Any) -> str:
            started.set()
            while not self.cancelled():
                threading.Event().wait(0.01)
            return "stopped when asked"

    registry = Registry()
    registry.register(Cooperative)
    runner = JobRunner(backend.url, registry=registry)
    done: list[Any] = []
    try:
        eid = runner.submit(Cooperative)
        thread = threading.Thread(
            target=lambda: done.append(runner.work(grace_period=0.1, poll_interval=600)))
        thread.start()
        assert started.wait(30)
        runner.stop_work()
        thread.join(30)
        assert not thread.is_alive()
        execution = runner.get(eid)
        assert execution.succeeded and execution.result == "stopped when asked"
        assert execution.lease_expires_at is None
    finally:
        runner.close()


def _cap_sqlite_pages(runner: JobRunner | AsyncJobRunner, limit: dict[str, int]) -> None:
    """A full disk, simulated: every connection the runner checks out may grow the file
    to at most ``limit["pages"]`` pages (SQLite then fails writes with SQLITE_FULL)."""
    engine = runner.engine if isinstance(runner, JobRunner) else runner.engine.sync_engine

    @sa.event.listens_for(engine.pool, "checkout")
    def _cap(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA max_page_count = {limit['pages']}")
        cursor.close()


def test_a_full_disk_on_sqlite_stores_nothing_half_and_leaves_nothing_running(
    tmp_path: Any,
) -> None:
    """The disk fills: submit raises a jobrunner error and stores nothing; a run whose
    result no longer fits ends as its retry policy says (not running); with room again,
    everything works."""

    class Big(PhasedJob):
        name = "promises.big_result"

        def execute(self, loaded: Any) -> str:
            return "x" * 400_000  # ~100 pages of checkpoint

    runner = JobRunner(f"sqlite:///{tmp_path / 'full.db'}", registry=Registry())
    runner.create_schema()
    runner.registry.register(Big)
    limit = {"pages": 1_000_000}
    runner.engine.dispose()
    _cap_sqlite_pages(runner, limit)
    try:
        with runner.engine.connect() as conn:
            pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())
        limit["pages"] = pages + 4  # room for a failure write, not for the result
        execution = runner.run(Big)
        assert execution.status is ExecutionStatus.FAILED and execution.phase == "execute"
        assert (execution.error_type or "").startswith("jobrunner.")
        assert not execution.checkpointed
        with pytest.raises(JobRunnerError, match="is full; free space") as full:
            runner.submit(Big, {"pad": "y" * 600_000})
        assert "server is running" not in str(full.value)
        assert [e.id for e in runner.list()] == [execution.id]  # nothing half-stored
        assert runner.list(status="running") == []
        limit["pages"] = 1_000_000  # room again
        runner.retry(execution.id)
        [again] = runner.run_due()
        assert again.succeeded and len(again.result) == 400_000
    finally:
        runner.close()
