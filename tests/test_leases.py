"""Leases, reaping, idempotency and concurrency limits on both backends; the checker."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from jobrunner import AsyncJobRunner, ExecutionStatus, JobRunner, PhasedJob, Registry, RetryPolicy
from jobrunner.testing import InvariantChecker

from .conftest import Backend


def _stale(runner: JobRunner) -> None:
    """Make every running execution's lease one that expired an hour ago."""
    from datetime import timedelta

    from jobrunner._attempt import utcnow
    from jobrunner._schema import executions

    with runner.engine.begin() as conn:
        conn.execute(sa.update(executions).where(executions.c.status == "running").values(
            lease_expires_at=utcnow() - timedelta(hours=1)))


class Retryable(PhasedJob, register=False):
    name = "leases.retryable"
    retry = RetryPolicy(max_attempts=2)

    def execute(self, loaded: Any) -> str:
        return f"attempt {self.attempt}"


class Once(PhasedJob, register=False):
    name = "leases.once"

    def execute(self, loaded: Any) -> None:
        return None


def test_reap_retries_or_fails_per_policy(runner: JobRunner) -> None:
    """A dead worker's executions: retried while attempts remain, else failed; ledger kept."""
    runner.registry.register(Retryable)
    runner.registry.register(Once)
    retryable, once = runner.submit(Retryable), runner.submit(Once)
    for eid in (retryable, once):  # claimed by a worker that then dies
        with runner.engine.begin() as conn:
            from jobrunner import _queries as q

            assert q.claim_one(conn, eid, worker="dead-worker", lease_s=3600)
    assert runner.reap() == []  # its leases have not expired: nothing to reap
    _stale(runner)
    reaped = {e.id: e for e in runner.reap()}
    assert reaped[retryable].status is ExecutionStatus.RETRYING
    assert reaped[once].status is ExecutionStatus.FAILED
    assert reaped[once].error_type == "jobrunner.WorkerLost"
    assert "dead-worker lost its lease in load" in (reaped[once].error_message or "")
    assert runner.reap() == []
    [rerun] = runner.run_due()
    assert rerun.id == retryable and rerun.succeeded and rerun.result == "attempt 2"
    assert [a.status for a in runner.attempts(retryable)] == [
        ExecutionStatus.ABANDONED, ExecutionStatus.SUCCEEDED]
    assert [a.status for a in runner.attempts(once)] == [ExecutionStatus.ABANDONED]


async def test_async_reap_matches_sync(arunner: AsyncJobRunner, backend: Backend) -> None:
    """The async runner's reap() recovers the same way."""
    arunner.registry.register(Retryable)
    eid = await arunner.submit(Retryable)
    sync = JobRunner(backend.url, registry=Registry())
    try:
        with sync.engine.begin() as conn:
            from jobrunner import _queries as q

            q.claim_one(conn, eid, worker="gone", lease_s=60)
        _stale(sync)
    finally:
        sync.close()
    [reaped] = await arunner.reap()
    assert reaped.id == eid and reaped.status is ExecutionStatus.RETRYING
    [done] = await arunner.run_due()
    assert done.succeeded and done.attempt == 2


def test_concurrent_submits_with_one_key_create_one_execution(runner: JobRunner) -> None:
    """16 threads submitting one idempotency key at once get one id; run() reuses it."""
    runner.registry.register(Once)
    ids: list[Any] = []
    barrier = threading.Barrier(16)

    def submit() -> None:
        barrier.wait()
        ids.append(runner.submit(Once, idempotency_key="order-42"))

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(runner.list()) == 1
    first = runner.run(Once, idempotency_key="order-42")
    assert first.id == ids[0] and first.succeeded
    assert runner.run(Once, idempotency_key="order-42") == first  # finished: returned as is


def test_max_concurrency_per_key_leaves_the_rest_pending(runner: JobRunner) -> None:
    """At the limit, run() leaves the execution pending; run_due() starts it once a slot frees."""
    started, release = threading.Event(), threading.Event()

    class PerCustomer(PhasedJob):
        name = "leases.per_customer"
        max_concurrency = 1

        class Args(BaseModel):
            customer: str

        @classmethod
        def concurrency_key(cls, args: Any) -> str:
            return args.customer

        def execute(self, args: Args) -> str:
            if args.customer == "acme" and not started.is_set():
                started.set()
                release.wait(10)
            return args.customer

    runner.registry.register(PerCustomer)
    first: list[Any] = []
    thread = threading.Thread(
        target=lambda: first.append(runner.run(PerCustomer, {"customer": "acme"})))
    thread.start()
    assert started.wait(10)
    waiting = runner.run(PerCustomer, {"customer": "acme"})
    other = runner.run(PerCustomer, {"customer": "globex"})  # another key: not limited
    assert waiting.status is ExecutionStatus.PENDING and waiting.concurrency_key == (
        "leases.per_customer:acme")
    assert other.succeeded
    assert runner.run_due() == []  # acme's slot is still taken
    release.set()
    thread.join(10)
    assert first[0].succeeded
    [later] = runner.run_due()
    assert later.id == waiting.id and later.succeeded


def test_bad_max_concurrency_fails_at_class_definition() -> None:
    """max_concurrency must be a positive int."""
    import pytest

    from jobrunner import JobDefinitionError

    with pytest.raises(JobDefinitionError, match="max_concurrency"):

        class Bad(PhasedJob):
            max_concurrency = 0

            def execute(self, loaded: Any) -> None: ...


def test_the_invariant_checker_catches_what_it_promises(runner: JobRunner,
                                                        backend: Backend) -> None:
    """The checker reports a running row without a lease and a terminal status rewritten."""
    runner.registry.register(Once)
    checker = InvariantChecker(backend.url, reap_grace=60)
    try:
        done = runner.run(Once)
        stuck = runner.submit(Once)
        with runner.engine.begin() as conn:
            from jobrunner import _queries as q

            q.claim_one(conn, stuck, worker="w", lease_s=30)
        assert checker.check() == []
        _stale(runner)
        with runner.engine.begin() as conn:
            conn.execute(sa.text("update jobrunner_executions set status = 'failed' "
                                 "where status = 'succeeded'"))
        problems = checker.check()
        assert any(f"{stuck} is running on a lease that expired" in p for p in problems)
        assert any(f"{done.id} changed from terminal succeeded to failed" in p for p in problems)
    finally:
        checker.close()


async def test_async_idempotent_run(arunner: AsyncJobRunner) -> None:
    """Concurrent async runs with one key run the job once."""
    arunner.registry.register(Once)
    results = await asyncio.gather(*(arunner.run(Once, idempotency_key="k") for _ in range(5)))
    assert len({r.id for r in results}) == 1
    assert [a.number for a in await arunner.attempts(results[0].id)] == [1]


def test_a_reaper_beside_run_due_never_takes_a_live_execution(backend: Backend) -> None:
    """run_due claims each execution just before it runs and heartbeats the running one:
    a reaper reaping all the while takes nothing back and nothing runs twice."""
    registry = Registry()
    # Lease 0.9 s (three heartbeats of 0.3 s): short enough for the slow execution to
    # outlive it almost three times, long enough for a heartbeat to be late on a busy machine.
    runner = JobRunner(backend.url, registry=registry, heartbeat_interval=0.3)
    reaper = JobRunner(backend.url, registry=Registry())
    first_running, first_done = threading.Event(), threading.Event()
    runs: dict[str, int] = {}

    class Batch(PhasedJob):
        name = "leases.batch"

        class Args(BaseModel):
            slow: bool

        def execute(self, args: Args) -> None:
            runs[self.execution_id] = runs.get(self.execution_id, 0) + 1
            if args.slow:
                first_running.set()
                import time

                time.sleep(2.5)  # nearly three leases: only heartbeats keep it
                first_done.set()

    registry.register(Batch)
    runner.submit(Batch, {"slow": True})
    waiting = {runner.submit(Batch, {"slow": False}) for _ in range(2)}
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.extend(runner.run_due(limit=3)))
    thread.start()
    try:
        assert first_running.wait(10)
        reaped = []
        # A reaper every 50 ms (a hot loop would hog SQLite's single write lock and starve
        # the heartbeat: real reapers run every few seconds).
        while not first_done.wait(0.05):
            reaped += reaper.reap()
        assert reaped == []
    finally:
        thread.join(10)
        runner.close()
        reaper.close()
    assert {e.id for e in done} >= waiting and all(e.succeeded for e in done)
    assert set(runs.values()) == {1} and len(runs) == 3


def test_commit_inside_a_phase_is_refused(runner: JobRunner) -> None:
    """session.commit() in a phase fails clearly; the phase commits with the status."""

    class Commits(PhasedJob):
        name = "leases.commits"

        def load(self, session: sa.orm.Session, args: Any) -> None:
            session.commit()

        def execute(self, loaded: Any) -> None: ...

    execution = runner.run(Commits)
    assert execution.status is ExecutionStatus.FAILED and execution.phase == "load"
    assert "session.commit() was called inside the load phase of job 'leases.commits'" in (
        execution.error_message or "")
    assert "session.flush()" in (execution.error_message or "")


async def test_async_commit_inside_a_phase_is_refused(arunner: AsyncJobRunner) -> None:
    """The async session of a phase refuses commit() the same way."""

    class Commits(PhasedJob):
        async def execute(self, loaded: Any) -> int:
            return 1

        async def record(self, session: Any, result: int) -> None:
            await session.commit()

    execution = await arunner.run(Commits)
    assert execution.status is ExecutionStatus.FAILED and execution.phase == "record"
    assert "inside the record phase" in (execution.error_message or "")


def test_one_async_runner_on_two_event_loops_gets_a_clear_error(postgres: Backend) -> None:
    """Reusing an AsyncJobRunner from a second event loop says what is wrong and what to do."""
    import pytest

    from jobrunner import ConfigurationError

    runner = AsyncJobRunner(postgres.url, registry=Registry())
    assert asyncio.run(runner.run(Once)).succeeded
    with pytest.raises(ConfigurationError, match="one AsyncJobRunner per event loop"):
        asyncio.run(runner.run(Once))
