"""Timeouts and cancellation: timed_out at the deadline, cancelled at the next boundary."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from jobrunner import (
    AsyncJobRunner,
    ExecutionStatus,
    JobRunner,
    JobTimedOut,
    PhasedJob,
    Registry,
    RetryPolicy,
)
from jobrunner._attempt import utcnow

from .conftest import Backend
from .support import Counter


async def test_async_execute_timeout_ends_timed_out_at_the_deadline(
        arunner: AsyncJobRunner) -> None:
    """An async execute past `timeout` is cancelled: timed_out in about the timeout."""

    interrupted: list[bool] = []

    class Slow(PhasedJob):
        timeout = 0.3

        async def execute(self, loaded: Any) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                interrupted.append(True)  # the deadline cancelled it; nothing waited 30 s
                raise

    execution = await arunner.run(Slow)
    assert interrupted == [True]
    assert execution.status is ExecutionStatus.TIMED_OUT and execution.phase == "execute"
    assert execution.error_type == "jobrunner.JobTimedOut"
    assert "0.3s timeout" in (execution.error_message or "")
    [attempt] = await arunner.attempts(execution.id)
    assert attempt.status is ExecutionStatus.TIMED_OUT


def test_sync_execute_past_its_timeout_is_waited_for_and_its_result_kept(
        runner: JobRunner, caplog: pytest.LogCaptureFixture) -> None:
    """JobRunner waits for a thread past its timeout (never abandons it): timed_out, with
    the late result checkpointed so no retry runs execute again."""

    class Stuck(PhasedJob):
        timeout = 0.2

        def execute(self, loaded: Any) -> str:
            while not self.cancelled():  # the deadline asks cooperative code to stop
                time.sleep(0.01)
            return "too late"

    caplog.set_level(logging.WARNING, logger="jobrunner")
    execution = runner.run(Stuck)
    assert execution.status is ExecutionStatus.TIMED_OUT and execution.phase == "execute"
    assert execution.checkpointed and execution.result == "too late"
    assert "passed its 0.2s timeout" in caplog.text and "slot stays busy" in caplog.text


async def test_sync_execute_timeout_under_the_async_runner(arunner: AsyncJobRunner) -> None:
    """Under AsyncJobRunner too: the thread is waited for; it ends timed_out."""

    class Stuck(PhasedJob):
        timeout = 0.2

        def execute(self, loaded: Any) -> None:
            while not self.cancelled():
                time.sleep(0.01)
            raise RuntimeError("stopped as asked")

    execution = await arunner.run(Stuck)
    assert execution.status is ExecutionStatus.TIMED_OUT and not execution.checkpointed
    assert execution.error_type == "jobrunner.JobTimedOut"


def test_timed_out_is_retried_when_the_policy_says_so(runner: JobRunner) -> None:
    """retry_on=(JobTimedOut,) retries a timed-out attempt that left no result."""
    counter = Counter()

    class SlowOnce(PhasedJob):
        timeout = 0.2
        retry = RetryPolicy(max_attempts=2, wait_initial=0.01, jitter=0, retry_on=(JobTimedOut,))

        def execute(self, loaded: Any) -> int:
            if counter.bump() == 1:
                while not self.cancelled():
                    time.sleep(0.01)
                raise RuntimeError("gave up when asked")
            return counter.value

    execution = runner.run(SlowOnce)
    assert execution.succeeded and execution.attempt == 2 and execution.result == 2
    assert [a.status for a in runner.attempts(execution.id)] == [
        ExecutionStatus.TIMED_OUT, ExecutionStatus.SUCCEEDED]


async def test_load_and_record_timeouts(arunner: AsyncJobRunner) -> None:
    """load_timeout cancels a slow async load; record_timeout a slow async record."""

    class SlowLoad(PhasedJob):
        load_timeout = 0.2

        async def load(self, session: AsyncSession, args: Any) -> None:
            await asyncio.sleep(30)

        async def execute(self, loaded: Any) -> None:
            raise AssertionError("not reached")

    class SlowRecord(PhasedJob):
        record_timeout = 0.2

        async def execute(self, loaded: Any) -> int:
            return 1

        async def record(self, session: AsyncSession, result: int) -> None:
            await asyncio.sleep(30)

    load = await arunner.run(SlowLoad)
    assert load.status is ExecutionStatus.TIMED_OUT and load.phase == "load"
    record = await arunner.run(SlowRecord)
    assert record.status is ExecutionStatus.TIMED_OUT and record.phase == "record"
    assert record.checkpointed and record.result == 1


def test_a_sync_load_past_its_timeout_is_rolled_back(runner: JobRunner) -> None:
    """A sync load cannot be interrupted; past its timeout it is rolled back as timed_out."""

    class SlowSyncLoad(PhasedJob):
        load_timeout = 0.05

        def load(self, session: sa.orm.Session, args: Any) -> None:
            time.sleep(0.1)

        def execute(self, loaded: Any) -> None:
            raise AssertionError("not reached")

    execution = runner.run(SlowSyncLoad)
    assert execution.status is ExecutionStatus.TIMED_OUT and execution.phase == "load"


def test_cancel_pending_and_retrying_executions(backend: Backend) -> None:
    """Pending and retrying executions are cancelled at once and never run by run_due."""
    runner = JobRunner(backend.url, registry=Registry(), inline_retry_max_wait=0)

    class Fails(PhasedJob):
        name = "fails_once"
        retry = RetryPolicy(max_attempts=3, wait_initial=0.01, jitter=0)

        def execute(self, loaded: Any) -> None:
            raise ConnectionError("down")

    runner.registry.register(Fails)
    try:
        pending = runner.submit(Fails)
        cancelled = runner.cancel(pending)
        assert cancelled.status is ExecutionStatus.CANCELLED and cancelled.finished_at
        retrying = runner.run(Fails)
        assert retrying.status is ExecutionStatus.RETRYING
        assert runner.cancel(retrying.id).status is ExecutionStatus.CANCELLED
        due_at = retrying.next_retry_at
        assert due_at is not None
        while utcnow() <= due_at:  # the retry's time comes: it must still not run
            time.sleep(0.005)
        assert runner.run_due() == []
        assert {e.status for e in runner.list()} == {ExecutionStatus.CANCELLED}
    finally:
        runner.close()


async def test_cancel_a_running_async_execution_at_its_next_await(
        arunner: AsyncJobRunner) -> None:
    """cancel() stops a running async execute at its next await; status cancelled."""
    started = asyncio.Event()

    class Waits(PhasedJob):
        async def execute(self, loaded: Any) -> None:
            started.set()
            await asyncio.sleep(30)

    run = asyncio.create_task(arunner.run(Waits))
    await asyncio.wait_for(started.wait(), 10)
    [running] = await arunner.list(status="running")
    assert (await arunner.cancel(running.id)).cancel_requested
    execution = await asyncio.wait_for(run, 10)
    assert execution.status is ExecutionStatus.CANCELLED and execution.phase == "execute"
    assert execution.error_type == "jobrunner.ExecutionCancelled"
    assert [a.status for a in await arunner.attempts(execution.id)] == [
        ExecutionStatus.CANCELLED]


def test_cancel_a_running_sync_execution_at_the_phase_boundary(runner: JobRunner) -> None:
    """A sync execute sees self.cancelled() and the run ends cancelled before record."""
    started = threading.Event()
    recorded = Counter()

    class Loops(PhasedJob):
        def execute(self, loaded: Any) -> str:
            started.set()
            deadline = time.monotonic() + 10
            while not self.cancelled() and time.monotonic() < deadline:
                time.sleep(0.01)
            return "stopped early"

        def record(self, session: sa.orm.Session, result: str) -> None:
            recorded.bump()

    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(runner.run(Loops)))
    thread.start()
    assert started.wait(10)
    [running] = runner.list(status="running")
    runner.cancel(running.id)
    thread.join(10)
    [execution] = result
    assert execution.status is ExecutionStatus.CANCELLED and recorded.value == 0


async def test_cancel_from_another_runner_arrives_with_the_heartbeat(backend: Backend) -> None:
    """Another process's cancel() reaches the worker through its next heartbeat."""
    worker = AsyncJobRunner(backend.url, registry=Registry(), heartbeat_interval=0.05)
    operator = AsyncJobRunner(backend.url, registry=Registry())
    started = asyncio.Event()

    class Waits(PhasedJob):
        async def execute(self, loaded: Any) -> None:
            started.set()
            await asyncio.sleep(30)

    try:
        run = asyncio.create_task(worker.run(Waits))
        await asyncio.wait_for(started.wait(), 10)
        [running] = await operator.list(status="running")
        await operator.cancel(running.id)
        execution = await asyncio.wait_for(run, 10)
        assert execution.status is ExecutionStatus.CANCELLED
    finally:
        await worker.aclose()
        await operator.aclose()


async def test_an_attempt_whose_lease_was_taken_over_stops_without_writing(
        backend: Backend) -> None:
    """If another worker took the lease, the stale attempt never overwrites its outcome."""
    worker = AsyncJobRunner(backend.url, registry=Registry(), heartbeat_interval=0.05)
    started = asyncio.Event()

    class Waits(PhasedJob):
        async def execute(self, loaded: Any) -> str:
            started.set()
            await asyncio.sleep(30)
            return "stale result"

    try:
        run = asyncio.create_task(worker.run(Waits))
        await asyncio.wait_for(started.wait(), 10)
        [running] = await worker.list(status="running")
        async with worker.engine.begin() as conn:  # what a reaper or another claim does
            await conn.execute(sa.text(
                "update jobrunner_executions set lease_token = lease_token + 1, "
                "worker = 'someone-else' where status = 'running'"))
        execution = await asyncio.wait_for(run, 10)
        assert execution.status is ExecutionStatus.RUNNING
        assert execution.worker == "someone-else" and execution.result is None
        assert await worker.attempts(running.id) == []
    finally:
        await worker.aclose()
