"""Retries and the attempt ledger: inline waits, deferred waits, run_due, bad policies."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from jobrunner import (
    AsyncJobRunner,
    ConfigurationError,
    ExecutionStatus,
    InvalidTransition,
    JobRunner,
    PhasedJob,
    Registry,
    RetryPolicy,
)

from .conftest import Backend
from .support import Counter

FAST = {"wait_initial": 0.01, "wait_max": 0.02, "jitter": 0.0}


def _flaky(failures: int, counter: Counter, exc: type[Exception] = ConnectionError,
           **policy: Any) -> type[PhasedJob]:
    class Flaky(PhasedJob):
        retry = RetryPolicy(**{**FAST, **policy})

        def execute(self, loaded: Any) -> int:
            n = counter.bump()
            if n <= failures:
                raise exc(f"failure {n}")
            return n

    return Flaky


def test_two_failures_then_success_keeps_every_attempt(runner: JobRunner) -> None:
    """Failing twice with a retryable error then succeeding: attempt 3, three ledger rows."""
    counter = Counter()
    execution = runner.run(_flaky(2, counter, max_attempts=5), None)
    assert execution.status is ExecutionStatus.SUCCEEDED and execution.attempt == 3
    assert execution.error_type is None and execution.result == 3
    ledger = runner.attempts(execution.id)
    assert [(a.number, a.status) for a in ledger] == [
        (1, ExecutionStatus.FAILED), (2, ExecutionStatus.FAILED), (3, ExecutionStatus.SUCCEEDED)]
    assert [a.error_message for a in ledger] == ["failure 1", "failure 2", None]
    assert all(a.error_type == "ConnectionError" for a in ledger[:2])
    assert ledger[0].wait_s is not None and ledger[0].wait_s > 0 and ledger[2].wait_s is None
    assert all(a.worker == runner.worker_id and a.finished_at >= a.started_at for a in ledger)


async def test_async_retries_match_sync(arunner: AsyncJobRunner) -> None:
    """The async runner retries the same way and records the same ledger."""
    counter = Counter()

    class Flaky(PhasedJob):
        retry = RetryPolicy(max_attempts=3, **FAST)

        async def execute(self, loaded: Any) -> int:
            if counter.bump() < 3:
                raise TimeoutError("slow upstream")
            return 1

    execution = await arunner.run(Flaky)
    assert execution.succeeded and execution.attempt == 3
    assert [a.status for a in await arunner.attempts(execution.id)] == [
        ExecutionStatus.FAILED, ExecutionStatus.FAILED, ExecutionStatus.SUCCEEDED]


def test_exhausted_attempts_fail_with_every_attempt_recorded(runner: JobRunner) -> None:
    """max_attempts exhausted ends failed with one ledger row per attempt."""
    counter = Counter()
    execution = runner.run(_flaky(10, counter, max_attempts=3))
    assert execution.status is ExecutionStatus.FAILED and execution.attempt == 3
    assert execution.error_message == "failure 3" and execution.finished_at is not None
    assert counter.value == 3
    assert [a.error_message for a in runner.attempts(execution.id)] == [
        "failure 1", "failure 2", "failure 3"]


def test_give_up_on_and_non_transient_errors_stop_at_once(runner: JobRunner) -> None:
    """give_up_on wins over retry_on; errors outside retry_on are not retried."""
    counter = Counter()
    job = _flaky(10, counter, exc=PermissionError, max_attempts=5, retry_on=(OSError,),
                 give_up_on=(PermissionError,))
    assert runner.run(job).attempt == 1 and counter.value == 1
    counter2 = Counter()
    default = _flaky(10, counter2, exc=ValueError, max_attempts=5)  # ValueError: not transient
    assert runner.run(default).attempt == 1 and counter2.value == 1


def test_should_retry_decides_last(runner: JobRunner) -> None:
    """should_retry(exc) can veto a retry by looking at the exception."""
    counter = Counter()
    job = _flaky(10, counter, max_attempts=5,
                 should_retry=lambda exc: "failure 1" in str(exc))
    execution = runner.run(job)
    assert execution.attempt == 2 and counter.value == 2


def test_failed_record_is_retried_from_the_checkpoint(runner: JobRunner) -> None:
    """A retried record resumes from the checkpoint: execute's side effect happens once."""
    executed, recorded = Counter(), Counter()

    class RecordFlaky(PhasedJob):
        retry = RetryPolicy(max_attempts=3, **FAST)

        def execute(self, loaded: Any) -> str:
            executed.bump()
            return "sent"

        def record(self, session: sa.orm.Session, result: str) -> None:
            if recorded.bump() == 1:
                raise ConnectionError("lost the database mid-record")

    execution = runner.run(RecordFlaky)
    assert execution.succeeded and execution.attempt == 2
    assert executed.value == 1 and recorded.value == 2
    assert [(a.resumed_from, a.phase) for a in runner.attempts(execution.id)] == [
        ("load", "record"), ("record", "record")]


def test_long_waits_leave_the_execution_retrying_for_run_due(backend: Backend) -> None:
    """A wait over inline_retry_max_wait ends the run `retrying`; run_due runs it when due."""
    scheduled: list[Any] = []
    runner = JobRunner(backend.url, registry=Registry(), inline_retry_max_wait=0,
                       on_retry_scheduled=scheduled.append)
    counter = Counter()
    job = runner.registry.register(_flaky(1, counter, max_attempts=2, wait_initial=0.2,
                                          wait_max=0.2, jitter=0.0))
    try:
        first = runner.run(job)
        assert first.status is ExecutionStatus.RETRYING and first.next_retry_at is not None
        assert first.finished_at is None and [e.id for e in scheduled] == [first.id]
        assert runner.run_due() == []  # not due yet
        deadline = time.monotonic() + 10
        done: list[Any] = []
        while not done and time.monotonic() < deadline:
            done = runner.run_due()
        [second] = done
        assert second.id == first.id and second.succeeded and second.attempt == 2
        assert counter.value == 2
    finally:
        runner.close()


def test_concurrent_run_due_never_runs_one_execution_twice(postgres: Backend) -> None:
    """Two workers calling run_due at once on PostgreSQL (SKIP LOCKED) split the work."""
    registry = Registry()
    runs: dict[str, int] = {}
    lock = threading.Lock()

    class Counted(PhasedJob):
        name = "counted"

        def execute(self, loaded: Any) -> None:
            with lock:
                runs[self.execution_id] = runs.get(self.execution_id, 0) + 1
            time.sleep(0.002)

    registry.register(Counted)
    runners = [JobRunner(postgres.url, registry=registry) for _ in range(2)]
    ids = {str(runners[0].submit(Counted)) for _ in range(60)}
    barrier = threading.Barrier(2)
    done: list[list[Any]] = [[], []]

    def work(i: int) -> None:
        barrier.wait()
        while batch := runners[i].run_due(limit=5):
            done[i].extend(batch)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in runners:
        r.close()
    assert set(runs) == ids and set(runs.values()) == {1}
    assert len(done[0]) + len(done[1]) == 60 and done[0] and done[1]


def test_explicit_retry_of_a_terminal_execution(runner: JobRunner) -> None:
    """retry() puts a failed execution back to pending with a fresh budget and its trigger."""
    counter = Counter()
    job = _flaky(1, counter)  # no retry policy: fails once
    failed = runner.run(job)
    assert failed.status is ExecutionStatus.FAILED
    requeued = runner.retry(failed.id, triggered_by="ops:alice")
    assert requeued.status is ExecutionStatus.PENDING and requeued.triggered_by == "ops:alice"
    assert requeued.max_attempts == 2
    finished = runner.run_execution(failed.id)
    assert finished.succeeded and finished.attempt == 2
    ledger = runner.attempts(failed.id)
    assert [a.triggered_by for a in ledger] == ["inline", "ops:alice"]
    with pytest.raises(InvalidTransition, match="succeeded"):
        runner.retry(failed.id)
    with pytest.raises(InvalidTransition, match="succeeded"):
        runner.cancel(failed.id)


def test_bad_retry_policies_fail_at_class_definition() -> None:
    """Zero or negative attempts and unknown exception paths fail when the class is defined."""
    with pytest.raises(ConfigurationError, match="max_attempts must be at least 1"):

        class Zero(PhasedJob):
            retry = RetryPolicy(max_attempts=0)

            def execute(self, loaded: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="at least 1"):
        RetryPolicy(max_attempts=-2)
    with pytest.raises(ConfigurationError, match=r"cannot import exception 'nowhere\.Missing'"):
        RetryPolicy(max_attempts=2, retry_on=("nowhere.Missing",))
    with pytest.raises(ConfigurationError, match="not an exception class"):
        RetryPolicy(max_attempts=2, retry_on=("json.dumps",))
    import json

    assert RetryPolicy(max_attempts=2, retry_on=("json.JSONDecodeError",)).retry_on == (
        json.JSONDecodeError,)


def test_an_explicit_retry_gets_a_fresh_budget_of_attempts(runner: JobRunner) -> None:
    """After retry() an exhausted execution may use its policy's attempts again, inline."""
    counter = Counter()
    job = runner.registry.register(_flaky(10, counter, max_attempts=2))
    failed = runner.run(job)
    assert failed.status is ExecutionStatus.FAILED and failed.attempt == 2
    runner.retry(failed.id)
    again = runner.run_execution(failed.id)
    assert again.status is ExecutionStatus.FAILED and again.attempt == 4
    assert counter.value == 4
    assert [a.number for a in runner.attempts(failed.id)] == [1, 2, 3, 4]
