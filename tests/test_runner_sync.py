"""JobRunner: three phases, three sessions, on SQLite and PostgreSQL, no event loop."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from jobrunner import (
    ConfigurationError,
    ExecutionFailed,
    ExecutionNotFound,
    ExecutionStatus,
    InvalidArgs,
    JobNotFound,
    JobRunner,
    PhasedJob,
)

from .conftest import Backend
from .support import Counter, make_notes_table, note_texts, notes


def test_phases_run_in_order_and_the_execution_is_recorded(runner: JobRunner) -> None:
    """load → execute → record run once each; the row holds result, timings, one attempt."""
    calls: list[str] = []

    class Report(PhasedJob):
        class Args(BaseModel):
            n: int

        def load(self, session: sa.orm.Session, args: Args) -> int:
            calls.append("load")
            assert session.execute(sa.text("select 1")).scalar() == 1
            return args.n

        def execute(self, n: int) -> dict[str, int]:
            calls.append("execute")
            return {"double": n * 2}

        def record(self, session: sa.orm.Session, result: dict[str, int]) -> None:
            calls.append("record")
            assert result == {"double": 42}

    execution = runner.run(Report, {"n": 21})
    assert calls == ["load", "execute", "record"]
    assert execution.status is ExecutionStatus.SUCCEEDED
    assert execution.result == {"double": 42}
    assert execution.checkpointed and execution.attempt == 1
    assert execution.args == {"n": 21} and execution.triggered_by == "inline"
    assert all(ms is not None and ms >= 0 for ms in
               (execution.load_ms, execution.execute_ms, execution.record_ms))
    assert execution.finished_at is not None and execution.duration_ms is not None
    assert runner.get(execution.id) == execution
    [attempt] = runner.attempts(execution.id)
    assert attempt.status is ExecutionStatus.SUCCEEDED and attempt.number == 1


def test_no_connection_is_checked_out_during_execute(runner: JobRunner) -> None:
    """The load session is closed before execute: the pool has zero connections out."""
    seen: list[int] = []

    class Probe(PhasedJob):
        def load(self, session: sa.orm.Session, args: Any) -> None:
            session.execute(sa.text("select 1"))

        def execute(self, loaded: None) -> None:
            seen.append(runner.engine.pool.checkedout())

        def record(self, session: sa.orm.Session, result: None) -> None:
            session.execute(sa.text("select 1"))

    assert runner.run(Probe).succeeded
    assert seen == [0]


def test_load_writes_and_running_status_commit_together(runner: JobRunner,
                                                        backend: Backend) -> None:
    """A load that writes then fails leaves neither its row nor a running status."""
    make_notes_table(backend.url)

    class WriteThenFail(PhasedJob):
        def load(self, session: sa.orm.Session, args: Any) -> None:
            session.execute(sa.insert(notes).values(text="from load"))
            raise RuntimeError("load broke after writing")

        def execute(self, loaded: None) -> None:
            raise AssertionError("execute must not run")

    execution = runner.run(WriteThenFail)
    assert execution.status is ExecutionStatus.FAILED
    assert execution.phase == "load"
    assert execution.error_type == "RuntimeError"
    assert execution.error_message == "load broke after writing"
    assert "load broke after writing" in (execution.error_traceback or "")
    assert note_texts(backend.url) == []
    assert [a.status for a in runner.attempts(execution.id)] == [ExecutionStatus.FAILED]


def test_record_writes_commit_with_succeeded(runner: JobRunner, backend: Backend) -> None:
    """record's own writes land in the same commit as the succeeded status."""
    make_notes_table(backend.url)

    class Writes(PhasedJob):
        def execute(self, loaded: Any) -> str:
            return "done"

        def record(self, session: sa.orm.Session, result: str) -> None:
            session.execute(sa.insert(notes).values(text=result))

    assert runner.run(Writes).succeeded
    assert note_texts(backend.url) == ["done"]


def test_failed_record_rolls_back_and_retry_resumes_at_record(runner: JobRunner,
                                                             backend: Backend) -> None:
    """When record fails, running the execution again runs record only; execute ran once."""
    make_notes_table(backend.url)
    executed, recorded = Counter(), Counter()

    class Flaky(PhasedJob):
        def execute(self, loaded: Any) -> dict[str, str]:
            executed.bump()
            return {"text": "side effect"}

        def record(self, session: sa.orm.Session, result: dict[str, str]) -> None:
            session.execute(sa.insert(notes).values(text=result["text"]))
            if recorded.bump() == 1:
                raise ConnectionError("database went away mid-record")

    first = runner.run(Flaky)
    assert first.status is ExecutionStatus.FAILED and first.phase == "record"
    assert first.checkpointed and first.result == {"text": "side effect"}
    assert note_texts(backend.url) == []

    runner.retry(first.id)
    second = runner.run_execution(first.id)
    assert second.status is ExecutionStatus.SUCCEEDED and second.attempt == 2
    assert executed.value == 1 and recorded.value == 2
    assert note_texts(backend.url) == ["side effect"]
    ledger = runner.attempts(first.id)
    assert [(a.number, a.resumed_from, a.status) for a in ledger] == [
        (1, "load", ExecutionStatus.FAILED), (2, "record", ExecutionStatus.SUCCEEDED)]


def test_load_session_used_in_execute_raises_a_clear_error(runner: JobRunner) -> None:
    """Keeping the load session for execute fails, naming the job and the phase."""

    class Leaky(PhasedJob):
        name = "reports.leaky"

        def load(self, session: sa.orm.Session, args: Any) -> sa.orm.Session:
            return session

        def execute(self, session: sa.orm.Session) -> None:
            session.execute(sa.text("select 1"))

    execution = runner.run(Leaky)
    assert execution.status is ExecutionStatus.FAILED and execution.phase == "execute"
    assert execution.error_type == "jobrunner.PhaseSessionClosed"
    assert "load session of job 'reports.leaky'" in (execution.error_message or "")
    assert "self.session()" in (execution.error_message or "")
    with pytest.raises(ExecutionFailed, match="PhaseSessionClosed"):
        execution.raise_for_status()


def test_self_session_commits_on_exit_and_rolls_back_on_error(runner: JobRunner,
                                                             backend: Backend) -> None:
    """self.session() in execute is a short transaction of its own."""
    make_notes_table(backend.url)

    class UsesOwnSession(PhasedJob):
        def execute(self, loaded: Any) -> int:
            with self.session() as session:
                session.execute(sa.insert(notes).values(text="kept"))
            with pytest.raises(ValueError), self.session() as session:
                session.execute(sa.insert(notes).values(text="rolled back"))
                raise ValueError("abort this one")
            return runner.engine.pool.checkedout()

    execution = runner.run(UsesOwnSession)
    assert execution.succeeded and execution.result == 0
    assert note_texts(backend.url) == ["kept"]


def test_concurrent_executions_never_hit_database_is_locked(runner: JobRunner,
                                                           backend: Backend) -> None:
    """16 threads running jobs that write at once all succeed (SQLite WAL + IMMEDIATE)."""
    make_notes_table(backend.url)

    class Writer(PhasedJob):
        def load(self, session: sa.orm.Session, args: Any) -> int:
            return int(session.execute(sa.select(sa.func.count()).select_from(notes)).scalar())

        def execute(self, count: int) -> int:
            with self.session() as session:
                session.execute(sa.insert(notes).values(text=f"seen {count}"))
            return count

        def record(self, session: sa.orm.Session, result: int) -> None:
            session.execute(sa.insert(notes).values(text="recorded"))

    results: list[ExecutionStatus] = []
    barrier = threading.Barrier(16)

    def work() -> None:
        barrier.wait()
        for _ in range(3):
            results.append(runner.run(Writer).status)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [ExecutionStatus.SUCCEEDED] * 48
    assert len(note_texts(backend.url)) == 96


def test_sync_runner_never_creates_an_event_loop(runner: JobRunner,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync job on JobRunner runs in the caller's thread and no event loop is built."""
    created: list[object] = []
    original = asyncio.BaseEventLoop.__init__

    def counting_init(self: asyncio.BaseEventLoop) -> None:
        created.append(self)
        original(self)

    monkeypatch.setattr(asyncio.BaseEventLoop, "__init__", counting_init)
    threads: list[threading.Thread] = []

    class Plain(PhasedJob):
        def load(self, session: sa.orm.Session, args: Any) -> None:
            threads.append(threading.current_thread())

        def execute(self, loaded: None) -> None:
            threads.append(threading.current_thread())
            with self.session() as session:
                session.execute(sa.text("select 1"))

        def record(self, session: sa.orm.Session, result: None) -> None:
            threads.append(threading.current_thread())

    assert runner.run(Plain).succeeded
    assert created == []
    assert threads == [threading.current_thread()] * 3


def test_async_jobs_are_refused_by_the_sync_runner(runner: JobRunner) -> None:
    """JobRunner says to use AsyncJobRunner instead of starting a loop of its own."""

    class Async(PhasedJob):
        async def execute(self, loaded: Any) -> None:
            return None

    with pytest.raises(ConfigurationError, match="AsyncJobRunner"):
        runner.run(Async)
    assert runner.list() == []


def test_invalid_args_at_submit_write_nothing(runner: JobRunner) -> None:
    """Args failing the model raise InvalidArgs naming the field; no row is written."""

    class Typed(PhasedJob):
        name = "typed"

        class Args(BaseModel):
            report_id: int

        def execute(self, args: Args) -> None:
            return None

    with pytest.raises(InvalidArgs, match="report_id"):
        runner.submit(Typed, {"report_id": "not a number"})
    with pytest.raises(InvalidArgs, match="report_id"):
        runner.run(Typed, {})
    assert runner.list() == []


def test_args_are_validated_again_at_run(runner: JobRunner, backend: Backend) -> None:
    """A stored row whose args no longer validate fails in load with InvalidArgs."""

    class Typed(PhasedJob):
        class Args(BaseModel):
            n: int

        def execute(self, args: Args) -> int:
            return args.n

    eid = runner.submit(Typed, {"n": 1})
    with runner.engine.begin() as conn:
        conn.execute(sa.text("update jobrunner_executions set args = :a where id = :i"),
                     {"a": '{"n": "x"}', "i": eid.hex if backend.name == "sqlite" else eid})
    execution = runner.run_execution(eid)
    assert execution.status is ExecutionStatus.FAILED and execution.phase == "load"
    assert execution.error_type == "jobrunner.InvalidArgs"


def test_unserialisable_result_fails_with_a_clear_message(runner: JobRunner) -> None:
    """execute returning an object JSON cannot hold fails the execution, saying so."""

    class ReturnsObject(PhasedJob):
        def execute(self, loaded: Any) -> object:
            return object()

    execution = runner.run(ReturnsObject)
    assert execution.status is ExecutionStatus.FAILED and execution.phase == "execute"
    assert "not JSON-serialisable" in (execution.error_message or "")
    assert not execution.checkpointed


def test_unknown_job_suggests_the_nearest_name(runner: JobRunner) -> None:
    """A typo in a job name fails at submit and suggests the registered name."""

    class SendReport(PhasedJob):
        name = "reports.send"

        def execute(self, loaded: Any) -> None:
            return None

    runner.registry.register(SendReport)
    with pytest.raises(JobNotFound, match=r"did you mean 'reports\.send'"):
        runner.submit("reprots.send")
    with pytest.raises(JobNotFound, match=r"cannot import module"):
        runner.submit("no_such_module.anywhere:Job")
    with pytest.raises(JobNotFound, match="has no 'Greeet'"):
        runner.submit("tests.jobs:Greeet")
    assert runner.list() == []


def test_handler_paths_resolve_lazily(runner: JobRunner) -> None:
    """A job named only by its handler path is imported and run."""
    execution = runner.run("tests.jobs:Greet", {"who": "world"})
    assert execution.succeeded and execution.result == "hello world"
    assert execution.job == "tests.greet" and execution.handler == "tests.jobs:Greet"


def test_submit_then_run_execution_and_run_due(runner: JobRunner) -> None:
    """submit stores pending; run_execution runs it; run_due picks up the rest."""
    from .jobs import Greet

    runner.registry.register(Greet)
    first = runner.submit(Greet, {"who": "a"})
    second = runner.submit(Greet, {"who": "b"}, triggered_by="cron")
    assert runner.get(first).status is ExecutionStatus.PENDING
    assert runner.run_execution(first).result == "hello a"
    assert runner.run_execution(first).attempt == 1  # finished: returned, not re-run
    [due] = runner.run_due()
    assert due.id == second and due.succeeded and due.triggered_by == "cron"
    assert runner.run_due() == []


def test_get_list_and_filters(runner: JobRunner) -> None:
    """list filters by status, job and since; get of an unknown id is a clear error."""
    from datetime import timedelta

    from .jobs import Greet

    class Fails(PhasedJob):
        name = "fails"

        def execute(self, loaded: Any) -> None:
            raise ValueError("x")

    ok = runner.run(Greet, {"who": "x"})
    bad = runner.run(Fails)
    assert [e.id for e in runner.list()] == [bad.id, ok.id]
    assert [e.id for e in runner.list(status="failed")] == [bad.id]
    assert [e.id for e in runner.list(job="tests.greet")] == [ok.id]
    assert len(runner.list(since=timedelta(minutes=5))) == 2
    assert runner.list(limit=1)[0].id == bad.id
    with pytest.raises(ExecutionNotFound):
        runner.get(uuid.uuid4())
    with pytest.raises(ExecutionNotFound, match="not an execution id"):
        runner.get("nope")
    with pytest.raises(ConfigurationError, match="statuses are"):
        runner.list(status="finished")


def test_idempotency_key_returns_the_first_execution(runner: JobRunner) -> None:
    """Submitting twice with one key gives one execution."""
    from .jobs import Greet

    first = runner.submit(Greet, {"who": "a"}, idempotency_key="k1")
    assert runner.submit(Greet, {"who": "a"}, idempotency_key="k1") == first
    ran = runner.run(Greet, {"who": "b"}, idempotency_key="k2")
    assert runner.run(Greet, {"who": "b"}, idempotency_key="k2").id == ran.id
    assert len(runner.list()) == 2


def test_run_execution_with_a_job_hint_claims_without_reading_first(runner: JobRunner) -> None:
    """A job hint (as a queue message carries) runs it; the row, not the hint, names the job."""
    from .jobs import Greet

    class Other(PhasedJob):
        name = "other"

        def execute(self, loaded: Any) -> str:
            return "other ran"

    runner.registry.register(Other)
    eid = runner.submit(Greet, {"who": "hint"})
    assert runner.run_execution(eid, job=Greet).result == "hello hint"
    assert runner.run_execution(eid, job=Greet).attempt == 1  # finished: returned as is
    wrong = runner.submit(Greet, {"who": "row"})
    assert runner.run_execution(wrong, job=Other).result == "hello row"
