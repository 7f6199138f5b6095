"""The I/O edge: how each request of :mod:`jobrunner._flow` is performed, sync and async.

:class:`SyncPhases` and :class:`AsyncPhases` have the same methods, one per request.
What they write comes from :class:`~jobrunner._attempt.AttemptState`, every statement is
a function of :mod:`jobrunner._queries`, and every decision was taken by the flow;
these classes only open sessions, call the job, time it, wait for threads and commit.
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
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import greenlet_spawn

from . import _queries as q
from ._attempt import AttemptState, Phase
from ._errors_db import framework_sql
from ._exceptions import ExecutionCancelled, JobTimedOut, LeaseLost
from ._flow import Abandoned, End, Executed, extra
from ._inflight import Running
from ._job import JobContext, PhasedJob
from ._lifecycle import Outcome
from ._monitor import LoopHealth, PhaseInfo, phase_context, time_child_tasks, timed_steps
from ._prepared import Checkout, Conn
from ._records import Execution
from ._schema import ExecutionStatus
from ._session import PhaseSession, SessionScope
from ._threads import DaemonPool

logger = logging.getLogger("jobrunner")

SUCCEEDED = ExecutionStatus.SUCCEEDED
_ENDING: dict[Outcome, q.Ending] = {Outcome.RETRY: "retry", Outcome.INTERRUPTED: "interrupted"}


def lease_lost(state: AttemptState, where: str) -> LeaseLost:
    """The error for a write refused because another attempt owns the execution."""
    return LeaseLost(
        f"execution {state.execution_id} of {state.job_cls.name!r}: attempt {state.number} "
        f"lost its lease before {where} (another worker took it over, or it was reaped); "
        "its writes were refused"
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


def _overran(state: AttemptState, running: Running, seconds: float) -> JobTimedOut:
    """A sync execute passed its timeout: ask it to stop, and say the slot stays busy."""
    running.cancel_event.set()  # self.cancelled() is now True: cooperative code stops
    logger.warning(
        "sync execute of %s (execution %s) passed its %gs timeout; a thread cannot be "
        "killed, so this attempt waits for it to return (its slot stays busy, and "
        "self.cancelled() now returns True); its result, if any, will be checkpointed",
        state.job_cls.name,
        state.execution_id,
        seconds,
        extra={**extra(state), "phase": "execute"},
    )
    return _timed_out(state, "execute", seconds)


def make_job(
    state: AttemptState,
    scope: Callable[[], SessionScope],
    cancel_event: threading.Event,
    pool: DaemonPool | None = None,
) -> PhasedJob:
    """A fresh job instance for one attempt, wired to its context."""
    job = state.job_cls()
    job._context = JobContext(
        execution_id=str(state.execution_id),
        attempt=state.number,
        session_scope=scope,
        cancel_event=cancel_event,
        pool=pool,
    )
    return job


def _no_load(state: AttemptState) -> list[str]:
    return [] if state.job_cls.spec.runs("load") else [state.job_cls.name]


def _end_args(state: AttemptState, end: End) -> dict[str, Any]:
    """Everything :func:`q.end_attempt` needs for the ending the flow decided."""
    values = state.failure_values()
    counted = end.outcome is not Outcome.INTERRUPTED
    return {
        "kind": _ENDING.get(end.outcome, "final"),
        "values": values,
        "attempt_row": state.ledger_row(end.attempt_status, end.wait or None),
        "status": end.status.value,
        "wait_s": end.wait,
        "insert_if_missing": state.insert_for_failure(
            values, end.status, end.wait, counted=counted
        ),
    }


def _locked(exc: sa_exc.OperationalError) -> bool:
    return "database is locked" in str(exc).lower()


def changes(conn: Connection) -> int | None:
    """Rows this SQLite connection has changed so far (None elsewhere): tells whether a
    phase wrote anything."""
    if conn.dialect.name != "sqlite":
        return None
    driver: Any = conn.connection.driver_connection
    return int(driver.total_changes)


def _start_execute(conn: Conn, state: AttemptState) -> None:
    """Create the inline row, or move a held one to execute (lease-checked)."""
    if state.lease.how == "insert":
        q.insert_execution(conn, state.insert_row or {})
    else:
        _execute_started(state, q.phase_started(conn, state.lease, {"phase": "execute"}))


def _execute_started(state: AttemptState, cancel: bool | None) -> None:
    """After load's lease check: stop (rolling load back) if lost or cancelled."""
    if cancel is None:
        raise lease_lost(state, "execute")
    if cancel:
        raise _cancelled(state)


def _checkpoint(conn: Conn, state: AttemptState, result: Any, finish: bool) -> bool | Execution:
    """The checkpoint write: ``cancel_requested``, or the succeeded execution when
    ``finish`` let it end the attempt (one write instead of a checkpoint and a finish).

    A finishing write matches only while no cancel is requested; when it does not match
    (a cancel, or a lost lease) the plain checkpoint follows, and says which it was.
    """
    values = state.checkpoint_values(result)
    if finish:
        done = {**values, **state.success_values()}  # execute's clock stopped already
        phase, state.phase = state.phase, "record"  # as the row will say: nothing left
        execution = None
        try:
            ledger = state.ledger_row(SUCCEEDED)
            execution = q.end_attempt(conn, state.lease, "done", done, ledger)
        finally:
            if execution is None:  # not written: the attempt is still after execute
                state.phase = phase
        if execution is not None:
            return execution
    cancel = q.checkpoint(conn, state.lease, values)
    if cancel is None:
        raise lease_lost(state, "checkpoint")
    return cancel


class SyncPhases:
    """Requests over a sync engine (psycopg / sqlite3): no event loop anywhere."""

    def __init__(
        self,
        engine: Engine,
        url: str,
        autocommit: Engine | None = None,
        pool: DaemonPool | None = None,
    ) -> None:
        self.engine = engine
        self.url = url
        self.phase_sessions = sessionmaker(engine, class_=PhaseSession, expire_on_commit=False)
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._autocommit = autocommit or _autocommit(engine)
        #: A dedicated autocommit engine: its connections are in autocommit from the
        #: start, so a bare checkout may run a write (a view of the caller's engine sets
        #: its isolation level only through a Connection).
        self._bare = autocommit is not None
        self.pool = pool

    @contextlib.contextmanager
    def tx(self, *, single: bool = False, read: bool = False) -> Iterator[Connection]:
        """One framework transaction; driver errors become jobrunner errors.

        ``single``: the caller runs one statement (atomic by itself), so on PostgreSQL it
        runs in autocommit and saves the BEGIN and COMMIT round trips. ``read``: the
        transaction only reads, so on SQLite it begins DEFERRED and never waits for (or
        holds) the write lock.
        """
        with framework_sql(self.url):
            if single and self._autocommit is not None:
                with self._autocommit.connect() as conn:
                    yield conn
            elif read:
                with self.engine.connect() as conn:
                    conn = conn.execution_options(jobrunner_read_only=True)
                    with conn.begin():
                        yield conn
            else:
                with self.engine.begin() as conn:
                    yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Conn]:
        """One statement of :mod:`jobrunner._prepared`, atomic by itself: on PostgreSQL
        a bare pooled connection in autocommit (no ``Connection``, no BEGIN/COMMIT),
        elsewhere a transaction of its own."""
        with framework_sql(self.url), _writing(self.engine, self._autocommit, self._bare) as conn:
            yield conn

    @contextlib.contextmanager
    def _open(
        self, state: AttemptState, phase: Phase, *, read_first: bool = False
    ) -> Iterator[tuple[Session, Connection]]:
        """The phase's transaction in a session sealed after use (``read_first``: begun
        DEFERRED on SQLite, so a load that only reads never takes the write lock)."""
        options = {"jobrunner_read_only": True} if read_first else None
        with phase_context(state, phase):
            session = self.phase_sessions()
            session.open_for(state.job_cls.name, phase)
            try:
                with session.begin():
                    yield session, session.connection(execution_options=options)
            finally:
                session.seal(state.job_cls.name, phase, str(state.execution_id))

    def claim(self, state: AttemptState, early_s: float) -> dict[str, Any] | None:
        """Claim the execution for the next attempt (its own transaction)."""
        with self.tx(single=state.concurrency is None) as conn:
            return _claim(conn, state, early_s)

    def fetch(self, state: AttemptState) -> Execution | None:
        """The execution as stored now."""
        with self.tx(single=True, read=True) as conn:
            return q.get(conn, state.execution_id)

    def load(self, state: AttemptState, job: PhasedJob) -> Any:
        """LOAD and the move to execute (lease-checked), in one transaction."""
        if not state.job_cls.spec.runs("load"):
            with phase_context(state, "load"):
                args = _args_value(state)
            if state.lease.how == "insert":  # inline: the row appears, held, in execute
                with self.write() as conn:
                    q.insert_execution(conn, state.insert_row or {})
                state.lease.how = "held"
            return args
        sqlite = self.engine.dialect.name == "sqlite"
        try:
            return self._load(state, job, read_first=sqlite)
        except sa_exc.OperationalError as exc:
            if not (sqlite and _locked(exc)):
                raise
        # A load that read, then wrote, lost the race for SQLite's write lock to another
        # writer; nothing of it committed. Once more, holding the write lock from the start.
        return self._load(state, job, read_first=False)

    def _load(self, state: AttemptState, job: PhasedJob, *, read_first: bool) -> Any:
        with self._open(state, "load", read_first=read_first) as (session, conn):
            before = changes(conn) if read_first else None
            loaded = job.load(session, _args_value(state))
            session.flush()
            _check_deadline(state, "load", state.job_cls.load_timeout)
            read_only = read_first and changes(conn) == before
            if not read_only:  # a stale owner's load writes must not commit
                _start_execute(conn, state)
        if read_only:  # nothing of load's to commit with it: a short write of its own
            with self.write() as conn:
                _start_execute(conn, state)
        state.lease.how = "held"
        return loaded

    def execute(
        self, state: AttemptState, job: PhasedJob, loaded: Any, running: Running
    ) -> Executed:
        """EXECUTE with no session held; past its timeout it is waited for, not abandoned."""
        timeout = state.job_cls.timeout
        dump = state.job_cls.dump_result
        with phase_context(state, "execute"):
            if timeout is None or self.pool is None:
                return Executed(dump(job.execute(loaded)))
            future = self.pool.submit(job.execute, loaded)
            try:
                return Executed(dump(future.result(timeout=timeout)))
            except concurrent.futures.TimeoutError:
                overran = _overran(state, running, timeout)
            try:
                result = future.result()  # the heartbeat keeps the lease meanwhile
            except Exception as exc:
                raise overran from exc
            return Executed(dump(result), overran)

    def checkpoint(self, state: AttemptState, result: Any, *, finish: bool = False) -> Any:
        """Store the result so a failed record never repeats execute (``finish``: end
        the attempt succeeded in the same write, when no cancel is requested)."""
        with self.write() as conn:
            return _checkpoint(conn, state, result, finish)

    def record(self, state: AttemptState, job: PhasedJob) -> Execution:
        """RECORD: ``job.record`` plus the ``succeeded`` status, one transaction."""
        if not state.job_cls.spec.runs("record"):
            with phase_context(state, "record"), self.write() as conn:
                return self._finish(conn, state)
        with self._open(state, "record") as (session, conn):
            job.record(session, state.job_cls.restore_result(state.checkpoint))
            session.flush()
            _check_deadline(state, "record", state.job_cls.record_timeout)
            return self._finish(conn, state)

    def _finish(self, conn: Conn, state: AttemptState) -> Execution:
        execution = q.end_attempt(
            conn, state.lease, "finish", state.success_values(), state.ledger_row(SUCCEEDED)
        )
        if execution is None:
            raise lease_lost(state, "record")
        return execution

    def end(self, state: AttemptState, end: End) -> Execution | None:
        """Write a failed attempt in a fresh transaction (the phase's may be unusable)."""
        args = _end_args(state, end)
        if args["insert_if_missing"] is None:
            with self.write() as conn:
                return q.end_attempt(conn, state.lease, **args)
        with self.tx() as tx:
            return q.end_attempt(tx, state.lease, **args)


class AsyncPhases:
    """Requests over an async engine (asyncpg / aiosqlite); sync phases go to threads."""

    def __init__(
        self,
        engine: AsyncEngine,
        url: str,
        sync_phases: Callable[[], SyncPhases],
        pool: DaemonPool,
        autocommit: AsyncEngine | None = None,
    ) -> None:
        self.engine = engine
        self.url = url
        self.phase_sessions = async_sessionmaker(
            engine, expire_on_commit=False, sync_session_class=PhaseSession
        )
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._autocommit = autocommit or _autocommit(engine)
        self._bare = autocommit is not None  # see SyncPhases
        self._sync_phases = sync_phases
        self.pool = pool
        self.health: LoopHealth | None = None
        #: Set by a worker shutting down for good: stop waiting for stuck threads.
        self.abandon = asyncio.Event()

    @contextlib.asynccontextmanager
    async def tx(
        self, *, single: bool = False, read: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """One framework transaction (see :meth:`SyncPhases.tx`)."""
        with framework_sql(self.url):
            if single and self._autocommit is not None:
                async with self._autocommit.connect() as conn:
                    yield conn
            elif read:
                async with self.engine.connect() as conn:
                    conn = await conn.execution_options(jobrunner_read_only=True)
                    async with conn.begin():
                        yield conn
            else:
                async with self.engine.begin() as conn:
                    yield conn

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        single: bool = False,
        read: bool = False,
    ) -> T:
        """``fn(conn, *args)`` in one framework transaction, as :meth:`tx` would run it,
        but all of it — checkout, statements, commit, return — in one greenlet: one
        switch into SQLAlchemy's sync core instead of one per step (the hot path's
        statements spend a good part of their client CPU on those switches)."""
        with framework_sql(self.url):
            result: T = await greenlet_spawn(self._run_sync, fn, args, single, read)
            return result

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)``: one statement of :mod:`jobrunner._prepared`, atomic by
        itself (see :meth:`SyncPhases.write`), all in one greenlet."""
        with framework_sql(self.url):
            result: T = await greenlet_spawn(self._write_sync, fn, args)
            return result

    def _write_sync(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        autocommit = self._autocommit.sync_engine if self._autocommit is not None else None
        with _writing(self.engine.sync_engine, autocommit, self._bare) as conn:
            return fn(conn, *args)

    def _run_sync(self, fn: Callable[..., T], args: tuple[Any, ...], single: bool, read: bool) -> T:
        if single and self._autocommit is not None:
            with self._autocommit.sync_engine.connect() as conn:
                return fn(conn, *args)
        if read:
            with self.engine.sync_engine.connect() as conn:
                conn = conn.execution_options(jobrunner_read_only=True)
                with conn.begin():
                    return fn(conn, *args)
        with self.engine.sync_engine.begin() as conn:
            return fn(conn, *args)

    @contextlib.asynccontextmanager
    async def _open(
        self, state: AttemptState, phase: Phase, *, read_first: bool = False
    ) -> AsyncIterator[tuple[AsyncSession, _AsyncIO]]:
        options = {"jobrunner_read_only": True} if read_first else None
        with phase_context(state, phase):
            session = self.phase_sessions()
            sync = session.sync_session
            assert isinstance(sync, PhaseSession)
            sync.open_for(state.job_cls.name, phase)
            try:
                async with session.begin():
                    if options is not None:
                        await session.connection(execution_options=options)
                    yield session, _AsyncIO(session=session)
            finally:
                await session.close()
                sync.seal(state.job_cls.name, phase, str(state.execution_id))

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run sync ``fn`` in the runner's pool; a cancel waits for the thread first."""
        future = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        result, error, held = await _outlive(future, self.abandon)
        if held is not None:
            raise held  # the caller stopped us: that is what ends the attempt
        if error is not None:
            raise error
        return result

    async def _user(
        self, state: AttemptState, running: Running, coro: Coroutine[Any, Any, Any]
    ) -> Any:
        """Await an async user step that a cancel or a lost lease may interrupt."""
        task = asyncio.current_task()
        state.interruptible = True
        try:
            return await self._timed(state, coro)
        except asyncio.CancelledError:
            if running.interrupted and task is not None:
                running.interrupted = False
                if task.uncancel() == 0:  # ours alone, not the caller's too
                    raise running.error() from None
            raise
        finally:
            state.interruptible = False
            if running.interrupted and task is not None:  # the job swallowed our cancel
                running.interrupted = False
                task.uncancel()

    def _timed(self, state: AttemptState, coro: Coroutine[Any, Any, Any]) -> Awaitable[Any]:
        """Await an async phase with its steps timed against the loop-health thresholds."""
        if self.health is None:
            return coro
        info = PhaseInfo(str(state.execution_id), state.job_cls.name, state.phase or "", state)
        time_child_tasks(asyncio.get_running_loop())
        return timed_steps(coro, info, self.health)

    async def claim(self, state: AttemptState, early_s: float) -> dict[str, Any] | None:
        """Claim the execution for the next attempt (its own transaction)."""
        return await self.run(_claim, state, early_s, single=state.concurrency is None)

    async def fetch(self, state: AttemptState) -> Execution | None:
        """The execution as stored now."""
        return await self.run(q.get, state.execution_id, single=True, read=True)

    async def load(self, state: AttemptState, job: PhasedJob, running: Running) -> Any:
        """LOAD; a sync ``load`` runs in a worker thread on the sync engine."""
        spec = state.job_cls.spec
        if spec.runs("load") and not spec.is_async("load"):
            return await self._in_thread(self._sync_phases().load, state, job)
        if not spec.runs("load"):
            with phase_context(state, "load"):
                args = _args_value(state)
            if state.lease.how == "insert":
                await self.write(q.insert_execution, state.insert_row or {})
                state.lease.how = "held"
            return args
        sqlite = self.engine.dialect.name == "sqlite"
        try:
            return await self._load(state, job, running, read_first=sqlite)
        except sa_exc.OperationalError as exc:
            if not (sqlite and _locked(exc)):
                raise
        return await self._load(state, job, running, read_first=False)  # see SyncPhases

    async def _load(
        self, state: AttemptState, job: PhasedJob, running: Running, *, read_first: bool
    ) -> Any:
        async with self._open(state, "load", read_first=read_first) as (session, io):
            before = await io.run(changes) if read_first else None
            args = _args_value(state)
            async with _deadline(state, "load", state.job_cls.load_timeout):
                loaded = await self._user(state, running, _async(job).load(session, args))
            await session.flush()
            read_only = read_first and await io.run(changes) == before
            if not read_only:
                await io.run(_start_execute, state)
        if read_only:
            await self.write(_start_execute, state)
        state.lease.how = "held"
        return loaded

    async def execute(
        self, state: AttemptState, job: PhasedJob, loaded: Any, running: Running
    ) -> Executed:
        """EXECUTE on the loop if async, in a pool thread if sync; with the timeout."""
        timeout = state.job_cls.timeout
        dump = state.job_cls.dump_result
        with phase_context(state, "execute"):
            if not state.job_cls.spec.is_async("execute"):
                return await self._execute_in_thread(state, job, loaded, running, timeout)
            async with _deadline(state, "execute", timeout):
                result = await self._user(state, running, _async(job).execute(loaded))
            return Executed(dump(result))

    async def _execute_in_thread(
        self,
        state: AttemptState,
        job: PhasedJob,
        loaded: Any,
        running: Running,
        seconds: float | None,
    ) -> Executed:
        """A sync execute in the pool. Neither its timeout nor a cancel of the caller
        stops waiting for it: the attempt ends when its thread returns."""
        future = asyncio.get_running_loop().run_in_executor(self.pool, job.execute, loaded)
        stop: BaseException | None = None
        try:
            done, _ = await asyncio.wait({future}, timeout=seconds)
            if not done:
                stop = _overran(state, running, seconds or 0)
        except asyncio.CancelledError as exc:
            stop = exc
        if stop is None:
            return Executed(state.job_cls.dump_result(future.result()))
        result, error, held = await _outlive(future, self.abandon)
        stop = held or stop  # a cancel of the caller wins over the timeout
        if error is not None:
            raise stop from error
        return Executed(state.job_cls.dump_result(result), stop)

    async def checkpoint(self, state: AttemptState, result: Any, *, finish: bool = False) -> Any:
        """Store the result so a failed record never repeats execute (see
        :meth:`SyncPhases.checkpoint`)."""
        return await self.write(_checkpoint, state, result, finish)

    async def record(self, state: AttemptState, job: PhasedJob) -> Execution:
        """RECORD; a sync ``record`` runs in a worker thread on the sync engine."""
        spec = state.job_cls.spec
        if spec.runs("record") and not spec.is_async("record"):
            execution: Execution = await self._in_thread(self._sync_phases().record, state, job)
            return execution
        if not spec.runs("record"):
            with phase_context(state, "record"):
                ended = await self.write(_finish_sync, state)
                if ended is None:
                    raise lease_lost(state, "record")
                return ended
        async with self._open(state, "record") as (session, io):
            result = state.job_cls.restore_result(state.checkpoint)
            async with _deadline(state, "record", state.job_cls.record_timeout):
                await self._timed(state, _async(job).record(session, result))
            await session.flush()
            return await self._finish(io, state)

    async def _finish(self, io: _AsyncIO, state: AttemptState) -> Execution:
        execution = await io.run(
            q.end_attempt,
            state.lease,
            "finish",
            state.success_values(),
            state.ledger_row(SUCCEEDED),
        )
        if execution is None:
            raise lease_lost(state, "record")
        assert isinstance(execution, Execution)
        return execution

    async def end(self, state: AttemptState, end: End) -> Execution | None:
        """Write a failed attempt in a fresh transaction (the phase's may be unusable)."""
        args = _end_args(state, end)
        if args["insert_if_missing"] is None:
            return await self.write(lambda c: q.end_attempt(c, state.lease, **args))
        return await self.run(lambda c: q.end_attempt(c, state.lease, **args))


async def _outlive(
    future: asyncio.Future[Any], abandon: asyncio.Event
) -> tuple[Any, BaseException | None, asyncio.CancelledError | None]:
    """Wait for a thread's future whatever happens: (result, its error, a held-back cancel).

    A thread cannot be stopped, so neither can this wait: cancels of the caller are held
    back until the thread returns. Only a worker shutting down for good (``abandon``,
    after its grace period) stops waiting: :class:`Abandoned` then leaves the execution
    as it is, its lease to expire and the reaper to take it.
    """
    held: asyncio.CancelledError | None = None
    gone = asyncio.ensure_future(abandon.wait())
    try:
        while not future.done():
            if abandon.is_set():
                raise Abandoned("the worker stopped waiting for this thread at shutdown")
            try:
                await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError as exc:
                held = held or exc
    finally:
        gone.cancel()
    if future.cancelled():
        return None, asyncio.CancelledError(), held
    error = future.exception()
    return (future.result() if error is None else None), error, held


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


def _claim(conn: Connection, state: AttemptState, early_s: float) -> dict[str, Any] | None:
    """The claim of ``state``'s next attempt (both runners)."""
    return q.claim_one(
        conn,
        state.execution_id,
        worker=state.lease.worker,
        lease_s=state.lease.seconds,
        no_load=_no_load(state),
        concurrency=state.concurrency,
        early_s=early_s,
    )


def _finish_sync(conn: Conn, state: AttemptState) -> Execution | None:
    """The success write of a job without a record phase of its own."""
    return q.end_attempt(
        conn, state.lease, "finish", state.success_values(), state.ledger_row(SUCCEEDED)
    )


@contextlib.contextmanager
def _writing(engine: Engine, autocommit: Engine | None, bare: bool) -> Iterator[Conn]:
    """Where a write that is atomic by itself runs (both runners): a bare checkout of a
    dedicated autocommit engine, a Connection of an autocommit view of the caller's
    engine (its isolation level is applied only through a Connection), or, on SQLite,
    a transaction of its own."""
    if bare and autocommit is not None:
        with Checkout(autocommit) as checkout:
            yield checkout
    elif autocommit is not None:
        with autocommit.connect() as conn:
            yield conn
    else:
        with engine.begin() as conn:
            yield conn


_E = TypeVar("_E", Engine, AsyncEngine)
T = TypeVar("T")


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
