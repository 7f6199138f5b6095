"""JobRunner: the synchronous twin. Sync phases with a sync Session, never an event loop."""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Self

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

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
from ._engine import database_url, display_url, drop_if_empty, make_sync_engine
from ._exceptions import ConfigurationError
from ._flow import Checkpoint, Claim, End, Execute, Fetch, Load, Record, Request, Sleep
from ._hooks import Instrument
from ._inflight import Running, SyncHeartbeat
from ._job import PhasedJob
from ._phases import SyncPhases, make_job
from ._records import Attempt, AuditEntry, Execution, JobStats, QueueState
from ._registry import JobRef, Registry
from ._session import SessionScope, caller_connection, on_commit
from ._threads import DaemonPool
from ._worker import SyncWorker, WorkOptions


class JobRunner(_RunnerBase):
    """Runs jobs synchronously on a sync engine (psycopg or sqlite3); never an event loop.

    ``JobRunner("sqlite:///jobs.db")`` or ``JobRunner("postgresql+psycopg://...")``;
    without a URL, ``JOBRUNNER_DATABASE_URL`` or the embedded ``sqlite:///jobrunner.db``.
    Jobs with ``async def`` phases need :class:`AsyncJobRunner`.

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
            database's clock (default three heartbeat intervals; at least two). An
            execution whose lease expires is recovered by :meth:`reap`.
        max_threads: the runner's own thread pool, for sync executes with a timeout
            (default 32; a worker grows it to its concurrency).
        max_args_bytes: args larger than this as JSON are refused at submit with
            :class:`InvalidArgs` (default 1,000,000; None: no limit).
        slow_phase_threshold: log phases longer than this many seconds (None: never).
        instruments: what hears about executions (tracing, metrics: see
            :mod:`jobrunner.contrib.otel`, :mod:`jobrunner.contrib.prometheus`);
            default: those installed for the process, plus OpenTelemetry when the
            application configured a tracer provider. ``[]``: none.
        **engine_options: passed to ``create_engine`` (``pool_size``, ``max_overflow``,
            ``busy_timeout`` in seconds for SQLite, ...).
    """

    _runner_name = "JobRunner"

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: Engine | None = None,
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
            engine if engine is not None else make_sync_engine(database_url(url), **engine_options)
        )
        self.url = display_url(self.engine.url)
        self._autocommit_engine = (
            make_sync_engine(
                _full_url(self.engine),
                isolation_level="AUTOCOMMIT",
                pool_reset_on_return=None,  # autocommit: no transaction to roll back
                **engine_options,
            )
            if engine is None and self.engine.dialect.name == "postgresql"
            else None
        )
        self._pool = DaemonPool(self._max_threads, name="jobrunner-sync")
        self._phases = SyncPhases(self.engine, self.url, self._autocommit_engine, self._pool)
        self._heartbeat = SyncHeartbeat(self._inflight, self._phases.tx, self._heartbeat_interval)

    # -- lifecycle ---------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the jobrunner tables if missing (quick start; use migrations in prod)."""
        with self._phases.tx() as conn:
            q.create_schema(conn)

    def close(self) -> None:
        """Stop the heartbeat and the thread pool; dispose of the engine's connections."""
        self._heartbeat.stop()
        self._pool.shutdown(wait=False)
        self.engine.dispose()
        drop_if_empty(self.engine)
        if self._autocommit_engine is not None:
            self._autocommit_engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting and running ----------------------------------------------------------

    def submit(
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
        session: Session | Connection | None = None,
    ) -> uuid.UUID:
        """Validate ``args`` and store a pending execution; returns its id.

        ``run_at`` (an aware datetime) or ``delay`` (seconds or a timedelta) make it due
        later; it is due at once otherwise. ``queue`` and ``priority`` override the job's.

        ``idempotency_key``: one execution per key and job. Submitting the key again
        returns the first execution's id; with other args it raises
        :class:`IdempotencyConflict`. ``unique_for`` lets the key be used again once the
        execution holding it is older than that.

        ``session``: a ``Session`` or ``Connection`` of yours, on the same database: the
        execution is written in *your* transaction, so it exists if and only if your
        writes commit (the outbox pattern). Workers are woken when you commit.
        """
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
        if session is not None:
            conn = caller_connection(session, self.engine)
            execution_id = q.submit_row(conn, row, unique_for=window)
            on_commit(session, self._submitted)
            return execution_id
        if row.get("idempotency_key") is None:  # one INSERT, atomic alone: see write()
            with self._phases.write() as bare:
                q.insert_execution(bare, row)
            execution_id = row["id"]
        else:
            with self._phases.tx(single=True) as conn:
                execution_id = q.submit_row(conn, row, unique_for=window)
        self._submitted()
        return execution_id

    def submit_many(
        self,
        job: JobRef,
        args_list: Iterable[Any],
        *,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        queue: str | None = None,
        priority: int | None = None,
        triggered_by: str = "api",
        session: Session | Connection | None = None,
    ) -> builtins.list[uuid.UUID]:
        """Store one pending execution of ``job`` per args, in one transaction; their ids.

        Every args is validated first: one invalid args raises :class:`InvalidArgs`
        naming its index, and nothing is stored. One batched insert and one wake-up per
        queue, so thousands go in at once (see the benchmarks). No idempotency keys: use
        :meth:`submit` for those. ``session`` as for :meth:`submit`.
        """
        plan = self._submissions(
            job,
            triggered_by=triggered_by,
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
        )
        rows = [plan.row(index, args) for index, args in enumerate(args_list)]
        plan.built(rows)
        if session is not None:
            q.insert_many(caller_connection(session, self.engine), rows)
            on_commit(session, self._submitted)
        else:
            with self._phases.tx() as conn:
                q.insert_many(conn, rows)
            self._submitted()
        return [row["id"] for row in rows]

    def run(
        self,
        job: JobRef,
        args: Any = None,
        *,
        idempotency_key: str | None = None,
        unique_for: float | timedelta | None = None,
        triggered_by: str = "inline",
        external_id: str | None = None,
    ) -> Execution:
        """Submit and run inline, retrying per the job's policy; returns the execution.

        A failed job does not raise: the returned execution says ``failed`` and why
        (call :meth:`Execution.raise_for_status` to turn that into an exception). With
        an ``idempotency_key`` already used, the existing execution is returned (and run
        if it is still pending). A job at its ``max_concurrency`` stays ``pending``.
        """
        job_cls, submit_first = self._run_target(job, idempotency_key)
        if submit_first:
            return self.run_execution(
                self.submit(
                    job_cls,
                    args,
                    idempotency_key=idempotency_key,
                    unique_for=unique_for,
                    triggered_by=triggered_by,
                    external_id=external_id,
                )
            )
        return self._drive(
            self._inline(job_cls, args, triggered_by=triggered_by, external_id=external_id)
        )

    def run_execution(self, execution_id: IdLike, *, job: JobRef | None = None) -> Execution:
        """Claim and run a pending or retrying execution that is due (e.g. submitted elsewhere).

        An execution that already finished, runs elsewhere, or waits for its retry's
        backoff is returned as is. ``job`` is an optional hint (a queue message may carry
        it): with it, the runner claims at once instead of reading the row first.
        """
        hinted = self._hinted(job)
        eid = _as_id(execution_id)
        if hinted is not None:
            row = self._claim(eid, hinted, None)
            return self.get(eid) if row is None else self._drive(self._claimed_one(hinted, row))
        current = self.get(eid)
        job_cls = self._claimable(current)
        if job_cls is None:
            return current
        row = self._claim(eid, job_cls, self._concurrency(job_cls, current))
        return self.get(eid) if row is None else self._drive(self._state(job_cls, row))

    def run_due(
        self, *, limit: int = 100, concurrency: int = 1, queues: Sequence[str] | None = None
    ) -> builtins.list[Execution]:
        """Run executions that are due now, claiming each just before it runs.

        At most ``limit`` of them, ``concurrency`` at a time (in threads when > 1).
        Returns them as they ended, in the order they finished.
        """
        return self._work(
            WorkOptions.for_run_due(limit=limit, concurrency=concurrency, queues=queues)
        )

    def work(
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
        """Run executions as they come due, ``concurrency`` at a time, until stopped.

        Claims only as many as it has free slots, each just before it runs; sleeps
        ``poll_interval`` between polls but wakes at once on PostgreSQL ``NOTIFY`` (and
        on submits from this runner); reaps expired leases every ``reap_interval``
        seconds (one reaper per database at a time). Stops when :meth:`stop_work` is
        called (or SIGTERM/SIGINT with ``handle_signals``): claims nothing new, lets
        what runs finish within ``grace_period``, then returns. With ``until_idle`` it
        returns once nothing is due and nothing runs.
        """
        self._work(
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

    def _work(self, options: WorkOptions) -> builtins.list[Execution]:
        if self._worker is not None:
            raise ConfigurationError(
                "this JobRunner is already running work() or run_due(); one at a time per "
                "runner: call stop_work() first, or give the second loop a runner of its own"
            )
        self._pool.max_workers = max(self._pool.max_workers, options.concurrency)
        self._worker = SyncWorker(self, options)
        try:
            return self._worker.run()
        finally:
            self._worker = None

    # -- reading -------------------------------------------------------------------------

    def get(self, execution_id: IdLike) -> Execution:
        """One execution by id; :class:`ExecutionNotFound` if there is none."""
        eid = _as_id(execution_id)
        with self._phases.tx(single=True, read=True) as conn:
            execution = q.get(conn, eid)
        return execution if execution is not None else _missing(eid)

    def list(
        self,
        *,
        status: StatusFilter = None,
        job: str | None = None,
        queue: str | None = None,
        since: datetime | timedelta | None = None,
        limit: int = 100,
    ) -> builtins.list[Execution]:
        """Executions newest first; ``since`` is a datetime or a timedelta back from now."""
        with self._phases.tx(read=True) as conn:
            return q.list_executions(
                conn,
                status=_statuses(status),
                job=job,
                queue=queue,
                since=_since(since),
                limit=limit,
            )

    def attempts(self, execution_id: IdLike) -> builtins.list[Attempt]:
        """The attempt ledger of one execution, oldest first."""
        eid = _as_id(execution_id)
        with self._phases.tx(read=True) as conn:
            if q.get(conn, eid) is None:
                _missing(eid)
            return q.list_attempts(conn, eid)

    def stats(self, since: datetime | timedelta | None = None) -> builtins.list[JobStats]:
        """Counts and p50/p95 durations per job and status, for executions created since."""
        after = _since(since)
        with self._phases.tx(read=True) as conn:
            return q.job_stats(conn, since=after)

    # -- operator actions ------------------------------------------------------------------

    def cancel(self, execution_id: IdLike, *, actor: str = "api") -> Execution:
        """Cancel an execution; returns it.

        A pending or retrying execution is ``cancelled`` at once. A running one is flagged:
        its worker stops it (an async phase at its next ``await``, sync code at the next
        phase boundary or when it checks ``self.cancelled()``), at once when it runs in
        this runner, else at its next heartbeat. A finished execute is checkpointed
        first, so :meth:`retry` never repeats it. Finished executions raise
        :class:`InvalidTransition`. The cancel is recorded in the audit as ``actor``'s.
        """
        eid = _as_id(execution_id)
        with self._phases.tx() as conn:
            execution = q.cancel(conn, eid, actor=actor)
            current = None if execution else q.get(conn, eid)
        return self._cancel_result(eid, execution, current)

    def retry(
        self, execution_id: IdLike, *, triggered_by: str = "retry", actor: str = "api"
    ) -> Execution:
        """Put a failed, timed-out or cancelled execution back to pending, due now.

        It gets a fresh budget of attempts, and resumes at record if its execute was
        checkpointed. A worker (``jobrunner worker``) or :meth:`run_due` runs it. The
        retry is recorded in the audit as ``actor``'s.
        """
        current = self.get(execution_id)
        with self._phases.tx() as conn:
            execution = q.requeue(
                conn,
                current.id,
                max_attempts=self._retry_budget(current),
                triggered_by=triggered_by,
                actor=actor,
            )
        if execution is not None:
            self._submitted()
        return self._retry_result(current.id, execution, current)

    # -- queues ----------------------------------------------------------------------------

    def pause_queue(self, queue: str, *, actor: str = "api") -> bool:
        """Stop workers claiming from ``queue`` (running executions finish); audited.

        True if this paused it, False if it was paused already. Workers and
        :meth:`run_due` claim nothing from a paused queue; ``run()``, ``run_execution()``
        and brokers' executions are not held.
        """
        with self._phases.tx() as conn:
            changed = q.set_paused(conn, queue, paused=True, actor=actor)
        return changed

    def resume_queue(self, queue: str, *, actor: str = "api") -> bool:
        """Let workers claim from ``queue`` again, and wake them; audited.

        True if this resumed it, False if it was not paused.
        """
        with self._phases.tx() as conn:
            changed = q.set_paused(conn, queue, paused=False, actor=actor)
        if changed:
            self._submitted()
        return changed

    def queues(self) -> builtins.list[QueueState]:
        """Queues ever paused or resumed, with their pause (see :meth:`pause_queue`)."""
        with self._phases.tx(read=True) as conn:
            return q.queue_states(conn)

    def paused_queues(self) -> set[str]:
        """Names of the queues paused now."""
        return {state.name for state in self.queues() if state.paused}

    def audit(
        self, execution_id: IdLike | None = None, *, limit: int = 100
    ) -> builtins.list[AuditEntry]:
        """Operator actions (retry, cancel, pause, resume) newest first, all or on one."""
        eid = None if execution_id is None else _as_id(execution_id)
        with self._phases.tx(read=True) as conn:
            return q.list_audit(conn, execution_id=eid, limit=limit)

    def reap(self, *, limit: int = 100) -> builtins.list[Execution]:
        """Recover running executions whose lease expired (their worker died or hung).

        Each is recorded as an abandoned attempt, then ``retrying`` (due now, resuming at
        record if execute was checkpointed) while attempts remain, else ``failed``, or
        ``cancelled`` if a cancel was requested. Leases are on the rows, compared with
        the database's clock: any process may reap, with any settings. Safe to call from
        many processes at once (one reaps at a time on PostgreSQL).
        """
        with self._phases.tx() as conn:
            reaped = q.reap(conn, limit=limit)
        self._log_reaped(reaped)
        if any(e.status.value == "retrying" for e in reaped):
            self._submitted()
        return reaped

    def prune(
        self,
        older_than: datetime | timedelta,
        *,
        status: StatusFilter = None,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
        dry_run: bool = False,
    ) -> int:
        """Delete finished executions (and their attempts) older than ``older_than``.

        Only succeeded, failed, timed-out and cancelled executions go (``status`` narrows
        that), ``batch_size`` at a time, each batch its own short transaction, so pruning
        never holds one long lock. ``progress(deleted_so_far)`` is called after each batch.
        Returns how many executions were deleted; with ``dry_run``, how many would be.
        """
        before, statuses = _prune_plan(older_than, status, batch_size)
        if dry_run:
            with self._phases.tx(read=True) as conn:
                return q.count_prunable(conn, before=before, statuses=statuses)
        deleted = 0
        while True:
            with self._phases.tx() as conn:
                batch = q.prune_batch(conn, before=before, statuses=statuses, limit=batch_size)
            deleted += batch
            if batch and progress is not None:
                progress(deleted)
            if batch < batch_size:
                return deleted

    # -- the state machine's sync edge ---------------------------------------------------------

    def _check_runnable(self, job_cls: type[PhasedJob]) -> None:
        if not self._can_run(job_cls):
            phases = ", ".join(sorted(job_cls.spec.async_phases))
            raise ConfigurationError(
                f"job {job_cls.name!r} has async phases ({phases}); JobRunner is synchronous "
                "and never starts an event loop. Run it with AsyncJobRunner "
                "(e.g. `await AsyncJobRunner(url).run(...)`) or make its phases plain `def`."
            )

    def _can_run(self, job_cls: type[PhasedJob]) -> bool:
        return not job_cls.spec.async_phases

    def _claim(
        self,
        execution_id: uuid.UUID,
        job_cls: type[PhasedJob],
        concurrency: tuple[str, str, int] | None,
    ) -> dict[str, Any] | None:
        with self._phases.tx(single=concurrency is None) as conn:
            return q.claim_one(
                conn,
                execution_id,
                worker=self.worker_id,
                lease_s=self.lease_duration,
                no_load=[] if job_cls.spec.runs("load") else [job_cls.name],
                concurrency=concurrency,
            )

    def _claim_batch(self, limit: int, queues: Sequence[str] | None) -> builtins.list[AttemptState]:
        """Claim up to ``limit`` due executions this runner can run (the worker's claim)."""
        limits = self._limits()
        # Without concurrency limits the claim is one statement: autocommit on PostgreSQL.
        with self._phases.tx(single=not limits) as conn:
            rows = q.claim_batch(
                conn,
                worker=self.worker_id,
                lease_s=self.lease_duration,
                limit=limit,
                jobs=self._runnable_jobs(),
                queues=queues,
                no_load=self._no_load_jobs(),
                limits=limits,
            )
        return [self._claimed(row) for row in rows]

    def _scope(self) -> SessionScope:
        return SessionScope(lambda: self._phases.sessions, None, self._runner_name)

    def _drive(self, state: AttemptState, *, worker: bool = False) -> Execution:
        """Perform the flow's requests until it returns the execution."""
        running = Running(state=state)
        flow = self._flow(state, running, worker=worker)
        with self._inflight.track(running):
            self._heartbeat.ensure_running()
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
                    answer = self._perform(request, state, running)
                except BaseException as exc:
                    error = exc

    def _perform(self, request: Request, state: AttemptState, running: Running) -> Any:
        phases = self._phases
        if isinstance(request, Execute):
            return phases.execute(state, self._job(state, running), request.loaded, running)
        if isinstance(request, Checkpoint):
            return phases.checkpoint(state, request.result, finish=request.finish)
        if isinstance(request, Load):
            return phases.load(state, self._job(state, running))
        if isinstance(request, Record):
            if request.finished is not None:  # the checkpoint ended the attempt
                return request.finished
            return phases.record(state, self._job(state, running))
        if isinstance(request, End):
            return phases.end(state, request)
        if isinstance(request, Claim):
            return phases.claim(state, request.early_s)
        if isinstance(request, Sleep):
            time.sleep(request.seconds)
            return None
        assert isinstance(request, Fetch)
        return phases.fetch(state) or _missing(state.execution_id)

    def _job(self, state: AttemptState, running: Running) -> PhasedJob:
        """The job instance of the current attempt (one per attempt)."""
        if running.job is None or running.job_attempt != state.number:
            running.job = make_job(state, self._scope, running.cancel_event, self._pool)
            running.job_attempt = state.number
        job: PhasedJob = running.job
        return job
