"""Fault tests with real processes on real PostgreSQL: nothing stays running without a
live owner, nothing runs twice, nothing is lost."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from jobrunner import ExecutionStatus, JobRunner
from jobrunner.testing import InvariantChecker

from . import fault_jobs
from .conftest import Backend

ROOT = Path(__file__).resolve().parent.parent
LEASE = 0.75  # the fault workers' lease (three heartbeats of 0.25 s), kept on the row


@pytest.fixture
def store(postgres: Backend) -> Iterator[tuple[JobRunner, InvariantChecker]]:
    """A runner on the emptied test database with the fault_events table, and a checker."""
    runner = JobRunner(postgres.url, heartbeat_interval=0.1)
    with runner.engine.begin() as conn:
        fault_jobs.fault_metadata.drop_all(conn)
        fault_jobs.fault_metadata.create_all(conn)
    checker = InvariantChecker(postgres.url, reap_grace=None)
    yield runner, checker
    checker.close()
    runner.close()


def _worker(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.fault_worker", *args[:1], url,
                             *args[1:]], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _events(runner: JobRunner, event: str | None = None) -> list[Any]:
    query = sa.select(fault_jobs.events).order_by(fault_jobs.events.c.id)
    if event is not None:
        query = query.where(fault_jobs.events.c.event == event)
    with runner.engine.connect() as conn:
        return list(conn.execute(query).mappings())


def _wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def _reap_then_run(runner: JobRunner, execution_id: Any) -> Any:
    """Reap once the lease has expired, then run the retry: what a surviving worker does."""
    _wait_for(lambda: [e for e in runner.reap() if e.id == execution_id],
              "the lease to expire and reap() to take the execution back")
    [execution] = _wait_for(runner.run_due, "run_due to run the recovered execution")
    return execution


def test_kill_9_during_execute_is_reaped_and_retried(
        store: tuple[JobRunner, InvariantChecker], postgres: Backend) -> None:
    """kill -9 mid-execute: after the lease expires reap() retries it; attempt 2 succeeds."""
    runner, checker = store
    eid = runner.submit(fault_jobs.FaultJob, {"hold_s": 60})
    worker = _worker(postgres.url, "run", str(eid))
    _wait_for(lambda: _events(runner, "execute-start"), "execute to start")
    worker.kill()
    worker.wait(10)
    assert runner.get(eid).status is ExecutionStatus.RUNNING  # what a crash leaves behind
    execution = _reap_then_run(runner, eid)
    assert execution.id == eid and execution.succeeded and execution.attempt == 2
    ledger = runner.attempts(eid)
    assert [(a.number, a.status) for a in ledger] == [
        (1, ExecutionStatus.ABANDONED), (2, ExecutionStatus.SUCCEEDED)]
    assert "lost its lease in execute" in (ledger[0].error_message or "")
    checker.assert_ok()


def test_kill_9_before_record_commits_runs_record_only(
        store: tuple[JobRunner, InvariantChecker], postgres: Backend) -> None:
    """kill -9 after the checkpoint but before record commits: recovery runs record only."""
    runner, checker = store
    eid = runner.submit(fault_jobs.FaultJob, {"hold_s": 60, "hold_in": "record"})
    worker = _worker(postgres.url, "run", str(eid))
    _wait_for(lambda: _events(runner, "record-start"), "record to start")
    worker.kill()
    worker.wait(10)
    assert runner.get(eid).checkpointed
    execution = _reap_then_run(runner, eid)
    assert execution.succeeded and execution.attempt == 2
    assert len(_events(runner, "executed")) == 1  # execute's side effect happened once
    assert [e["attempt"] for e in _events(runner, "recorded")] == [2]  # attempt 1 rolled back
    assert [a.resumed_from for a in runner.attempts(eid)] == ["unknown", "record"]
    assert runner.attempts(eid)[0].phase == "record"  # where it died
    checker.assert_ok()


def test_a_paused_worker_cannot_overwrite_the_new_owner(
        store: tuple[JobRunner, InvariantChecker], postgres: Backend) -> None:
    """SIGSTOP past the lease, recovery elsewhere, SIGCONT: the stale attempt writes nothing."""
    runner, checker = store
    eid = runner.submit(fault_jobs.FaultJob, {"hold_s": 1.0})
    worker = _worker(postgres.url, "run", str(eid))
    _wait_for(lambda: _events(runner, "execute-start"), "execute to start")
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        execution = _reap_then_run(runner, eid)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    output, _ = worker.communicate(timeout=30)
    assert execution.succeeded and execution.attempt == 2
    final = runner.get(eid)
    assert final.status is ExecutionStatus.SUCCEEDED and final.attempt == 2
    assert final.result == {"attempt": 2, "hold": {"hold_s": 1.0, "hold_attempt": 1,
                                                   "hold_in": "execute"}}
    assert "lost its lease" in output and "final succeeded attempt 2" in output
    assert [a.status for a in runner.attempts(eid)] == [
        ExecutionStatus.ABANDONED, ExecutionStatus.SUCCEEDED]
    checker.assert_ok()


def test_killed_database_connection_mid_phase_is_retried_not_left_running(
        store: tuple[JobRunner, InvariantChecker]) -> None:
    """pg_terminate_backend during load: the attempt fails, is retried, nothing is lost."""
    runner, checker = store
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(runner.run(fault_jobs.PgSleepLoad)))
    thread.start()
    def sleeping_backends() -> list[int]:
        # pg_stat_activity is a snapshot per transaction: look again in a new one each time
        with runner.engine.connect() as conn:
            return list(conn.execute(sa.text(
                "select pid from pg_stat_activity where query like '%jobrunner-fault%' "
                "and query not like '%pg_stat_activity%'")).scalars())

    with runner.engine.begin() as conn:
        for pid in _wait_for(sleeping_backends, "the sleeping load"):
            conn.execute(sa.text("select pg_terminate_backend(:pid)"), {"pid": pid})
    thread.join(30)
    [execution] = result
    assert execution.succeeded and execution.attempt == 2 and execution.result == 2
    [first, _] = runner.attempts(execution.id)
    assert first.status is ExecutionStatus.FAILED and first.phase == "load"
    assert "terminat" in (first.error_message or "").lower()
    assert runner.list(status="running") == []
    checker.assert_ok()


def test_eight_processes_submitting_the_same_keys_create_each_once(
        store: tuple[JobRunner, InvariantChecker], postgres: Backend) -> None:
    """8 processes x the same 250 idempotency keys, at once: exactly 250 executions."""
    runner, checker = store
    workers = [_worker(postgres.url, "submit-keys", str(seed)) for seed in range(8)]
    for w in workers:
        output, _ = w.communicate(timeout=120)
        assert w.returncode == 0, output
    with runner.engine.connect() as conn:
        total, keys = conn.execute(sa.text(
            "select count(*), count(distinct idempotency_key) from jobrunner_executions"
        )).one()
    assert (total, keys) == (250, 250)
    checker.assert_ok()


def test_max_concurrency_one_is_never_exceeded_by_four_workers(
        store: tuple[JobRunner, InvariantChecker], postgres: Backend) -> None:
    """max_concurrency=1, 20 submissions, 4 worker processes: never two running at once."""
    runner, checker = store
    ids = {runner.submit(fault_jobs.Exclusive) for _ in range(20)}
    workers = [_worker(postgres.url, "drain") for _ in range(4)]
    samples = []
    while any(w.poll() is None for w in workers):
        with runner.engine.connect() as conn:
            samples.append(conn.execute(sa.text(
                "select count(*) from jobrunner_executions where status = 'running'")).scalar())
        checker.assert_ok()
    for w in workers:
        output, _ = w.communicate(timeout=60)
        assert w.returncode == 0, output
    assert max(samples) <= 1 and len(samples) > 10
    assert {e.id for e in runner.list(status="succeeded")} == ids
    starts = {e["execution_id"]: e["at"] for e in _events(runner, "start")}
    ends = {e["execution_id"]: e["at"] for e in _events(runner, "end")}
    intervals = sorted((starts[k], ends[k]) for k in starts)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(intervals)), intervals
    assert len({e["pid"] for e in _events(runner, "start")}) > 1  # the work really was shared
