"""Lifecycle v2: each defect of the first wave, as a test on both backends (issue 13)."""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from jobrunner import (
    AsyncJobRunner,
    ExecutionStatus,
    JobRunner,
    PhasedJob,
    Registry,
    RetryPolicy,
)
from jobrunner import _queries as q
from jobrunner._lifecycle import TRANSITIONS, Event, markdown_table, sources
from jobrunner._schema import executions

from .conftest import Backend
from .support import Counter

RUNNING = ExecutionStatus.RUNNING
CANCELLED = ExecutionStatus.CANCELLED


def _claim_as(runner: JobRunner, eid: Any, worker: str, lease_s: float = 30.0) -> dict[str, Any]:
    """Claim ``eid`` the way a worker elsewhere would (then that worker may die)."""
    with runner.engine.begin() as conn:
        row = q.claim_one(conn, eid, worker=worker, lease_s=lease_s)
    assert row is not None
    return row


def _expire_leases(runner: JobRunner) -> None:
    """Move every running lease into the past: the database clock passed them."""
    with runner.engine.begin() as conn:
        conn.execute(
            sa.update(executions)
            .where(executions.c.status == "running")
            .values(lease_expires_at=sa.func.coalesce(executions.c.created_at, None))
        )


@pytest.fixture
def operator(backend: Backend) -> Iterator[JobRunner]:
    """A second runner on the same database: the operator's CLI, another process."""
    runner = JobRunner(backend.url, registry=Registry())
    yield runner
    runner.close()


# -- 1. cancel requested, then the attempt fails transiently or is reaped -------------------


def test_cancel_then_transient_failure_ends_cancelled(
    runner: JobRunner, operator: JobRunner
) -> None:
    """A cancel requested during an attempt that then fails retryably ends cancelled."""

    class FailsAfterCancel(PhasedJob):
        retry = RetryPolicy(max_attempts=5, wait_initial=0, jitter=0)

        def execute(self, loaded: Any) -> None:
            operator.cancel(self.execution_id)  # another process cancels meanwhile
            raise ConnectionError("the network blinked")

    execution = runner.run(FailsAfterCancel)
    assert execution.status is CANCELLED and execution.attempt == 1
    assert runner.run_due() == []  # nothing is left for a worker, nothing stuck


async def test_cancel_then_transient_failure_ends_cancelled_async(
    arunner: AsyncJobRunner, backend: Backend
) -> None:
    """The async twin: the database turns the retry into cancelled."""
    operator = AsyncJobRunner(backend.url, registry=Registry())

    class FailsAfterCancel(PhasedJob):
        retry = RetryPolicy(max_attempts=5, wait_initial=0, jitter=0)

        async def execute(self, loaded: Any) -> None:
            await operator.cancel(self.execution_id)
            raise ConnectionError("the network blinked")

    try:
        execution = await arunner.run(FailsAfterCancel)
    finally:
        await operator.aclose()
    assert execution.status is CANCELLED and execution.attempt == 1


def test_cancel_then_reap_ends_cancelled(runner: JobRunner) -> None:
    """A cancel requested for an execution whose worker then died: reap cancels it."""

    class Job(PhasedJob):
        name = "lifecycle.reap_cancel"
        retry = RetryPolicy(max_attempts=3)

        def execute(self, loaded: Any) -> None:
            raise AssertionError("never runs")

    runner.registry.register(Job)
    eid = runner.submit(Job)
    _claim_as(runner, eid, "dead-worker")
    assert runner.cancel(eid).cancel_requested
    _expire_leases(runner)
    [reaped] = runner.reap()
    assert reaped.status is CANCELLED
    assert [a.status for a in runner.attempts(eid)] == [ExecutionStatus.ABANDONED]


# -- 2. claim as you run ------------------------------------------------------------------


def test_run_due_claims_each_execution_just_before_it_runs(runner: JobRunner) -> None:
    """While the first of three runs, the other two are still pending, not claimed."""
    seen: list[list[str]] = []

    class Peeks(PhasedJob):
        name = "lifecycle.peeks"

        def execute(self, loaded: Any) -> None:
            seen.append(sorted(e.status.value for e in runner.list()))

    runner.registry.register(Peeks)
    for _ in range(3):
        runner.submit(Peeks)
    assert len(runner.run_due(concurrency=1)) == 3
    assert seen[0] == ["pending", "pending", "running"]


def test_a_dead_worker_costs_only_the_attempt_it_started(runner: JobRunner) -> None:
    """max_attempts=1: a worker dying in the first execution fails that one, not the rest."""

    class Dies(PhasedJob):
        name = "lifecycle.dies"

        def execute(self, loaded: Any) -> None:
            raise KeyboardInterrupt  # the process is going down

    runner.registry.register(Dies)
    ids = [runner.submit(Dies) for _ in range(3)]
    with pytest.raises(KeyboardInterrupt):
        runner.run_due(concurrency=1)
    statuses = sorted(runner.get(i).status.value for i in ids)
    # The interrupted one goes back to retrying, not counted; the others never started.
    assert statuses == ["pending", "pending", "retrying"]
    _expire_leases(runner)
    assert runner.reap() == []  # nobody was left running with a lease


async def test_async_run_due_runs_its_batch_concurrently(arunner: AsyncJobRunner) -> None:
    """AsyncJobRunner.run_due runs due executions side by side, up to its concurrency."""
    inside, peak = Counter(), Counter()
    gate = asyncio.Event()

    class Waits(PhasedJob):
        name = "lifecycle.waits"

        async def execute(self, loaded: Any) -> None:
            peak.value = max(peak.value, inside.bump())
            if peak.value == 4:
                gate.set()
            await asyncio.wait_for(gate.wait(), 30)
            inside.bump(-1)

    arunner.registry.register(Waits)
    for _ in range(4):
        await arunner.submit(Waits)
    done = await arunner.run_due(concurrency=4)
    assert len(done) == 4 and all(e.succeeded for e in done) and peak.value == 4


def test_waiting_executions_do_not_count_against_max_concurrency(runner: JobRunner) -> None:
    """max_concurrency=1: a batch run never holds a second execution running meanwhile."""
    running_counts: list[int] = []

    class One(PhasedJob):
        name = "lifecycle.one_at_a_time"
        max_concurrency = 1

        def execute(self, loaded: Any) -> None:
            running_counts.append(len(runner.list(status="running")))

    runner.registry.register(One)
    for _ in range(3):
        runner.submit(One)
    assert len(runner.run_due(concurrency=3)) == 3
    assert running_counts == [1, 1, 1]


# -- 3. a finished execute is checkpointed before a cancel is honoured -----------------------


def test_cancel_during_execute_keeps_its_result_and_retry_resumes_at_record(
    runner: JobRunner, operator: JobRunner
) -> None:
    """execute ran once: cancelled with its checkpoint, and retry() only runs record."""
    executed, recorded = Counter(), Counter()

    class SideEffect(PhasedJob):
        name = "lifecycle.side_effect"

        def execute(self, loaded: Any) -> str:
            executed.bump()
            operator.cancel(self.execution_id)  # arrives while execute finishes
            return "charged the card"

        def record(self, session: Any, result: str) -> None:
            recorded.bump()

    runner.registry.register(SideEffect)
    execution = runner.run(SideEffect)
    assert execution.status is CANCELLED
    assert execution.checkpointed and execution.result == "charged the card"
    runner.retry(execution.id)
    [again] = runner.run_due()
    assert again.succeeded and executed.value == 1 and recorded.value == 1
    assert [a.resumed_from for a in runner.attempts(execution.id)] == ["load", "record"]


async def test_cancel_never_stops_waiting_for_a_sync_execute_thread(
    arunner: AsyncJobRunner,
) -> None:
    """AsyncJobRunner: a cancelled sync execute is waited for; the row ends after it."""
    started, release = threading.Event(), threading.Event()
    returned: list[dt.datetime] = []

    class Blocking(PhasedJob):
        def execute(self, loaded: Any) -> str:
            started.set()
            release.wait(30)
            returned.append(dt.datetime.now(dt.UTC))
            return "done anyway"

    run = asyncio.create_task(arunner.run(Blocking))
    await asyncio.to_thread(started.wait, 30)
    [running] = await arunner.list(status="running")
    await arunner.cancel(running.id)
    await asyncio.sleep(0)  # let the run see the signal
    assert not run.done()  # still waiting for the thread
    release.set()
    execution = await asyncio.wait_for(run, 30)
    assert execution.status is CANCELLED and execution.result == "done anyway"
    # The row says cancelled only from after the code returned, never while it ran.
    assert execution.finished_at is not None and execution.finished_at >= returned[0]


# -- 4. leases on the row, by the database's clock ------------------------------------------


def test_a_healthy_worker_is_never_reaped_by_a_runner_with_other_settings(
    backend: Backend,
) -> None:
    """A 10 s-heartbeat worker's lease (30 s) is its own: 5 s into its execution, a reaper
    configured with a 1 s heartbeat (0.1 reaped after 3 s of silence) leaves it alone."""
    worker = JobRunner(backend.url, registry=Registry(), heartbeat_interval=10)
    reaper = JobRunner(backend.url, registry=Registry(), heartbeat_interval=1)
    verdicts: list[list[Any]] = []
    leases: list[Any] = []

    class Long(PhasedJob):
        def execute(self, loaded: Any) -> None:
            # Five seconds pass with no heartbeat: the stored times move 5 s back.
            row = worker.get(self.execution_id)
            assert row.heartbeat_at is not None and row.started_at is not None
            earlier = dt.timedelta(seconds=5)
            with worker.engine.begin() as conn:
                conn.execute(sa.update(executions).values(
                    heartbeat_at=row.heartbeat_at - earlier, started_at=row.started_at - earlier))
            leases.append(worker.get(self.execution_id).lease_expires_at)
            verdicts.append(reaper.reap())

    try:
        execution = worker.run(Long)
    finally:
        worker.close()
        reaper.close()
    assert verdicts == [[]] and execution.succeeded
    assert leases[0] is not None and leases[0] > execution.started_at + dt.timedelta(seconds=20)


def test_a_lease_shorter_than_two_heartbeats_is_refused(backend: Backend) -> None:
    """lease_duration below two heartbeat intervals is a configuration error."""
    from jobrunner import ConfigurationError

    with pytest.raises(ConfigurationError, match="two heartbeat intervals"):
        JobRunner(backend.url, heartbeat_interval=10, lease_duration=15)


# -- 5. cancelling an inline async run during a sync load ------------------------------------


async def test_cancelling_run_during_a_sync_load_leaves_no_running_row(
    arunner: AsyncJobRunner,
) -> None:
    """The caller cancels run() while a sync load runs: no IntegrityError, not running."""
    in_load, release = threading.Event(), threading.Event()

    class SlowLoad(PhasedJob):
        def load(self, session: Any, args: Any) -> Any:
            session.execute(sa.text("select 1"))
            in_load.set()
            release.wait(30)
            return args

        def execute(self, loaded: Any) -> None:
            raise AssertionError("the caller went away before execute")

    run = asyncio.create_task(arunner.run(SlowLoad))
    await asyncio.to_thread(in_load.wait, 30)
    run.cancel()
    await asyncio.sleep(0)  # the cancel reaches the run while the load's thread runs
    assert not run.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await run
    [execution] = await arunner.list()
    assert execution.status is ExecutionStatus.RETRYING  # for a worker; attempt not counted
    assert execution.max_attempts == 2 and execution.attempt == 1
    [attempt] = await arunner.attempts(execution.id)
    assert attempt.status is ExecutionStatus.ABANDONED


# -- 6. no deadlock between run() and a worker on a limited job ----------------------------


def test_inline_runs_and_a_worker_on_a_limited_job_never_deadlock(postgres: Backend) -> None:
    """PostgreSQL: run() of a max_concurrency job racing a worker's batch claims (key lock
    then row, against rows then tried keys): no deadlock, every one runs."""
    backend = postgres
    registry = Registry()

    class Limited(PhasedJob):
        name = "lifecycle.limited"
        max_concurrency = 2

        def execute(self, loaded: Any) -> None:
            time.sleep(0.001)

    registry.register(Limited)
    runners = [JobRunner(backend.url, registry=registry) for _ in range(3)]
    errors: list[BaseException] = []

    def inline(r: JobRunner) -> None:
        try:
            for _ in range(15):
                r.run(Limited)
        except BaseException as exc:
            errors.append(exc)

    def worker(r: JobRunner) -> None:
        try:
            for _ in range(15):
                r.run_due(concurrency=2)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=inline, args=(runners[0],)),
               threading.Thread(target=inline, args=(runners[1],)),
               threading.Thread(target=worker, args=(runners[2],))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == [], "".join(
            "".join(traceback.format_exception(e)) for e in errors)
        runners[2].run_due(limit=1000)  # what the race left pending, at its limit
        statuses = {e.status for e in runners[2].list(limit=1000)}
        assert statuses == {ExecutionStatus.SUCCEEDED}
    finally:
        for r in runners:
            r.close()


# -- 7. a retry's backoff is honoured by every claim ------------------------------------------


def test_run_execution_does_not_start_a_retry_before_its_backoff(runner: JobRunner) -> None:
    """A retrying execution due in 600 s is left alone by run_execution and run_due."""

    class Flaky(PhasedJob):
        name = "lifecycle.flaky"
        retry = RetryPolicy(max_attempts=4, wait_initial=600, jitter=0)

        def execute(self, loaded: Any) -> None:
            raise ConnectionError("down")

    runner.registry.register(Flaky)
    execution = runner.run(Flaky)
    assert execution.status is ExecutionStatus.RETRYING and execution.attempt == 1
    again = runner.run_execution(execution.id)  # e.g. a redelivered Celery message
    assert again.status is ExecutionStatus.RETRYING and again.attempt == 1
    assert runner.run_due() == [] and len(runner.attempts(execution.id)) == 1


# -- 8. sync timeouts: the thread is waited for, never copied ------------------------------


def test_a_sync_execute_past_its_timeout_is_waited_for_and_never_copied(
    runner: JobRunner,
) -> None:
    """Timed out and retried: execute ran once (no copy beside it); its late result kept."""
    entered, inside, peak = Counter(), Counter(), Counter()

    class Overruns(PhasedJob):
        timeout = 0.2
        retry = RetryPolicy(max_attempts=3, wait_initial=0, jitter=0)  # retries timeouts

        def execute(self, loaded: Any) -> str:
            entered.bump()
            peak.value = max(peak.value, inside.bump())
            while not self.cancelled():  # the deadline asks it to stop
                time.sleep(0.01)
            inside.bump(-1)
            return "late but done"

    execution = runner.run(Overruns)
    assert entered.value == 1 and peak.value == 1
    # The result was checkpointed, so the retry resumed at record instead of running again.
    assert execution.succeeded and execution.result == "late but done"
    attempts = runner.attempts(execution.id)
    assert [(a.status, a.resumed_from) for a in attempts] == [
        (ExecutionStatus.TIMED_OUT, "load"), (ExecutionStatus.SUCCEEDED, "record")]


async def test_async_sync_timeout_waits_and_keeps_the_loop_executor_free(
    arunner: AsyncJobRunner,
) -> None:
    """Stuck sync executes live in the runner's own pool: the loop's executor stays free."""
    release, overdue = threading.Event(), Counter()

    class Stuck(PhasedJob):
        timeout = 0.1

        def execute(self, loaded: Any) -> str:
            while not self.cancelled():  # set when the deadline passes
                time.sleep(0.01)
            overdue.bump()
            release.wait(30)
            return "eventually"

    runs = [asyncio.create_task(arunner.run(Stuck)) for _ in range(8)]
    while overdue.value < 8:
        await asyncio.sleep(0.01)
    assert arunner._pool.busy() == 8
    loop = asyncio.get_running_loop()
    # Every thread of the loop's default executor is free for other code meanwhile.
    assert await loop.run_in_executor(None, lambda: "free") == "free"
    assert all(not r.done() for r in runs)  # still waiting for their threads
    release.set()
    done = await asyncio.gather(*runs)
    assert {e.status for e in done} == {ExecutionStatus.TIMED_OUT}
    assert all(e.checkpointed and e.result == "eventually" for e in done)


_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_context_variables_reach_sync_phases(arunner: AsyncJobRunner) -> None:
    """A sync execute in the runner's pool sees the caller's context variables."""

    class Reads(PhasedJob):
        timeout = 5

        def execute(self, loaded: Any) -> str:
            return _request_id.get()

    _request_id.set("req-42")
    assert (await arunner.run(Reads)).result == "req-42"


def test_context_variables_reach_a_timed_sync_execute(runner: JobRunner) -> None:
    """JobRunner: an execute with a timeout runs in a pool thread with the caller's context."""

    class Reads(PhasedJob):
        timeout = 5

        def execute(self, loaded: Any) -> str:
            return _request_id.get()

    token = _request_id.set("req-7")
    try:
        assert runner.run(Reads).result == "req-7"
    finally:
        _request_id.reset(token)


# -- 9. the phase column tells the truth ------------------------------------------------------


def test_the_phase_column_says_execute_while_execute_runs(
    runner: JobRunner, operator: JobRunner
) -> None:
    """With and without a load phase, a running execute is recorded as in execute."""
    seen: list[str | None] = []

    class WithLoad(PhasedJob):
        name = "lifecycle.with_load"

        def load(self, session: Any, args: Any) -> Any:
            return args

        def execute(self, loaded: Any) -> None:
            seen.append(operator.get(self.execution_id).phase)

    class WithoutLoad(PhasedJob):
        name = "lifecycle.without_load"

        def execute(self, loaded: Any) -> None:
            seen.append(operator.get(self.execution_id).phase)

    for job in (WithLoad, WithoutLoad):
        runner.registry.register(job)
        runner.run(job)  # inline
        runner.submit(job)
    runner.run_due()  # claimed by a worker
    assert seen == ["execute"] * 4


def test_a_worker_that_died_in_execute_is_recorded_there(runner: JobRunner) -> None:
    """Reaped during execute: the ledger and the message say execute, not load."""
    died: list[str] = []

    class DiesInExecute(PhasedJob):
        name = "lifecycle.dies_in_execute"

        def execute(self, loaded: Any) -> None:
            died.append(self.execution_id)
            _expire_leases(runner)
            runner.reap()  # another process reaps us: as if we had died here

    runner.registry.register(DiesInExecute)
    execution = runner.run(DiesInExecute)
    [attempt] = runner.attempts(execution.id)
    assert attempt.status is ExecutionStatus.ABANDONED and attempt.phase == "execute"
    assert "lost its lease in execute" in (attempt.error_message or "")


# -- 10. SQLite: reads never hold the write lock ------------------------------------------------


def test_sqlite_a_slow_read_only_load_never_blocks_submit_or_list(tmp_path: Any) -> None:
    """While a read-only load takes its time, another process submits and lists at once."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    worker = JobRunner(url, registry=Registry())
    worker.create_schema()
    # The other process waits at most 0.2 s for a lock: a held write lock would fail it.
    other = JobRunner(url, registry=Registry(), busy_timeout=0.2)
    outcomes: list[Any] = []

    class ReadsSlowly(PhasedJob):
        name = "lifecycle.reads_slowly"

        def load(self, session: Any, args: Any) -> Any:
            session.execute(sa.text("select count(*) from jobrunner_executions"))
            outcomes.append(other.submit(ReadsSlowly))
            outcomes.append(len(other.list()))
            time.sleep(0.5)
            return args

        def execute(self, loaded: Any) -> None:
            return None

    other.registry.register(ReadsSlowly)
    try:
        assert worker.run(ReadsSlowly).succeeded
    finally:
        worker.close()
        other.close()
    assert len(outcomes) == 2 and outcomes[1] == 1


# -- 11. load's own writes commit only while the lease is held -------------------------------


def test_a_stale_owner_s_load_writes_never_commit(backend: Backend) -> None:
    """The lease moved on during load: load's writes roll back and the attempt stops."""
    from .support import make_notes_table, note_texts, notes

    make_notes_table(backend.url)
    runner = JobRunner(backend.url, registry=Registry())

    class WritesInLoad(PhasedJob):
        name = "lifecycle.writes_in_load"

        def load(self, session: Any, args: Any) -> Any:
            with runner.engine.begin() as conn:  # meanwhile: reaped and claimed elsewhere
                conn.execute(sa.update(executions).values(lease_token=executions.c.lease_token + 1))
            session.execute(sa.insert(notes).values(text="written by a stale owner"))
            return args

        def execute(self, loaded: Any) -> None:
            raise AssertionError("a stale owner never reaches execute")

    runner.registry.register(WritesInLoad)
    try:
        eid = runner.submit(WritesInLoad)
        execution = runner.run_execution(eid)
    finally:
        runner.close()
    assert execution.status is RUNNING  # the new owner's, untouched
    assert note_texts(backend.url) == []


# -- the transition table ---------------------------------------------------------------------


def test_every_status_can_reach_an_end_and_ends_move_only_by_retry() -> None:
    """Walk the table: no status is a dead end, and finished ones move only by retry()."""
    statuses = {s for t in TRANSITIONS for s in (*t.sources, t.target)}
    ends = {ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED, ExecutionStatus.TIMED_OUT,
            CANCELLED}
    for status in statuses - ends:
        reachable, frontier = set(), {status}
        while frontier:
            current = frontier.pop()
            for t in TRANSITIONS:
                if current in t.sources and t.target not in reachable:
                    reachable.add(t.target)
                    frontier.add(t.target)
        assert reachable & ends, f"{status} can never end"
    for t in TRANSITIONS:
        if set(t.sources) & ends:
            assert t.event is Event.RETRIED_BY_HAND, t
    assert sources(Event.CLAIM) == ("pending", "retrying")


def test_attempt_made_writes_start_from_running_only() -> None:
    """Every fenced (attempt-made) transition of the table starts from running alone."""
    for t in TRANSITIONS:
        if t.fenced and t.event is not Event.RUN_INLINE:
            assert t.sources == (RUNNING,), t
    assert "| `pending`, `retrying` | claim | `running` |" in markdown_table()


def test_the_statuses_page_shows_the_transition_table_as_the_code_has_it() -> None:
    """docs/concepts/statuses.md carries markdown_table() verbatim: docs and code agree."""
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "concepts" / "statuses.md"
    assert markdown_table() in page.read_text()


async def test_a_caller_cancelling_twice_still_gets_the_late_result_checkpointed(
    arunner: AsyncJobRunner,
) -> None:
    """Cancel run() twice while its sync execute runs: the thread's result is kept."""
    started, release = threading.Event(), threading.Event()

    class Slow(PhasedJob):
        def execute(self, loaded: Any) -> str:
            started.set()
            release.wait(30)
            return "finished in the end"

    run = asyncio.create_task(arunner.run(Slow))
    await asyncio.to_thread(started.wait, 30)
    run.cancel()
    await asyncio.sleep(0)  # delivered: the run holds it back, waiting for its thread
    run.cancel()
    await asyncio.sleep(0)
    assert not run.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await run
    [execution] = await arunner.list()
    assert execution.status is ExecutionStatus.RETRYING  # interrupted, not counted
    assert execution.checkpointed and execution.result == "finished in the end"


def test_sqlite_lock_timeout_says_what_it_is(tmp_path: Any) -> None:
    """A write that waited out the busy timeout says the database was locked, and why."""
    from jobrunner import DatabaseUnavailable

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    holder = JobRunner(url, registry=Registry())
    holder.create_schema()
    impatient = JobRunner(url, registry=Registry(), busy_timeout=0.1)

    class Any_(PhasedJob):
        name = "lifecycle.any"

        def execute(self, loaded: Any) -> None: ...

    impatient.registry.register(Any_)
    try:
        with holder.engine.begin() as conn:  # a long write transaction elsewhere
            conn.execute(sa.text("update jobrunner_executions set attempt = attempt"))
            with pytest.raises(DatabaseUnavailable, match="is locked by another writer"):
                impatient.submit(Any_)
    finally:
        holder.close()
        impatient.close()


def test_an_in_process_cancel_during_execute_keeps_its_result(runner: JobRunner) -> None:
    """The runner's own cancel() (a signal, not a heartbeat) still lets the result in."""
    executed = Counter()

    class SideEffect(PhasedJob):
        name = "lifecycle.side_effect_in_process"

        def execute(self, loaded: Any) -> str:
            executed.bump()
            runner.cancel(self.execution_id)  # signals the attempt at once, in this process
            return "charged the card"

    runner.registry.register(SideEffect)
    execution = runner.run(SideEffect)
    assert execution.status is CANCELLED
    assert execution.checkpointed and execution.result == "charged the card"
    runner.retry(execution.id)
    assert runner.run_due()[0].succeeded and executed.value == 1
