"""The I/O edge: how one phase of an attempt opens, runs and commits, sync and async.

:class:`SyncPhases` and :class:`AsyncPhases` have the same methods. Everything they
write comes from :class:`~jobrunner._attempt.AttemptState` and every statement is a
function of :mod:`jobrunner._queries`; these classes only open sessions, call the
job, time it and commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from . import _queries as q
from ._attempt import AttemptState, Phase, utcnow
from ._errors_db import framework_sql
from ._exceptions import ExecutionCancelled, JobTimedOut, LeaseLost
from ._job import JobContext, PhasedJob
from ._monitor import LoopHealth, PhaseInfo, phase_context, timed_steps
from ._records import Execution
from ._schema import ExecutionStatus
from ._session import PhaseSession, SessionScope

logger = logging.getLogger("jobrunner")

SUCCEEDED = ExecutionStatus.SUCCEEDED


def lease_lost(state: AttemptState, where: str) -> LeaseLost:
    """The error for a write refused because another attempt owns the execution."""
    return LeaseLost(
        f"execution {state.execution_id} of {state.job_cls.name!r}: attempt {state.number} "
        f"lost its lease before {where} (another worker took it over, or it was cancelled "
        "or reaped); its writes were refused"
    )


def _cancelled(state: AttemptState) -> ExecutionCancelled:
    return ExecutionCancelled(
        f"execution {state.execution_id} of {state.job_cls.name!r} was cancelled"
    )


def _timed_out(state: AttemptState, phase: str, seconds: float) -> JobTimedOut:
    return JobTimedOut(
        f"{phase} of {state.job_cls.name!r} (execution {state.execution_id}) ran past its "
        f"{seconds:g}s timeout"
    )


def make_job(
    state: AttemptState, scope: Callable[[], SessionScope], cancel_event: threading.Event
) -> PhasedJob:
    """A fresh job instance for one attempt, wired to its context."""
    job = state.job_cls()
    job._context = JobContext(
        execution_id=str(state.execution_id),
        attempt=state.number,
        session_scope=scope,
        cancel_event=cancel_event,
    )
    return job


class SyncPhases:
    """Phases over a sync engine (psycopg / sqlite3): no event loop anywhere."""

    def __init__(self, engine: Engine, url: str, autocommit: Engine | None = None) -> None:
        self.engine = engine
        self.url = url
        self.phase_sessions = sessionmaker(engine, class_=PhaseSession, expire_on_commit=False)
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._autocommit = autocommit or _autocommit(engine)

    @contextlib.contextmanager
    def tx(self, *, single: bool = False) -> Iterator[Connection]:
        """One framework transaction; driver errors become jobrunner errors.

        ``single``: the caller runs one statement (atomic by itself), so on PostgreSQL it
        runs in autocommit and saves the BEGIN and COMMIT round trips.
        """
        with framework_sql(self.url):
            if single and self._autocommit is not None:
                with self._autocommit.connect() as conn:
                    yield conn
            else:
                with self.engine.begin() as conn:
                    yield conn

    @contextlib.contextmanager
    def _open(
        self, state: AttemptState, phase: Phase
    ) -> Iterator[tuple[Session | None, Connection]]:
        """The phase's transaction: a sealed-after-use session if the job has this phase."""
        with phase_context(state, phase):
            if not state.job_cls.spec.runs(phase):
                # Framework writes only: one statement each on PostgreSQL (see _queries).
                with self.tx(single=True) as conn:
                    yield None, conn
                return
            session = self.phase_sessions()
            session.open_for(state.job_cls.name, phase)
            try:
                with session.begin():
                    yield session, session.connection()
            finally:
                session.seal(state.job_cls.name, phase, str(state.execution_id))

    def claim(self, state: AttemptState) -> dict[str, Any] | None:
        """Claim the execution for the next attempt (its own transaction)."""
        with self.tx(single=state.concurrency is None) as conn:
            return q.claim(
                conn,
                state.execution_id,
                worker=state.lease.worker,
                now=utcnow(),
                phase=state.resume_from,
                concurrency=state.concurrency,
            )

    def load(self, state: AttemptState, job: PhasedJob) -> Any:
        """LOAD: create or keep the running row and call ``job.load`` in one transaction."""
        spec = state.job_cls.spec
        if state.lease.how == "held" and not spec.runs("load"):
            with phase_context(state, "load"):
                return _args_value(state)
        with self._open(state, "load") as (session, conn):
            if state.insert_row is not None and state.lease.how == "insert":
                q.insert_execution(conn, state.insert_row)
            args = _args_value(state)
            loaded = job.load(session, args) if session is not None else args
            if session is not None:
                session.flush()
            _check_deadline(state, "load", state.job_cls.load_timeout)
        state.lease.how = "held"
        return loaded

    def execute(self, state: AttemptState, job: PhasedJob, loaded: Any) -> Any:
        """EXECUTE: no session held; returns the JSON form of the result."""
        timeout = state.job_cls.timeout
        with phase_context(state, "execute"):
            if timeout is None:
                result = job.execute(loaded)
            else:
                result = _call_with_deadline(job.execute, loaded, timeout, state)
            return state.job_cls.dump_result(result)

    def checkpoint(self, state: AttemptState, result_json: Any) -> None:
        """Store the result so a failed record never repeats execute."""
        with self.tx(single=True) as conn:
            cancel = q.checkpoint(conn, state.lease, state.checkpoint_values(result_json))
        _after_checkpoint(state, cancel)

    def record(self, state: AttemptState, job: PhasedJob) -> Execution:
        """RECORD: ``job.record`` plus the ``succeeded`` status, one transaction."""
        with self._open(state, "record") as (session, conn):
            result = state.job_cls.restore_result(state.checkpoint)
            if session is not None:
                job.record(session, result)
                session.flush()
            _check_deadline(state, "record", state.job_cls.record_timeout)
            execution = q.finish(
                conn, state.lease, state.success_values(), state.ledger_row(SUCCEEDED)
            )
            if execution is None:
                raise lease_lost(state, "record")
        return execution

    def finish_failure(
        self, state: AttemptState, status: ExecutionStatus, wait: float | None
    ) -> Execution | None:
        """Write a failed attempt in a fresh transaction (the phase's may be unusable)."""
        values = state.failure_values(status, wait)
        with self.tx() as conn:
            return q.finish(
                conn,
                state.lease,
                values,
                state.ledger_row(state.final_status(), wait),
                insert_if_missing=state.insert_for_failure(values),
            )


class AsyncPhases:
    """Phases over an async engine (asyncpg / aiosqlite); sync phases go to threads."""

    def __init__(
        self,
        engine: AsyncEngine,
        url: str,
        sync_phases: Callable[[], SyncPhases],
        autocommit: AsyncEngine | None = None,
    ) -> None:
        self.engine = engine
        self.url = url
        self.phase_sessions = async_sessionmaker(
            engine, expire_on_commit=False, sync_session_class=PhaseSession
        )
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._autocommit = autocommit or _autocommit(engine)
        self._sync_phases = sync_phases
        self.health: LoopHealth | None = None

    def _timed(self, state: AttemptState, coro: Coroutine[Any, Any, Any]) -> Awaitable[Any]:
        """Await an async phase with its steps timed against the loop-health thresholds."""
        if self.health is None:
            return coro
        info = PhaseInfo(str(state.execution_id), state.job_cls.name, state.phase or "", state)
        return timed_steps(coro, info, self.health)

    @contextlib.asynccontextmanager
    async def tx(self, *, single: bool = False) -> AsyncIterator[AsyncConnection]:
        """One framework transaction (``single``: one statement, autocommit on PostgreSQL)."""
        with framework_sql(self.url):
            if single and self._autocommit is not None:
                async with self._autocommit.connect() as conn:
                    yield conn
            else:
                async with self.engine.begin() as conn:
                    yield conn

    @contextlib.asynccontextmanager
    async def _open(
        self, state: AttemptState, phase: Phase
    ) -> AsyncIterator[tuple[AsyncSession | None, _AsyncIO]]:
        with phase_context(state, phase):
            if not state.job_cls.spec.runs(phase):
                # Framework writes only: one statement each on PostgreSQL (see _queries).
                async with self.tx(single=True) as conn:
                    yield None, _AsyncIO(conn=conn)
                return
            session = self.phase_sessions()
            sync = session.sync_session
            assert isinstance(sync, PhaseSession)
            sync.open_for(state.job_cls.name, phase)
            try:
                async with session.begin():
                    yield session, _AsyncIO(session=session)
            finally:
                await session.close()
                sync.seal(state.job_cls.name, phase, str(state.execution_id))

    async def claim(self, state: AttemptState) -> dict[str, Any] | None:
        """Claim the execution for the next attempt (its own transaction)."""
        async with self.tx(single=state.concurrency is None) as conn:
            return await conn.run_sync(
                lambda c: q.claim(
                    c,
                    state.execution_id,
                    worker=state.lease.worker,
                    now=utcnow(),
                    phase=state.resume_from,
                    concurrency=state.concurrency,
                )
            )

    async def load(self, state: AttemptState, job: PhasedJob) -> Any:
        """LOAD; a sync ``load`` runs in a worker thread on the sync engine."""
        spec = state.job_cls.spec
        if spec.runs("load") and not spec.is_async("load"):
            return await asyncio.to_thread(self._sync_phases().load, state, job)
        if state.lease.how == "held" and not spec.runs("load"):
            with phase_context(state, "load"):
                return _args_value(state)
        async with self._open(state, "load") as (session, io):
            if state.insert_row is not None and state.lease.how == "insert":
                await io.run(q.insert_execution, state.insert_row)
            args = _args_value(state)
            loaded = args
            if session is not None:
                async with _deadline(state, "load", state.job_cls.load_timeout):
                    loaded = await self._timed(state, _async(job).load(session, args))
                await session.flush()
        state.lease.how = "held"
        return loaded

    async def execute(self, state: AttemptState, job: PhasedJob, loaded: Any) -> Any:
        """EXECUTE on the loop if async, in a worker thread if sync; with the timeout."""
        timeout = state.job_cls.timeout
        with phase_context(state, "execute"):
            late = None
            if state.job_cls.spec.is_async("execute"):
                call = self._timed(state, _async(job).execute(loaded))
            else:
                late = _LateResult(job.execute, state)
                call = asyncio.to_thread(late, loaded)
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    result = await call
            except TimeoutError as exc:
                if not deadline.expired():
                    raise  # the job's own TimeoutError, not our deadline
                if late is not None:
                    late.deadline_passed.set()
                raise _timed_out(state, "execute", timeout or 0) from exc
            return state.job_cls.dump_result(result)

    async def checkpoint(self, state: AttemptState, result_json: Any) -> None:
        """Store the result so a failed record never repeats execute."""
        values = state.checkpoint_values(result_json)
        async with self.tx(single=True) as conn:
            cancel = await conn.run_sync(q.checkpoint, state.lease, values)
        _after_checkpoint(state, cancel)

    async def record(self, state: AttemptState, job: PhasedJob) -> Execution:
        """RECORD; a sync ``record`` runs in a worker thread on the sync engine."""
        spec = state.job_cls.spec
        if spec.runs("record") and not spec.is_async("record"):
            return await asyncio.to_thread(self._sync_phases().record, state, job)
        async with self._open(state, "record") as (session, io):
            result = state.job_cls.restore_result(state.checkpoint)
            if session is not None:
                async with _deadline(state, "record", state.job_cls.record_timeout):
                    await self._timed(state, _async(job).record(session, result))
                await session.flush()
            execution = await io.run(
                q.finish, state.lease, state.success_values(), state.ledger_row(SUCCEEDED)
            )
            if execution is None:
                raise lease_lost(state, "record")
        assert isinstance(execution, Execution)
        return execution

    async def finish_failure(
        self, state: AttemptState, status: ExecutionStatus, wait: float | None
    ) -> Execution | None:
        """Write a failed attempt in a fresh transaction (the phase's may be unusable)."""
        values = state.failure_values(status, wait)
        ledger = state.ledger_row(state.final_status(), wait)
        insert = state.insert_for_failure(values)
        async with self.tx() as conn:
            return await conn.run_sync(
                lambda c: q.finish(c, state.lease, values, ledger, insert_if_missing=insert)
            )


class _AsyncIO:
    """Runs a :mod:`_queries` function on a phase's connection, session or not."""

    def __init__(
        self, *, conn: AsyncConnection | None = None, session: AsyncSession | None = None
    ) -> None:
        self._conn = conn
        self._session = session

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._session is not None:
            return await self._session.run_sync(lambda s: fn(s.connection(), *args))
        assert self._conn is not None
        return await self._conn.run_sync(fn, *args)


@contextlib.asynccontextmanager
async def _deadline(state: AttemptState, phase: str, seconds: float | None) -> AsyncIterator[None]:
    """Cancel an async phase at its timeout and say so with :class:`JobTimedOut`."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            yield
    except TimeoutError as exc:
        if not timeout.expired():
            raise  # the job's own TimeoutError
        raise _timed_out(state, phase, seconds or 0) from exc


def _check_deadline(state: AttemptState, phase: str, seconds: float | None) -> None:
    """A sync load/record cannot be interrupted; past its timeout it is rolled back."""
    if seconds is not None and (time.perf_counter() - state.phase_started) > seconds:
        raise _timed_out(state, phase, seconds)


_E = TypeVar("_E", Engine, AsyncEngine)


def _autocommit(engine: _E) -> _E | None:
    """An autocommit view of a PostgreSQL engine (same pool), for one-statement writes.

    Runners built from a URL pass a dedicated autocommit engine instead: switching a
    pooled connection's isolation level on every checkout and back costs more than the
    round trips autocommit saves.
    """
    if engine.dialect.name != "postgresql":
        return None  # SQLite's BEGIN IMMEDIATE is what makes its writers queue: keep it
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def _async(job: PhasedJob) -> Any:
    """The job, typed for awaiting its ``async def`` phases (the base class declares def)."""
    return job


def _args_value(state: AttemptState) -> Any:
    if state.args_value is None:
        state.args_value = state.job_cls.validate_args(state.args_json)[0]
    return state.args_value


def _after_checkpoint(state: AttemptState, cancel: bool | None) -> None:
    if cancel is None:
        raise lease_lost(state, "checkpoint")
    if cancel:
        raise _cancelled(state)


class _LateResult:
    """A sync execute that logs when its result arrives after the timeout gave up on it."""

    def __init__(self, fn: Callable[[Any], Any], state: AttemptState) -> None:
        self.fn = fn
        self.state = state
        self.deadline_passed = threading.Event()

    def __call__(self, loaded: Any) -> Any:
        result = self.fn(loaded)
        if self.deadline_passed.is_set():
            name, eid = self.state.job_cls.name, str(self.state.execution_id)
            logger.warning(
                "sync execute of %s (execution %s) finished after its timeout; a thread "
                "cannot be killed, so it ran on, and its result was discarded",
                name,
                eid,
                extra={"execution_id": eid, "job": name, "phase": "execute"},
            )
        return result


def _call_with_deadline(
    fn: Callable[[Any], Any], loaded: Any, timeout: float, state: AttemptState
) -> Any:
    """Run sync ``fn`` in a thread and stop waiting at the deadline (threads can't be killed)."""
    late = _LateResult(fn, state)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jobrunner-execute")
    future = pool.submit(late, loaded)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError as exc:
        late.deadline_passed.set()
        raise _timed_out(state, "execute", timeout) from exc
    finally:
        pool.shutdown(wait=False)
