"""AsyncJobRunner: the same contract on the loop; sync work never blocks it."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from jobrunner import AsyncJobRunner, ExecutionStatus, PhasedJob, Registry

from .conftest import Backend, assert_no_checked_out
from .support import Counter, LoopTicks, make_notes_table, note_texts, notes


async def test_async_phases_run_in_order_and_are_recorded(arunner: AsyncJobRunner) -> None:
    """Async load/execute/record each run once; the row holds result and timings."""
    calls: list[str] = []

    class Report(PhasedJob):
        class Args(BaseModel):
            n: int

        async def load(self, session: AsyncSession, args: Args) -> int:
            calls.append("load")
            assert (await session.execute(sa.text("select 1"))).scalar() == 1
            return args.n

        async def execute(self, n: int) -> dict[str, int]:
            calls.append("execute")
            return {"double": n * 2}

        async def record(self, session: AsyncSession, result: dict[str, int]) -> None:
            calls.append("record")
            await session.execute(sa.text("select 1"))

    execution = await arunner.run(Report, {"n": 21})
    assert calls == ["load", "execute", "record"]
    assert execution.status is ExecutionStatus.SUCCEEDED and execution.result == {"double": 42}
    assert execution.load_ms is not None and execution.record_ms is not None
    assert await arunner.get(execution.id) == execution
    assert [a.status for a in await arunner.attempts(execution.id)] == [ExecutionStatus.SUCCEEDED]


async def test_no_connection_is_checked_out_during_async_execute(
        arunner: AsyncJobRunner) -> None:
    """Between load and record the async pool lends out nothing."""
    seen: list[int] = []

    class Probe(PhasedJob):
        async def load(self, session: AsyncSession, args: Any) -> None:
            await session.execute(sa.text("select 1"))

        async def execute(self, loaded: None) -> None:
            await asyncio.sleep(0)
            seen.append(arunner.engine.pool.checkedout())

        async def record(self, session: AsyncSession, result: None) -> None:
            await session.execute(sa.text("select 1"))

    assert (await arunner.run(Probe)).succeeded
    assert seen == [0]


async def test_fifty_slow_executions_share_a_pool_of_two(postgres: Backend) -> None:
    """pool_size=2: 50 executions whose execute awaits 1 s all succeed, no pool timeout."""
    runner = AsyncJobRunner(postgres.url, registry=Registry(), pool_size=2, max_overflow=0,
                            pool_timeout=60)
    inside, peak = Counter(), Counter()

    class Slow(PhasedJob):
        class Args(BaseModel):
            i: int

        async def load(self, session: AsyncSession, args: Args) -> int:
            await session.execute(sa.text("select 1"))
            return args.i

        async def execute(self, i: int) -> int:
            now_inside = inside.bump()
            peak.value = max(peak.value, now_inside)
            await asyncio.sleep(1)
            inside.bump(-1)
            return i

        async def record(self, session: AsyncSession, result: int) -> None:
            await session.execute(sa.text("select 1"))

    try:
        results = await asyncio.gather(*(runner.run(Slow, {"i": i}) for i in range(50)))
        assert [e.status for e in results] == [ExecutionStatus.SUCCEEDED] * 50
        assert sorted(e.result for e in results) == list(range(50))
        # Held sessions would let at most two executes run at once; free ones let all in.
        assert peak.value > 2, f"at most {peak.value} executes ran at once with a pool of 2"
        assert_no_checked_out(runner.engine.pool, "pool_size=2 runner")
    finally:
        await runner.aclose()


async def test_nested_sessions_in_execute_never_collide(postgres: Backend) -> None:
    """Nested and concurrent self.session() on asyncpg: no "another operation is in progress"."""
    # Peak: 10 executions x (outer + inner + 3 helpers) = 50 connections: sized so only
    # collisions can fail, and well under PostgreSQL's default max_connections (100),
    # which other clients of a shared server take from too.
    runner = AsyncJobRunner(postgres.url, registry=Registry(), pool_size=10, max_overflow=45)
    make_notes_table(postgres.url)

    class Nested(PhasedJob):
        class Args(BaseModel):
            i: int

        async def execute(self, args: Args) -> int:
            async with self.session() as outer:
                await outer.execute(sa.insert(notes).values(text=f"outer {args.i}"))
                async with self.session() as inner:  # a helper opening its own session
                    await inner.execute(sa.insert(notes).values(text=f"inner {args.i}"))
                await asyncio.gather(*(self._count() for _ in range(3)))
            return args.i

        async def _count(self) -> int:
            async with self.session() as session:
                return int((await session.execute(
                    sa.select(sa.func.count()).select_from(notes))).scalar_one())

    try:
        results = await asyncio.gather(*(runner.run(Nested, {"i": i}) for i in range(10)))
        assert [e.error_message for e in results if not e.succeeded] == []
        assert len(note_texts(postgres.url)) == 20
    finally:
        await runner.aclose()


async def test_sync_execute_runs_in_a_thread_and_the_loop_keeps_ticking(
        arunner: AsyncJobRunner) -> None:
    """4 sync jobs sleeping 0.5 s under AsyncJobRunner: off the loop, which ticks meanwhile."""
    loop_thread = threading.current_thread()
    execute_threads: list[threading.Thread] = []
    spans: list[tuple[float, float]] = []

    class Blocking(PhasedJob):
        class Args(BaseModel):
            i: int

        def execute(self, args: Args) -> int:
            execute_threads.append(threading.current_thread())
            started = time.perf_counter()
            time.sleep(0.5)
            spans.append((started, time.perf_counter()))
            return args.i

    async with LoopTicks() as ticks:
        results = await asyncio.gather(*(arunner.run(Blocking, {"i": i}) for i in range(4)))
    assert all(e.succeeded for e in results)
    assert loop_thread not in execute_threads and len(execute_threads) == 4
    ticks.assert_ticked_during(spans)


async def test_sync_load_and_record_run_off_the_loop_with_a_sync_session(
        arunner: AsyncJobRunner, backend: Backend) -> None:
    """Sync load/record under AsyncJobRunner get a sync Session in a worker thread."""
    make_notes_table(backend.url)
    loop_thread = threading.current_thread()
    seen: list[tuple[str, bool, bool]] = []

    class Mixed(PhasedJob):
        def load(self, session: sa.orm.Session, args: Any) -> str:
            seen.append(("load", isinstance(session, sa.orm.Session),
                         threading.current_thread() is loop_thread))
            return "loaded"

        async def execute(self, loaded: str) -> str:
            return loaded + " executed"

        def record(self, session: sa.orm.Session, result: str) -> None:
            seen.append(("record", isinstance(session, sa.orm.Session),
                         threading.current_thread() is loop_thread))
            session.execute(sa.insert(notes).values(text=result))

    execution = await arunner.run(Mixed)
    assert execution.succeeded
    assert seen == [("load", True, False), ("record", True, False)]
    assert note_texts(backend.url) == ["loaded executed"]


async def test_async_load_session_used_in_execute_raises(arunner: AsyncJobRunner) -> None:
    """Keeping the async load session for execute fails naming job and phase."""

    class Leaky(PhasedJob):
        name = "reports.leaky_async"

        async def load(self, session: AsyncSession, args: Any) -> AsyncSession:
            return session

        async def execute(self, session: AsyncSession) -> None:
            await session.execute(sa.text("select 1"))

    execution = await arunner.run(Leaky)
    assert execution.status is ExecutionStatus.FAILED and execution.phase == "execute"
    assert execution.error_type == "jobrunner.PhaseSessionClosed"
    assert "load session of job 'reports.leaky_async'" in (execution.error_message or "")


async def test_async_self_session_commits_and_rolls_back(arunner: AsyncJobRunner,
                                                         backend: Backend) -> None:
    """async with self.session(): commit on clean exit, rollback on error."""
    make_notes_table(backend.url)

    class UsesOwnSession(PhasedJob):
        async def execute(self, loaded: Any) -> None:
            async with self.session() as session:
                await session.execute(sa.insert(notes).values(text="kept"))
            with pytest.raises(ValueError):
                async with self.session() as session:
                    await session.execute(sa.insert(notes).values(text="rolled back"))
                    raise ValueError("abort")

    assert (await arunner.run(UsesOwnSession)).succeeded
    assert note_texts(backend.url) == ["kept"]


async def test_sync_session_on_the_loop_is_refused(arunner: AsyncJobRunner) -> None:
    """`with self.session()` inside async code fails, pointing to `async with`."""

    class Wrong(PhasedJob):
        async def execute(self, loaded: Any) -> None:
            with self.session():
                pass

    execution = await arunner.run(Wrong)
    assert execution.status is ExecutionStatus.FAILED
    assert "async with self.session()" in (execution.error_message or "")


async def test_async_record_failure_resumes_at_record(arunner: AsyncJobRunner,
                                                      backend: Backend) -> None:
    """After a failed async record, re-running executes record only."""
    make_notes_table(backend.url)
    executed, recorded = Counter(), Counter()

    class Flaky(PhasedJob):
        async def execute(self, loaded: Any) -> str:
            executed.bump()
            return "effect"

        async def record(self, session: AsyncSession, result: str) -> None:
            await session.execute(sa.insert(notes).values(text=result))
            if recorded.bump() == 1:
                raise RuntimeError("record broke")

    first = await arunner.run(Flaky)
    assert first.status is ExecutionStatus.FAILED and first.phase == "record"
    await arunner.retry(first.id)
    second = await arunner.run_execution(first.id)
    assert second.succeeded and second.attempt == 2
    assert executed.value == 1 and recorded.value == 2
    assert note_texts(backend.url) == ["effect"]


async def test_async_unserialisable_result_fails(arunner: AsyncJobRunner) -> None:
    """A non-JSON result fails the async execution with a clear message."""

    class ReturnsSet(PhasedJob):
        async def execute(self, loaded: Any) -> object:
            return object()

    execution = await arunner.run(ReturnsSet)
    assert execution.status is ExecutionStatus.FAILED
    assert "not JSON-serialisable" in (execution.error_message or "")


async def test_async_submit_run_due_and_handler_paths(arunner: AsyncJobRunner) -> None:
    """submit + run_due and handler-path resolution work on the async runner."""
    from .jobs import AsyncGreet

    arunner.registry.register(AsyncGreet)
    eid = await arunner.submit("tests.jobs:AsyncGreet", {"who": "loop"})
    [execution] = await arunner.run_due()
    assert execution.id == eid and execution.result == "hello loop"
    assert [e.id for e in await arunner.list(status="succeeded")] == [eid]
