"""AsyncJobRunner: the async twin. Async phases on the loop, sync phases in threads."""

from __future__ import annotations

import asyncio
import builtins
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Self

import tenacity
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _queries as q
from ._attempt import AttemptState, utcnow
from ._base import (
    RETRYABLE_BY_HAND,
    RETRYING,
    IdLike,
    StatusFilter,
    _as_id,
    _full_url,
    _interval,
    _missing,
    _prune_plan,
    _RunnerBase,
    _since,
    _statuses,
    _StopRun,
)
from ._engine import (
    database_url,
    display_url,
    is_memory_sqlite,
    make_async_engine,
    make_sync_engine,
)
from ._errors_db import WrongEventLoop
from ._exceptions import (
    ConfigurationError,
    LeaseLost,
)
from ._inflight import AsyncHeartbeat, Running
from ._job import PhasedJob
from ._monitor import LoopHealth, LoopMonitor
from ._phases import AsyncPhases, SyncPhases, make_job
from ._records import Attempt, Execution, JobStats
from ._registry import JobRef, Registry
from ._session import SessionScope


class AsyncJobRunner(_RunnerBase):
    """Runs jobs on the running event loop with an async engine (asyncpg or aiosqlite).

    Async phases run on the loop; a sync ``execute`` runs in a worker thread, and sync
    ``load``/``record`` run in a worker thread on a sync engine for the same database,
    so the loop never blocks. Same verbs as :class:`JobRunner`; close with ``aclose()``.
    Create it on the event loop that will use it (its async engine belongs to that loop).

    Args:
        url: database URL; the driver is chosen for the runner (``sqlite:///x.db``,
            ``postgresql://...``). Default: ``JOBRUNNER_DATABASE_URL``, else the
            embedded ``sqlite:///jobrunner.db``.
        engine: an engine of your own instead of ``url`` (SQLite tuning is then yours).
        registry: where job names and handler paths are looked up (default: the
            process-wide :data:`default_registry`).
        worker_id: this worker's name in leases and the ledger (default host:pid:random).
        inline_retry_max_wait: retry waits up to this many seconds are slept inline;
            longer ones end the run ``retrying`` for :meth:`run_due` (default 5).
        on_retry_scheduled: called with the execution when a long wait left it
            ``retrying`` (integrations schedule it, e.g. as a Celery countdown).
        heartbeat_interval: seconds between lease refreshes of running executions, in
            one short transaction each (default 10; :meth:`reap` uses 3x by default).
        slow_phase_threshold: log phases longer than this many seconds (None: never).
        loop_lag_threshold_ms: an async phase step holding the loop this long is logged
            with its execution and phase; the loop monitor logs lag above it (default 100).
        strict_loop: fail such a phase with :class:`LoopBlocked` instead (tests, staging).
        monitor_loop: run the :class:`LoopMonitor` while executions are in flight.
        loop_monitor_interval: the monitor's sampling interval in seconds (default 0.05).
        **engine_options: passed to ``create_async_engine`` (``pool_size``, ...).
    """

    _runner_name = "AsyncJobRunner"

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: AsyncEngine | None = None,
        registry: Registry | None = None,
        worker_id: str | None = None,
        inline_retry_max_wait: float = 5.0,
        on_retry_scheduled: Callable[[Execution], None] | None = None,
        heartbeat_interval: float = 10.0,
        slow_phase_threshold: float | None = 10.0,
        loop_lag_threshold_ms: float = 100.0,
        strict_loop: bool = False,
        monitor_loop: bool = True,
        loop_monitor_interval: float = 0.05,
        **engine_options: Any,
    ) -> None:
        super().__init__(
            registry=registry,
            worker_id=worker_id,
            inline_retry_max_wait=inline_retry_max_wait,
            on_retry_scheduled=on_retry_scheduled,
            slow_phase_threshold=slow_phase_threshold,
        )
        self.engine = (
            engine if engine is not None else make_async_engine(database_url(url), **engine_options)
        )
        self.url = display_url(self.engine.url)
        self._engine_options = engine_options
        self._sync: SyncPhases | None = None
        self._sync_lock = threading.Lock()
        self._autocommit_engine = (
            make_async_engine(
                _full_url(self.engine),
                isolation_level="AUTOCOMMIT",
                pool_reset_on_return=None,  # autocommit: no transaction to roll back
                **engine_options,
            )
            if engine is None and self.engine.dialect.name == "postgresql"
            else None
        )
        self._phases = AsyncPhases(
            self.engine, self.url, self._sync_phases, self._autocommit_engine
        )
        self._heartbeat_interval = _interval(heartbeat_interval)
        self._heartbeat = AsyncHeartbeat(
            self._inflight, self._phases.tx, _interval(heartbeat_interval)
        )
        if monitor_loop or strict_loop:
            self._phases.health = LoopHealth(threshold_ms=loop_lag_threshold_ms, strict=strict_loop)
        self.loop_monitor: LoopMonitor | None = None
        if monitor_loop:
            self.loop_monitor = LoopMonitor(
                interval=loop_monitor_interval, threshold_ms=loop_lag_threshold_ms
            )
            self.loop_monitor.add_listener(self._inflight.note_lag)

    # -- lifecycle ---------------------------------------------------------------------

    async def create_schema(self) -> None:
        """Create the jobrunner tables if missing (quick start; use migrations in prod)."""
        async with self._phases.tx() as conn:
            await conn.run_sync(q.create_schema)

    async def aclose(self) -> None:
        """Stop the heartbeat and dispose of the engines' connections."""
        await self._heartbeat.stop()
        if self.loop_monitor is not None:
            await self.loop_monitor.stop()
        await self.engine.dispose()
        if self._autocommit_engine is not None:
            await self._autocommit_engine.dispose()
        if self._sync is not None:
            self._sync.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- submitting and running ----------------------------------------------------------

    async def submit(
        self,
        job: JobRef,
        args: Any = None,
        *,
        idempotency_key: str | None = None,
        triggered_by: str = "api",
        external_id: str | None = None,
        due: bool = True,
    ) -> uuid.UUID:
        """Validate ``args`` and store a pending execution; returns its id.

        With ``idempotency_key``, a second submit returns the first execution's id.
        ``due=False`` leaves it to a queue (Celery) instead of :meth:`run_due`.
        """
        _, row = self._submission(
            job,
            args,
            idempotency_key=idempotency_key,
            triggered_by=triggered_by,
            external_id=external_id,
            due=due,
        )
        async with self._phases.tx() as conn:
            if idempotency_key is not None:
                eid: uuid.UUID = await conn.run_sync(q.insert_unique, row)
                return eid
            await conn.run_sync(q.insert_execution, row)
        return uuid.UUID(str(row["id"]))

    async def run(
        self,
        job: JobRef,
        args: Any = None,
        *,
        idempotency_key: str | None = None,
        triggered_by: str = "inline",
        external_id: str | None = None,
    ) -> Execution:
        """Submit and run inline, retrying per the job's policy; returns the execution."""
        job_cls, submit_first = self._run_target(job, idempotency_key)
        if submit_first:
            return await self.run_execution(
                await self.submit(
                    job_cls,
                    args,
                    idempotency_key=idempotency_key,
                    triggered_by=triggered_by,
                    external_id=external_id,
                )
            )
        return await self._drive(
            self._inline(job_cls, args, triggered_by=triggered_by, external_id=external_id)
        )

    async def run_execution(self, execution_id: IdLike, *, job: JobRef | None = None) -> Execution:
        """Claim and run a pending or retrying execution; finished ones are returned as is.

        ``job`` is an optional hint that saves reading the row first (see JobRunner).
        """
        hinted = self._hinted(job)
        if hinted is not None:
            eid = _as_id(execution_id)
            async with self._phases.tx(single=True) as conn:
                row = await conn.run_sync(
                    lambda c: q.claim(c, eid, worker=self.worker_id, now=utcnow(), phase="load")
                )
            if row is None:
                return await self.get(eid)
            return await self._drive(self._claimed_one(hinted, row))
        current = await self.get(execution_id)
        job_cls = self._claimable(current)
        if job_cls is None:
            return current
        return await self._claim_and_drive(job_cls, current)

    async def run_due(self, *, limit: int = 100) -> builtins.list[Execution]:
        """Claim and run executions whose time has come (retries, plain submits)."""
        jobs, limits = self._runnable_jobs(), self._limits()
        async with self._phases.tx() as conn:
            rows = await conn.run_sync(
                lambda c: q.claim_due(
                    c, worker=self.worker_id, now=utcnow(), limit=limit, jobs=jobs, limits=limits
                )
            )
        states = self._claimed(rows)
        with self._inflight.hold(states):
            self._heartbeat.ensure_running()
            return [await self._drive(state) for state in states]

    # -- reading -------------------------------------------------------------------------

    async def get(self, execution_id: IdLike) -> Execution:
        """One execution by id; :class:`ExecutionNotFound` if there is none."""
        eid = _as_id(execution_id)
        async with self._phases.tx(single=True) as conn:
            execution = await conn.run_sync(q.get, eid)
        return execution if execution is not None else _missing(eid)

    async def list(
        self,
        *,
        status: StatusFilter = None,
        job: str | None = None,
        since: datetime | timedelta | None = None,
        limit: int = 100,
    ) -> builtins.list[Execution]:
        """Executions newest first; ``since`` is a datetime or a timedelta back from now."""
        statuses, after = _statuses(status), _since(since)
        async with self._phases.tx() as conn:
            return await conn.run_sync(
                lambda c: q.list_executions(c, status=statuses, job=job, since=after, limit=limit)
            )

    async def attempts(self, execution_id: IdLike) -> builtins.list[Attempt]:
        """The attempt ledger of one execution, oldest first."""
        eid = _as_id(execution_id)
        async with self._phases.tx() as conn:
            if await conn.run_sync(q.get, eid) is None:
                _missing(eid)
            return await conn.run_sync(q.list_attempts, eid)

    async def stats(self, since: datetime | timedelta | None = None) -> builtins.list[JobStats]:
        """Counts and p50/p95 durations per job and status, for executions created since."""
        after = _since(since)
        async with self._phases.tx() as conn:
            return await conn.run_sync(q.job_stats, since=after)

    # -- operator actions ------------------------------------------------------------------

    async def cancel(self, execution_id: IdLike) -> Execution:
        """Cancel an execution; returns it.

        A pending or retrying execution is ``cancelled`` at once. A running one is flagged:
        its worker stops it (an async phase at its next ``await``, sync code at the next
        phase boundary or when it checks ``self.cancelled()``), at once when it runs in
        this runner, else at its next heartbeat. Finished executions raise
        :class:`InvalidTransition`.
        """
        eid = _as_id(execution_id)
        async with self._phases.tx() as conn:
            execution = await conn.run_sync(q.cancel, eid, utcnow())
            current = None if execution else await conn.run_sync(q.get, eid)
        return self._cancel_result(eid, execution, current)

    async def retry(self, execution_id: IdLike, *, triggered_by: str = "retry") -> Execution:
        """Put a failed, timed-out, cancelled or abandoned execution back to pending."""
        current = await self.get(execution_id)
        budget = self._retry_budget(current)
        async with self._phases.tx() as conn:
            execution = await conn.run_sync(
                lambda c: q.requeue(
                    c,
                    current.id,
                    from_statuses=RETRYABLE_BY_HAND,
                    max_attempts=budget,
                    triggered_by=triggered_by,
                    now=utcnow(),
                )
            )
        return self._retry_result(current.id, execution, current)

    async def reap(
        self, lease_timeout: float | None = None, *, limit: int = 100
    ) -> builtins.list[Execution]:
        """Recover executions whose worker died (see :meth:`JobRunner.reap`)."""
        seconds = self._lease_timeout(lease_timeout)
        async with self._phases.tx() as conn:
            reaped: builtins.list[Execution] = await conn.run_sync(
                lambda c: q.reap(c, now=utcnow(), lease_timeout=seconds, limit=limit)
            )
        self._log_reaped(reaped)
        return reaped

    async def prune(
        self,
        older_than: datetime | timedelta,
        *,
        status: StatusFilter = None,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete finished executions older than ``older_than``, one batch per transaction."""
        before, statuses = _prune_plan(older_than, status, batch_size)
        deleted = 0
        while True:
            async with self._phases.tx() as conn:
                batch = await conn.run_sync(
                    q.prune_batch, before=before, statuses=statuses, limit=batch_size
                )
            deleted += batch
            if batch and progress is not None:
                progress(deleted)
            if batch < batch_size:
                return deleted

    # -- the state machine's async edge --------------------------------------------------------

    def _sync_phases(self) -> SyncPhases:
        """The sync engine for sync phases, created on first need (thread-safe)."""
        with self._sync_lock:
            if self._sync is None:
                url = self.engine.url
                if is_memory_sqlite(url):
                    raise ConfigurationError(
                        "sync load/record and `with self.session()` under AsyncJobRunner run "
                        "in a worker thread on a second, sync engine, and an in-memory SQLite "
                        "database cannot be shared between engines; use a file "
                        "('sqlite+aiosqlite:///jobs.db') or make those phases async"
                    )
                self._sync = SyncPhases(
                    make_sync_engine(_full_url(self.engine), **self._engine_options), self.url
                )
            return self._sync

    async def _claim_and_drive(self, job_cls: type[PhasedJob], current: Execution) -> Execution:
        concurrency = self._concurrency(job_cls, current)
        async with self._phases.tx(single=concurrency is None) as conn:
            row = await conn.run_sync(
                lambda c: q.claim(
                    c,
                    current.id,
                    worker=self.worker_id,
                    now=utcnow(),
                    phase="load",
                    concurrency=concurrency,
                )
            )
        if row is None:
            return await self.get(current.id)
        return await self._drive(AttemptState.claimed(job_cls, row, worker=self.worker_id))

    def _scope(self) -> SessionScope:
        return SessionScope(
            lambda: self._sync_phases().sessions, self._phases.sessions, self._runner_name
        )

    async def _drive(self, state: AttemptState) -> Execution:
        phases = self._phases

        async def before_sleep(retry: tenacity.RetryCallState) -> None:
            wait = retry.upcoming_sleep
            self._after_failure(state, await phases.finish_failure(state, RETRYING, wait), wait)

        try:
            if state.last_attempt:  # nothing to retry: skip tenacity's bookkeeping
                return await self._attempt(state)
            async for attempt in state.policy.async_retrying(
                done_attempts=state.number - 1,
                max_attempts=state.max_attempts,
                before_sleep=before_sleep,
            ):
                with attempt:
                    return await self._attempt(state)
        except _StopRun as stop:
            self._scheduled(stop.execution)
            return stop.execution or await self.get(state.execution_id)
        except LeaseLost as exc:
            self._lost(state, exc)
            return await self.get(state.execution_id)
        except BaseException:
            if state.error is None or isinstance(state.failure, WrongEventLoop):
                raise
            execution = await phases.finish_failure(state, state.final_status(), None)
            self._log_end(state, execution)
            if not isinstance(state.failure, Exception):
                raise
            return execution or await self.get(state.execution_id)
        raise AssertionError("unreachable: tenacity ends with a result or an exception")

    async def _attempt(self, state: AttemptState) -> Execution:
        phases = self._phases
        if state.needs_claim:
            row = await phases.claim(state)
            if row is None:
                raise _StopRun(None)
            state.adopt_claim(row)
        state.slow_phase_ms = self._slow_phase_ms
        running = self._inflight.running_for(state)
        job = make_job(state, self._scope, running.cancel_event)
        # The phases run in a child task, so a cancel or a lost lease can interrupt them at
        # their next await while this task stays free to write the outcome.
        task = asyncio.ensure_future(self._phases_of(state, job, running))
        running.interrupt = task.cancel
        with self._inflight.track(running):
            self._heartbeat.ensure_running()
            if self.loop_monitor is not None:
                self.loop_monitor.start(stop_when=self._inflight.idle)
            try:
                return await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if running.reason is None or (current is not None and current.cancelling()):
                    state.capture(asyncio.CancelledError("the worker was interrupted"))
                    raise
                error = running.error()
                state.capture(error, replace=True)
                raise error from None

    async def _phases_of(self, state: AttemptState, job: PhasedJob, running: Running) -> Execution:
        phases = self._phases
        try:
            running.check()  # a held lease may have been lost while it waited
            if state.resume_from == "load":
                loaded = await phases.load(state, job)
                running.check()
                result = await phases.execute(state, job, loaded)
                running.check()
                await phases.checkpoint(state, result)
            return await phases.record(state, job)
        except BaseException as exc:
            state.capture(exc)
            raise
