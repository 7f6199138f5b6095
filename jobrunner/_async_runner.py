"""AsyncJobRunner: the async twin. Async phases on the loop, sync phases in threads."""

from __future__ import annotations

import asyncio
import builtins
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Self, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from . import _queries as q
from ._attempt import AttemptState
from ._base import (
    DEFAULT_MAX_ARGS_BYTES,
    IdLike,
    StatusFilter,
    _as_id,
    _full_url,
    _missing,
    _prune_plan,
    _RunnerBase,
    _seconds,
    _since,
    _statuses,
)
from ._engine import (
    database_url,
    display_url,
    drop_if_empty,
    is_memory_sqlite,
    make_async_engine,
    make_sync_engine,
)
from ._exceptions import ConfigurationError
from ._flow import Checkpoint, Claim, End, Execute, Fetch, Load, Record, Request, Sleep
from ._hooks import Instrument
from ._inflight import AsyncHeartbeat, Running
from ._job import PhasedJob
from ._monitor import LoopHealth, LoopMonitor
from ._phases import AsyncPhases, SyncPhases, make_job
from ._records import Attempt, AuditEntry, Execution, JobStats, QueueState
from ._registry import JobRef, Registry
from ._session import SessionScope, caller_connection, on_commit
from ._threads import DaemonPool
from ._worker import AsyncWorker, WorkOptions

T = TypeVar("T")

#: submit_many validates args on the loop for at most this long (seconds) at a time.
#: A worker thread would not spare the loop: validation holds the GIL, and a loop that
#: waits for it after each wake-up was measured starved for 40-150 ms at a time.
_VALIDATION_SLICE = 0.002


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
        inline_retry_max_wait: retry waits up to this many seconds are slept inline by
            :meth:`run`; longer ones end the run ``retrying`` for a worker (default 5).
        on_retry_scheduled: called with the execution when a long wait left it
            ``retrying`` (integrations schedule it, e.g. as a Celery countdown).
        heartbeat_interval: seconds between lease renewals of running executions, in
            one short transaction each (default 10).
        lease_duration: how long a claim (and each renewal) holds an execution, by the
            database's clock (default three heartbeat intervals; at least two).
        max_threads: the runner's own pool of threads for sync phases (default 32; a
            worker grows it to its concurrency). Never the loop's default executor.
        max_args_bytes: args larger than this as JSON are refused at submit with
            :class:`InvalidArgs` (default 1,000,000; None: no limit).
        slow_phase_threshold: log phases longer than this many seconds (None: never).
        instruments: what hears about executions (tracing, metrics: see
            :mod:`jobrunner.contrib.otel`, :mod:`jobrunner.contrib.prometheus`);
            default: those installed for the process, plus OpenTelemetry when the
            application configured a tracer provider. ``[]``: none.
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
        lease_duration: float | None = None,
        max_threads: int = 32,
        max_args_bytes: int | None = DEFAULT_MAX_ARGS_BYTES,
        slow_phase_threshold: float | None = 10.0,
        instruments: Iterable[Instrument] | None = None,
        loop_lag_threshold_ms: float = 100.0,
        strict_loop: bool = False,
        monitor_loop: bool = True,
        loop_monitor_interval: float = 0.05,
        **engine_options: Any,
    ) -> None:
        super().__init__(
            max_args_bytes=max_args_bytes,
            registry=registry,
            worker_id=worker_id,
            inline_retry_max_wait=inline_retry_max_wait,
            on_retry_scheduled=on_retry_scheduled,
            slow_phase_threshold=slow_phase_threshold,
            heartbeat_interval=heartbeat_interval,
            lease_duration=lease_duration,
            max_threads=max_threads,
            instruments=instruments,
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
        self._pool = DaemonPool(self._max_threads, name="jobrunner-async")
        self._phases = AsyncPhases(
            self.engine, self.url, self._sync_phases, self._pool, self._autocommit_engine
        )
        self._heartbeat = AsyncHeartbeat(self._inflight, self._phases.tx, self._heartbeat_interval)
        if monitor_loop or strict_loop:
            self._phases.health = LoopHealth(threshold_ms=loop_lag_threshold_ms, strict=strict_loop)
        self.loop_monitor: LoopMonitor | None = None
        if monitor_loop:
            self.loop_monitor = LoopMonitor(
                interval=loop_monitor_interval, threshold_ms=loop_lag_threshold_ms
            )
            for instrument in self._instruments:
                self.loop_monitor.add_listener(instrument.loop_lag)

    # -- lifecycle ---------------------------------------------------------------------

    async def create_schema(self) -> None:
        """Create the jobrunner tables if missing (quick start; use migrations in prod)."""
        async with self._phases.tx() as conn:
            await conn.run_sync(q.create_schema)

    async def aclose(self) -> None:
        """Stop the heartbeat and the thread pool; dispose of the engines' connections."""
        await self._heartbeat.stop()
        if self.loop_monitor is not None:
            await self.loop_monitor.stop()
        self._pool.shutdown(wait=False)
        await self.engine.dispose()
        if self._autocommit_engine is not None:
            await self._autocommit_engine.dispose()
        if self._sync is not None:
            self._sync.engine.dispose()
        drop_if_empty(self.engine.sync_engine)

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
        unique_for: float | timedelta | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        queue: str | None = None,
        priority: int | None = None,
        triggered_by: str = "api",
        external_id: str | None = None,
        session: AsyncSession | AsyncConnection | None = None,
    ) -> uuid.UUID:
        """Validate ``args`` and store a pending execution; returns its id (see
        :meth:`JobRunner.submit`). ``session`` is an ``AsyncSession`` or
        ``AsyncConnection`` of yours: the execution commits (or not) with your writes."""
        _, row = self._submission(
            job,
            args,
            idempotency_key=idempotency_key,
            triggered_by=triggered_by,
            external_id=external_id,
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
        )
        window = _seconds(unique_for, "unique_for")

        def write(conn: Connection) -> uuid.UUID:
            return q.submit_row(conn, row, unique_for=window)

        if session is not None:
            execution_id: uuid.UUID = await _in_callers_transaction(session, self.engine, write)
            on_commit(_sync_of(session), self._submitted)
            return execution_id
        if row.get("idempotency_key") is None:  # one INSERT, atomic alone: see write()
            await self._phases.write(q.insert_execution, row)
            execution_id = row["id"]
        else:
            execution_id = await self._phases.run(write, single=True)
        self._submitted()
        return execution_id

    async def submit_many(
        self,
        job: JobRef,
        args_list: Iterable[Any],
        *,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        queue: str | None = None,
        priority: int | None = None,
        triggered_by: str = "api",
        session: AsyncSession | AsyncConnection | None = None,
    ) -> builtins.list[uuid.UUID]:
        """Store one pending execution per args in one transaction (see
        :meth:`JobRunner.submit_many`); their ids.

        Validating thousands of args is CPU work: it runs on the loop in slices of at most
        :data:`_VALIDATION_SLICE` seconds, and other tasks run between them.
        """
        plan = self._submissions(
            job,
            triggered_by=triggered_by,
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
        )
        rows: builtins.list[dict[str, Any]] = []
        clock = time.perf_counter
        slice_ends = clock() + _VALIDATION_SLICE
        for index, args in enumerate(args_list):
            rows.append(plan.row(index, args))
            if clock() > slice_ends:
                await asyncio.sleep(0)
                slice_ends = clock() + _VALIDATION_SLICE
        plan.built(rows)

        def write(conn: Connection) -> None:
            q.insert_many(conn, rows)

        if session is not None:
            await _in_callers_transaction(session, self.engine, write)
            on_commit(_sync_of(session), self._submitted)
        else:
            async with self._phases.tx() as conn:
                await conn.run_sync(write)
            self._submitted()
        return [row["id"] for row in rows]

    async def run(
        self,
        job: JobRef,
        args: Any = None,
        *,
        idempotency_key: str | None = None,
        unique_for: float | timedelta | None = None,
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
                    unique_for=unique_for,
                    triggered_by=triggered_by,
                    external_id=external_id,
                )
            )
        return await self._drive(
            self._inline(job_cls, args, triggered_by=triggered_by, external_id=external_id)
        )

    async def run_execution(self, execution_id: IdLike, *, job: JobRef | None = None) -> Execution:
        """Claim and run a pending or retrying execution that is due (see JobRunner)."""
        hinted = self._hinted(job)
        eid = _as_id(execution_id)
        if hinted is not None:
            row = await self._claim(eid, hinted, None)
            if row is None:
                return await self.get(eid)
            return await self._drive(self._claimed_one(hinted, row))
        current = await self.get(eid)
        job_cls = self._claimable(current)
        if job_cls is None:
            return current
        row = await self._claim(eid, job_cls, self._concurrency(job_cls, current))
        return await self.get(eid) if row is None else await self._drive(self._state(job_cls, row))

    async def run_due(
        self, *, limit: int = 100, concurrency: int = 8, queues: Sequence[str] | None = None
    ) -> builtins.list[Execution]:
        """Run executions that are due now, ``concurrency`` at a time, claiming each just
        before it runs; at most ``limit``. Returns them in the order they finished."""
        return await self._work(
            WorkOptions.for_run_due(limit=limit, concurrency=concurrency, queues=queues)
        )

    async def work(
        self,
        *,
        concurrency: int = 8,
        queues: Sequence[str] | None = None,
        until_idle: bool = False,
        poll_interval: float = 1.0,
        grace_period: float = 30.0,
        reap_interval: float | None = None,
        handle_signals: bool = False,
    ) -> None:
        """Run executions as they come due, ``concurrency`` at a time (see JobRunner.work)."""
        await self._work(
            self._work_options(
                concurrency=concurrency,
                queues=queues,
                until_idle=until_idle,
                poll_interval=poll_interval,
                grace_period=grace_period,
                reap_interval=reap_interval,
                handle_signals=handle_signals,
            )
        )

    async def _work(self, options: WorkOptions) -> builtins.list[Execution]:
        if self._worker is not None:
            raise ConfigurationError(
                "this AsyncJobRunner is already running work() or run_due(); one at a time per "
                "runner: call stop_work() first, or give the second loop a runner of its own"
            )
        self._pool.max_workers = max(self._pool.max_workers, options.concurrency)
        self._worker = AsyncWorker(self, options)
        try:
            return await self._worker.run()
        finally:
            self._worker = None

    # -- reading -------------------------------------------------------------------------

    async def get(self, execution_id: IdLike) -> Execution:
        """One execution by id; :class:`ExecutionNotFound` if there is none."""
        eid = _as_id(execution_id)
        async with self._phases.tx(single=True, read=True) as conn:
            execution = await conn.run_sync(q.get, eid)
        return execution if execution is not None else _missing(eid)

    async def list(
        self,
        *,
        status: StatusFilter = None,
        job: str | None = None,
        queue: str | None = None,
        since: datetime | timedelta | None = None,
        limit: int = 100,
    ) -> builtins.list[Execution]:
        """Executions newest first; ``since`` is a datetime or a timedelta back from now."""
        statuses, after = _statuses(status), _since(since)
        async with self._phases.tx(read=True) as conn:
            return await conn.run_sync(
                lambda c: q.list_executions(
                    c, status=statuses, job=job, queue=queue, since=after, limit=limit
                )
            )

    async def attempts(self, execution_id: IdLike) -> builtins.list[Attempt]:
        """The attempt ledger of one execution, oldest first."""
        eid = _as_id(execution_id)
        async with self._phases.tx(read=True) as conn:
            if await conn.run_sync(q.get, eid) is None:
                _missing(eid)
            return await conn.run_sync(q.list_attempts, eid)

    async def stats(self, since: datetime | timedelta | None = None) -> builtins.list[JobStats]:
        """Counts and p50/p95 durations per job and status, for executions created since."""
        after = _since(since)
        async with self._phases.tx(read=True) as conn:
            return await conn.run_sync(q.job_stats, since=after)

    # -- operator actions ------------------------------------------------------------------

    async def cancel(self, execution_id: IdLike, *, actor: str = "api") -> Execution:
        """Cancel an execution; returns it (see :meth:`JobRunner.cancel`)."""
        eid = _as_id(execution_id)
        async with self._phases.tx() as conn:
            execution = await conn.run_sync(lambda c: q.cancel(c, eid, actor=actor))
            current = None if execution else await conn.run_sync(q.get, eid)
        return self._cancel_result(eid, execution, current)

    async def retry(
        self, execution_id: IdLike, *, triggered_by: str = "retry", actor: str = "api"
    ) -> Execution:
        """Put a failed, timed-out or cancelled execution back to pending (see JobRunner)."""
        current = await self.get(execution_id)
        budget = self._retry_budget(current)
        async with self._phases.tx() as conn:
            execution = await conn.run_sync(
                lambda c: q.requeue(
                    c, current.id, max_attempts=budget, triggered_by=triggered_by, actor=actor
                )
            )
        if execution is not None:
            self._submitted()
        return self._retry_result(current.id, execution, current)

    # -- queues ----------------------------------------------------------------------------

    async def pause_queue(self, queue: str, *, actor: str = "api") -> bool:
        """Stop workers claiming from ``queue`` (see :meth:`JobRunner.pause_queue`)."""
        async with self._phases.tx() as conn:
            return await conn.run_sync(lambda c: q.set_paused(c, queue, paused=True, actor=actor))

    async def resume_queue(self, queue: str, *, actor: str = "api") -> bool:
        """Let workers claim from ``queue`` again (see :meth:`JobRunner.resume_queue`)."""
        async with self._phases.tx() as conn:
            changed: bool = await conn.run_sync(
                lambda c: q.set_paused(c, queue, paused=False, actor=actor)
            )
        if changed:
            self._submitted()
        return changed

    async def queues(self) -> builtins.list[QueueState]:
        """Queues ever paused or resumed, with their pause."""
        async with self._phases.tx(read=True) as conn:
            return await conn.run_sync(q.queue_states)

    async def paused_queues(self) -> set[str]:
        """Names of the queues paused now."""
        return {state.name for state in await self.queues() if state.paused}

    async def audit(
        self, execution_id: IdLike | None = None, *, limit: int = 100
    ) -> builtins.list[AuditEntry]:
        """Operator actions (retry, cancel, pause, resume) newest first, all or on one."""
        eid = None if execution_id is None else _as_id(execution_id)
        async with self._phases.tx(read=True) as conn:
            return await conn.run_sync(lambda c: q.list_audit(c, execution_id=eid, limit=limit))

    async def reap(self, *, limit: int = 100) -> builtins.list[Execution]:
        """Recover running executions whose lease expired (see :meth:`JobRunner.reap`)."""
        async with self._phases.tx() as conn:
            reaped: builtins.list[Execution] = await conn.run_sync(lambda c: q.reap(c, limit=limit))
        self._log_reaped(reaped)
        if any(e.status.value == "retrying" for e in reaped):
            self._submitted()
        return reaped

    async def prune(
        self,
        older_than: datetime | timedelta,
        *,
        status: StatusFilter = None,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
        dry_run: bool = False,
    ) -> int:
        """Delete finished executions older than ``older_than``, one batch per transaction
        (``dry_run``: only count them). See :meth:`JobRunner.prune`."""
        before, statuses = _prune_plan(older_than, status, batch_size)
        if dry_run:
            async with self._phases.tx(read=True) as conn:
                counted: int = await conn.run_sync(
                    lambda c: q.count_prunable(c, before=before, statuses=statuses)
                )
                return counted
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

    async def _claim(
        self,
        execution_id: uuid.UUID,
        job_cls: type[PhasedJob],
        concurrency: tuple[str, str, int] | None,
    ) -> dict[str, Any] | None:
        no_load = [] if job_cls.spec.runs("load") else [job_cls.name]
        async with self._phases.tx(single=concurrency is None) as conn:
            return await conn.run_sync(
                lambda c: q.claim_one(
                    c,
                    execution_id,
                    worker=self.worker_id,
                    lease_s=self.lease_duration,
                    no_load=no_load,
                    concurrency=concurrency,
                )
            )

    async def _claim_batch(
        self, limit: int, queues: Sequence[str] | None
    ) -> builtins.list[AttemptState]:
        """Claim up to ``limit`` due executions this runner can run (the worker's claim)."""
        jobs, limits, no_load = self._runnable_jobs(), self._limits(), self._no_load_jobs()
        # Without concurrency limits the claim is one statement: autocommit on PostgreSQL.
        async with self._phases.tx(single=not limits) as conn:
            rows = await conn.run_sync(
                lambda c: q.claim_batch(
                    c,
                    worker=self.worker_id,
                    lease_s=self.lease_duration,
                    limit=limit,
                    jobs=jobs,
                    queues=queues,
                    no_load=no_load,
                    limits=limits,
                )
            )
        return [self._claimed(row) for row in rows]

    def _scope(self) -> SessionScope:
        return SessionScope(
            lambda: self._sync_phases().sessions, self._phases.sessions, self._runner_name
        )

    async def _drive(self, state: AttemptState, *, worker: bool = False) -> Execution:
        """Perform the flow's requests until it returns the execution."""
        running = Running(state=state, interrupt=_interrupter())
        flow = self._flow(state, running, worker=worker)
        with self._inflight.track(running):
            self._heartbeat.ensure_running()
            if self.loop_monitor is not None:
                self.loop_monitor.start(stop_when=self._inflight.idle)
            answer: Any = None
            error: BaseException | None = None
            while True:
                try:
                    request = flow.throw(error) if error is not None else flow.send(answer)
                except StopIteration as stop:
                    execution: Execution = stop.value
                    return execution
                answer, error = None, None
                try:
                    answer = await self._perform(request, state, running)
                except BaseException as exc:
                    error = exc

    async def _perform(self, request: Request, state: AttemptState, running: Running) -> Any:
        phases = self._phases
        if isinstance(request, Execute):
            return await phases.execute(state, self._job(state, running), request.loaded, running)
        if isinstance(request, Checkpoint):
            return await phases.checkpoint(state, request.result, finish=request.finish)
        if isinstance(request, Load):
            return await phases.load(state, self._job(state, running), running)
        if isinstance(request, Record):
            if request.finished is not None:  # the checkpoint ended the attempt
                return request.finished
            return await phases.record(state, self._job(state, running))
        if isinstance(request, End):
            return await phases.end(state, request)
        if isinstance(request, Claim):
            return await phases.claim(state, request.early_s)
        if isinstance(request, Sleep):
            await asyncio.sleep(request.seconds)
            return None
        assert isinstance(request, Fetch)
        return await phases.fetch(state) or _missing(state.execution_id)

    def _job(self, state: AttemptState, running: Running) -> PhasedJob:
        """The job instance of the current attempt (one per attempt)."""
        if running.job is None or running.job_attempt != state.number:
            running.job = make_job(state, self._scope, running.cancel_event, self._pool)
            running.job_attempt = state.number
        job: PhasedJob = running.job
        return job


def _interrupter() -> Callable[[], None]:
    """Cancel the current task, from its own loop or from any other thread."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    owner = threading.get_ident()
    assert task is not None

    def interrupt() -> None:
        if threading.get_ident() == owner:
            task.cancel()
        else:
            loop.call_soon_threadsafe(task.cancel)

    return interrupt


def _sync_of(session: AsyncSession | AsyncConnection) -> Any:
    """The sync object under an async session or connection (events live there)."""
    return session.sync_session if isinstance(session, AsyncSession) else session.sync_connection


async def _in_callers_transaction(
    session: AsyncSession | AsyncConnection,
    engine: AsyncEngine,
    write: Callable[[Connection], T],
) -> T:
    """Run ``write`` on the caller's connection, inside the caller's transaction."""
    if isinstance(session, AsyncSession):
        result: T = await session.run_sync(
            lambda s: write(caller_connection(s, engine.sync_engine))
        )
        return result
    return await session.run_sync(lambda c: write(caller_connection(c, engine.sync_engine)))
