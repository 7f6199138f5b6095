"""The worker: real processes on real PostgreSQL draining, dying, stopping, waking."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from jobrunner import AsyncJobRunner, ExecutionStatus, JobRunner, PhasedJob, Registry
from jobrunner.testing import InvariantChecker

from . import worker_jobs
from ._services import stop_process, wait_for
from .conftest import Backend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(postgres: Backend) -> Iterator[JobRunner]:
    """A runner on the emptied PostgreSQL test database, with the worker_events table."""
    runner = JobRunner(postgres.url)
    with runner.engine.begin() as conn:
        worker_jobs.worker_metadata.drop_all(conn)
        worker_jobs.worker_metadata.create_all(conn)
    yield runner
    runner.close()


class Worker:
    """`jobrunner worker` in its own process, importing the test jobs; its output goes
    to a file (a pipe nobody reads would fill up with its log lines and stall it)."""

    def __init__(self, url: str, log: Path, *options: str) -> None:
        command = [sys.executable, "-m", "jobrunner", "--database-url", url,
                   "--app", "tests.worker_jobs", "worker", *options]
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        return stop_process(self.process, timeout=60)


def _count(runner: JobRunner, sql: str) -> int:
    with runner.engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


def _submit_many(runner: JobRunner, n: int, seconds: float = 0.0) -> set[Any]:
    return {runner.submit(worker_jobs.Counted, {"seconds": seconds}) for _ in range(n)}


def test_two_workers_drain_2000_executions_and_survive_a_kill_9(
    store: JobRunner, postgres: Backend, tmp_path: Path
) -> None:
    """2 workers x 4 slots, 2,000 executions, one worker kill -9'ed: all succeed, once each."""
    runner = store
    ids = _submit_many(runner, 2000, seconds=0.002)
    # Lease 1.5 s: the dead worker's executions come back soon, and a live one's heartbeat
    # may be late on a busy machine without losing its lease.
    fast = ("--concurrency", "4", "--heartbeat-interval", "0.5", "--poll-interval", "0.2")
    doomed = Worker(postgres.url, tmp_path / "doomed.log", *fast)
    survivor = Worker(postgres.url, tmp_path / "survivor.log", *fast)
    try:
        wait_for(lambda: _count(runner, "select count(*) from worker_events "
                                          "where event = 'recorded'") > 300,
                  "both workers to be well under way")
        # Kill it while it holds executions (it almost always does: its slots refill as
        # they free), so that usually there is something to reap.
        holding = ("select count(*) from jobrunner_executions where status = 'running' "
                   f"and worker like '%:{doomed.process.pid}:%'")
        wait_for(lambda: _count(runner, holding) > 0, "the doomed worker to hold executions")
        doomed.process.kill()  # SIGKILL: no goodbye, its running executions keep their leases
        doomed.process.wait(30)
        wait_for(lambda: _count(runner, "select count(*) from jobrunner_executions "
                                          "where status <> 'succeeded'") == 0,
                  "the survivor to finish everything, reaped ones included")
    finally:
        code = survivor.stop()
    assert code == 0, survivor.output()[-3000:]
    assert {e.id for e in runner.list(status="succeeded", limit=5000)} == ids
    # Exactly one record per execution: nothing was recorded twice, nothing lost.
    assert _count(runner, "select count(*) from worker_events where event = 'recorded'") == 2000
    assert _count(runner, "select count(distinct execution_id) from worker_events "
                          "where event = 'recorded'") == 2000
    # Execute ran again only where the killed worker was in the middle of it (<= 4 slots).
    again = _count(runner, "select count(*) from (select execution_id from worker_events "
                           "where event = 'executed' group by execution_id "
                           "having count(*) > 1) twice")
    abandoned = _count(runner, "select count(*) from jobrunner_attempts "
                               "where status = 'abandoned'")
    assert again <= abandoned <= 4
    assert len(_pids(runner)) == 2  # both workers really worked
    if abandoned:  # it reaped what the dead one held (it may, rarely, have held nothing)
        assert "lost its lease" in survivor.output()
    InvariantChecker(postgres.url).assert_ok()


def _pids(runner: JobRunner) -> set[int]:
    with runner.engine.connect() as conn:
        return set(conn.execute(sa.text(
            "select distinct pid from worker_events where event = 'recorded'")).scalars())


def test_sigterm_finishes_what_runs_claims_nothing_new_and_exits_0(
    store: JobRunner, postgres: Backend, tmp_path: Path
) -> None:
    """SIGTERM mid-run: running executions finish, the rest stay pending, exit code 0."""
    runner = store
    ids = _submit_many(runner, 6, seconds=1.0)
    worker = Worker(postgres.url, tmp_path / "worker.log", "--concurrency", "2",
                    "--grace-period", "30")
    wait_for(lambda: _count(runner, "select count(*) from worker_events "
                                      "where event = 'executed'") == 2, "two to start")
    assert worker.stop() == 0, worker.output()
    assert "SIGTERM received" in worker.output()
    statuses = sorted(runner.get(i).status.value for i in ids)
    assert statuses == ["pending"] * 4 + ["succeeded"] * 2
    assert runner.list(status="running") == []


def test_a_submit_wakes_an_idle_worker_long_before_its_poll(postgres: Backend) -> None:
    """poll_interval=600: only the commit's NOTIFY can wake the worker, and it does."""

    class Quick(PhasedJob):
        name = "workers.quick"

        def execute(self, loaded: Any) -> str:
            return "done"

    registry = Registry()
    registry.register(Quick)

    async def scenario() -> None:
        worker = AsyncJobRunner(postgres.url, registry=registry)
        submitter = JobRunner(postgres.url, registry=registry)  # another process, in effect
        claims: list[int] = []
        claim_batch = worker._claim_batch

        async def counted(limit: int, queues: Any) -> Any:
            states = await claim_batch(limit, queues)
            claims.append(len(states))
            return states

        worker._claim_batch = counted  # type: ignore[method-assign]
        working = asyncio.create_task(worker.work(poll_interval=600))
        try:
            while not claims:  # the first poll found nothing: now it sleeps 600 s
                await asyncio.sleep(0.01)
            eid = await asyncio.to_thread(submitter.submit, Quick)
            while (await worker.get(eid)).status is not ExecutionStatus.SUCCEEDED:
                await asyncio.sleep(0.01)
            assert claims[:2] == [0, 1]  # woken once, by the NOTIFY, and it claimed it
        finally:
            worker.stop_work()
            await working
            submitter.close()
            await worker.aclose()

    asyncio.run(scenario())


def test_a_sync_worker_wakes_on_notify_too(postgres: Backend) -> None:
    """JobRunner.work listens on its own connection in a thread: a submit wakes it."""

    class Quick(PhasedJob):
        name = "workers.sync_quick"

        def execute(self, loaded: Any) -> str:
            return "done"

    registry = Registry()
    registry.register(Quick)
    worker = JobRunner(postgres.url, registry=registry)
    submitter = JobRunner(postgres.url, registry=registry)
    claims: list[int] = []
    claim_batch = worker._claim_batch

    def counted(limit: int, queues: Any) -> Any:
        states = claim_batch(limit, queues)
        claims.append(len(states))
        return states

    worker._claim_batch = counted  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: worker.work(poll_interval=600))
    thread.start()
    try:
        wait_for(lambda: claims, "the first poll")
        eid = submitter.submit(Quick)
        wait_for(lambda: worker.get(eid).succeeded, "the woken worker to run it")
        assert claims[:2] == [0, 1]
    finally:
        worker.stop_work()
        thread.join(30)
        submitter.close()
        worker.close()


def test_queues_and_priorities(runner: JobRunner) -> None:
    """A worker takes only its queues, highest priority first, then oldest due."""
    order: list[str] = []

    class Tagged(PhasedJob):
        name = "workers.tagged"

        def execute(self, loaded: dict[str, str]) -> None:
            order.append(loaded["tag"])

    runner.registry.register(Tagged)
    runner.submit(Tagged, {"tag": "low"}, priority=0)
    runner.submit(Tagged, {"tag": "other-queue"}, queue="reports", priority=9)
    runner.submit(Tagged, {"tag": "high"}, priority=5)
    runner.submit(Tagged, {"tag": "low-later"}, priority=0)
    runner.work(concurrency=1, queues=["default"], until_idle=True)
    assert order == ["high", "low", "low-later"]
    [waiting] = runner.list(status="pending")
    assert waiting.queue == "reports" and waiting.priority == 9
    runner.work(queues=["reports"], until_idle=True)
    assert order[-1] == "other-queue"


def test_the_worker_reaps_and_reruns_a_dead_worker_s_execution(runner: JobRunner) -> None:
    """An execution left running by a dead worker is reaped by a working one and rerun."""
    from jobrunner import RetryPolicy
    from jobrunner import _queries as q
    from jobrunner._attempt import utcnow

    class Survives(PhasedJob):
        name = "workers.survives"
        retry = RetryPolicy(max_attempts=2)

        def execute(self, loaded: Any) -> int:
            return self.attempt

    runner.registry.register(Survives)
    eid = runner.submit(Survives)
    with runner.engine.begin() as conn:
        assert q.claim_one(conn, eid, worker="dead", lease_s=0.05)
    wait_for(lambda: (runner.get(eid).lease_expires_at or utcnow()) < utcnow(),
              "the dead worker's lease to expire", timeout=30)
    runner.work(until_idle=True)  # its first act is to reap
    execution = runner.get(eid)
    assert execution.succeeded and execution.result == 2


def test_work_refuses_bad_settings(runner: JobRunner) -> None:
    """Bad worker settings raise a ConfigurationError naming the setting."""
    from jobrunner import ConfigurationError

    with pytest.raises(ConfigurationError, match="concurrency must be at least 1"):
        runner.work(concurrency=0)
    with pytest.raises(ConfigurationError, match="poll_interval"):
        runner.work(poll_interval=0)


def test_stop_work_from_another_thread_returns_promptly(backend: Backend) -> None:
    """stop_work() ends an idle work() loop (no SIGTERM needed, e.g. in an app's shutdown)."""
    runner = JobRunner(backend.url, registry=Registry())
    thread = threading.Thread(target=lambda: runner.work(poll_interval=600))
    thread.start()
    try:
        wait_for(lambda: runner._worker is not None, "the loop to start")
        runner.stop_work()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        runner.close()


if os.name != "posix":  # pragma: no cover
    pytest.skip("signals and kill -9 are POSIX", allow_module_level=True)


async def test_a_hard_stop_interrupts_async_work_at_once(backend: Backend) -> None:
    """stop_work(now=True) (a second SIGTERM) cancels async executions without grace."""
    started = asyncio.Event()

    class Sleeps(PhasedJob):
        name = "workers.sleeps"

        async def execute(self, loaded: Any) -> None:
            started.set()
            await asyncio.sleep(60)

    registry = Registry()
    registry.register(Sleeps)
    runner = AsyncJobRunner(backend.url, registry=registry)
    try:
        eid = await runner.submit(Sleeps)
        working = asyncio.create_task(runner.work(grace_period=600))
        await asyncio.wait_for(started.wait(), 30)
        runner.stop_work()  # graceful: it would wait up to 600 s
        runner.stop_work(now=True)  # the second signal: stop now
        await asyncio.wait_for(working, 30)
        execution = await runner.get(eid)
        assert execution.status is ExecutionStatus.RETRYING and execution.max_attempts == 2
    finally:
        await runner.aclose()


async def test_after_the_grace_period_a_stuck_thread_is_left_to_the_reaper(
    backend: Backend,
) -> None:
    """A sync execute that ignores every request to stop: work() still returns; the row
    keeps its lease (nothing half-written) for the reaper once this process is gone."""
    started, release = threading.Event(), threading.Event()

    class Stubborn(PhasedJob):
        name = "workers.stubborn"

        def execute(self, loaded: Any) -> None:
            started.set()
            release.wait(60)

    registry = Registry()
    registry.register(Stubborn)
    runner = AsyncJobRunner(backend.url, registry=registry)
    try:
        eid = await runner.submit(Stubborn)
        working = asyncio.create_task(runner.work(grace_period=0.2))
        await asyncio.to_thread(started.wait, 30)
        runner.stop_work()
        await asyncio.wait_for(working, 30)
        execution = await runner.get(eid)
        assert execution.status is ExecutionStatus.RUNNING
        assert execution.lease_expires_at is not None
    finally:
        release.set()
        await runner.aclose()


def test_a_database_outage_backs_off_and_is_logged_once_a_minute() -> None:
    """The pacing of failed claims, on a fake clock: no I/O, no waiting."""
    from jobrunner._worker import MAX_OUTAGE_WAIT, OUTAGE_LOG_EVERY, Pacer, WorkOptions

    now = [1000.0]
    pacer = Pacer(WorkOptions(poll_interval=0.5), clock=lambda: now[0])
    assert pacer.recovered() is None  # no outage yet
    logged, waits = [], []
    for _ in range(12):
        log, wait, _lasted = pacer.failed()
        logged.append(log)
        waits.append(wait)
        now[0] += wait
    assert logged[0] and not any(logged[1:])  # under a minute: said once
    assert waits[0] < 0.6 and waits[1] > waits[0] and waits[2] > waits[1]  # backing off
    assert max(waits) <= MAX_OUTAGE_WAIT * 1.1  # jitter at most 10 %
    now[0] += OUTAGE_LOG_EVERY
    log, _, lasted_so_far = pacer.failed()
    assert log  # a minute later it says so again, with how long it has lasted
    assert lasted_so_far == pytest.approx(sum(waits) + OUTAGE_LOG_EVERY)
    lasted = pacer.recovered()
    assert lasted is not None and lasted == pytest.approx(sum(waits) + OUTAGE_LOG_EVERY)
    assert pacer.recovered() is None
    assert pacer.failed()[1] < 0.6  # a new outage starts from poll_interval again
