"""JobRunner (sync) and AsyncJobRunner (async): the same verbs over one state machine.

Both drive :class:`~jobrunner._attempt.AttemptState` through the phases of
:mod:`jobrunner._phases`, with tenacity deciding when to try again. Only the I/O edge
differs: ``JobRunner`` never creates an event loop; ``AsyncJobRunner`` runs async phases
on the loop and sync ones in worker threads.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, NoReturn, Self

import tenacity
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _queries as q
from ._attempt import AttemptState, new_row, utcnow
from ._engine import (
    database_url,
    display_url,
    is_memory_sqlite,
    make_async_engine,
    make_sync_engine,
)
from ._exceptions import (
    ConfigurationError,
    ExecutionNotFound,
    InvalidTransition,
    LeaseLost,
)
from ._inflight import AsyncHeartbeat, InFlight, Running, SyncHeartbeat
from ._job import PhasedJob
from ._monitor import LoopHealth, LoopMonitor
from ._phases import AsyncPhases, SyncPhases, make_job
from ._records import Attempt, Execution, JobStats
from ._registry import JobRef, Registry, default_registry
from ._schema import TERMINAL_STATUSES, ExecutionStatus
from ._session import SessionScope

logger = logging.getLogger("jobrunner")

RETRYING = ExecutionStatus.RETRYING
RETRYABLE_BY_HAND = ("failed", "timed_out", "cancelled", "abandoned")

IdLike = uuid.UUID | str
StatusFilter = ExecutionStatus | str | Iterable[ExecutionStatus | str] | None


class _StopRun(BaseException):
    """Ends a run early without it counting as a failure (deferred retry, lost claim)."""

    def __init__(self, execution: Execution | None) -> None:
        self.execution = execution


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _as_id(value: IdLike) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ExecutionNotFound(f"{value!r} is not an execution id (expected a UUID)") from None


def _statuses(status: StatusFilter) -> list[str] | None:
    if status is None:
        return None
    items = [status] if isinstance(status, str) else list(status)
    try:
        return [ExecutionStatus(s).value for s in items]
    except ValueError as exc:
        known = ", ".join(s.value for s in ExecutionStatus)
        raise ConfigurationError(f"{exc}; statuses are: {known}") from None


def _since(since: datetime | timedelta | None) -> datetime | None:
    return utcnow() - since if isinstance(since, timedelta) else since


MAX_PRUNE_BATCH = 10_000


def _prune_plan(
    older_than: datetime | timedelta, status: StatusFilter, batch_size: int
) -> tuple[datetime, list[str]]:
    """Check prune()'s arguments; return the cutoff and the finished statuses to delete."""
    if isinstance(older_than, timedelta) and older_than < timedelta(0):
        raise ConfigurationError(f"older_than must not be negative, got {older_than}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ConfigurationError(f"batch_size must be an int, got {batch_size!r}")
    if not 1 <= batch_size <= MAX_PRUNE_BATCH:
        raise ConfigurationError(f"batch_size must be 1..{MAX_PRUNE_BATCH}, got {batch_size}")
    finished = sorted(s.value for s in TERMINAL_STATUSES)
    statuses = _statuses(status)
    live = [s for s in statuses or () if s not in finished]
    if live:
        raise ConfigurationError(
            f"prune deletes finished executions only, not {', '.join(live)}; "
            f"finished statuses are: {', '.join(finished)}"
        )
    before = _since(older_than)
    assert before is not None
    return before, finished if statuses is None else statuses


class _RunnerBase:
    """What both runners share that does no I/O."""

    _runner_name = "runner"
    _heartbeat_interval: float

    def __init__(
        self,
        *,
        registry: Registry | None,
        worker_id: str | None,
        inline_retry_max_wait: float,
        on_retry_scheduled: Callable[[Execution], None] | None = None,
        slow_phase_threshold: float | None = 10.0,
    ) -> None:
        self.registry = registry if registry is not None else default_registry
        self._slow_phase_ms = None if slow_phase_threshold is None else slow_phase_threshold * 1000
        self.on_retry_scheduled = on_retry_scheduled
        self.worker_id = worker_id or _worker_id()
        if inline_retry_max_wait < 0:
            raise ConfigurationError("inline_retry_max_wait must be >= 0 seconds")
        self.inline_retry_max_wait = inline_retry_max_wait
        self._inflight = InFlight()

    def _submission(
        self,
        job: JobRef,
        args: Any,
        *,
        idempotency_key: str | None,
        triggered_by: str,
        external_id: str | None,
        due: bool,
    ) -> tuple[type[PhasedJob], dict[str, Any]]:
        job_cls = self.registry.resolve(job)
        args_value, args_json = job_cls.validate_args(args)
        row = new_row(
            job_cls,
            args_json,
            execution_id=uuid.uuid4(),
            now=utcnow(),
            triggered_by=triggered_by,
            idempotency_key=idempotency_key,
            external_id=external_id,
            due_at=utcnow() if due else None,
            concurrency_key=job_cls.concurrency_key_for(args_value),
        )
        return job_cls, row

    def _inline(
        self, job_cls: type[PhasedJob], args: Any, *, triggered_by: str, external_id: str | None
    ) -> AttemptState:
        args_value, args_json = job_cls.validate_args(args)
        state = AttemptState.inline(
            job_cls,
            args_json,
            worker=self.worker_id,
            triggered_by=triggered_by,
            external_id=external_id,
        )
        state.args_value = args_value
        return state

    def _run_target(self, job: JobRef, idempotency_key: str | None) -> tuple[type[PhasedJob], bool]:
        """The job class for ``run``, and whether its row must be submitted first.

        With an idempotency key or a concurrency limit the row has to exist (race-safe)
        before the execution may claim a slot; otherwise ``run`` inserts it already
        running, saving a transaction.
        """
        job_cls = self.registry.resolve(job)
        self._check_runnable(job_cls)
        return job_cls, idempotency_key is not None or job_cls.max_concurrency is not None

    def _concurrency(
        self, job_cls: type[PhasedJob], execution: Execution
    ) -> tuple[str, int] | None:
        if job_cls.max_concurrency is None or execution.concurrency_key is None:
            return None
        return execution.concurrency_key, job_cls.max_concurrency

    def _limits(self) -> dict[str, int]:
        return {
            job.name: job.max_concurrency
            for job in self.registry
            if job.max_concurrency is not None and self._can_run(job)
        }

    def _lease_timeout(self, lease_timeout: float | None) -> float:
        seconds = 3 * self._heartbeat_interval if lease_timeout is None else lease_timeout
        if seconds <= 0:
            raise ConfigurationError("lease_timeout must be a positive number of seconds")
        return seconds

    def _check_runnable(self, job_cls: type[PhasedJob]) -> None:
        """Refuse jobs this runner cannot run (JobRunner: async phases)."""

    def _runnable_jobs(self) -> builtins.list[str]:
        return [job.name for job in self.registry if self._can_run(job)]

    def _can_run(self, job_cls: type[PhasedJob]) -> bool:
        return True

    def _claimed(self, rows: builtins.list[dict[str, Any]]) -> builtins.list[AttemptState]:
        return [
            AttemptState.claimed(
                self.registry.resolve_row(r["job"], r["handler"]), r, worker=self.worker_id
            )
            for r in rows
        ]

    def _claimable(self, execution: Execution) -> type[PhasedJob] | None:
        """The job class to run ``execution`` with, or None if it is not waiting to run."""
        if execution.status.value not in ("pending", "retrying") or execution.cancel_requested:
            logger.info(
                "execution %s is %s; not running it",
                execution.id,
                execution.status,
                extra={"execution_id": str(execution.id), "job": execution.job},
            )
            return None
        job_cls = self.registry.resolve_row(execution.job, execution.handler)
        self._check_runnable(job_cls)
        return job_cls

    def _after_failure(self, state: AttemptState, execution: Execution | None, wait: float) -> None:
        """tenacity's before_sleep: go on inline, or stop and leave it ``retrying``."""
        if execution is None or wait > self.inline_retry_max_wait:
            raise _StopRun(execution)
        logger.info(
            "execution %s of %s: attempt %d failed (%s), retrying in %.2fs",
            state.execution_id,
            state.job_cls.name,
            state.number,
            state.error.type if state.error else "?",
            wait,
            extra=_extra(state),
        )
        state.prepare_retry()

    def _log_reaped(self, reaped: builtins.list[Execution]) -> None:
        for execution in reaped:
            logger.warning(
                "reaped execution %s of %s: %s; now %s",
                execution.id,
                execution.job,
                execution.error_message,
                execution.status,
                extra={"execution_id": str(execution.id), "job": execution.job},
            )

    def _scheduled(self, execution: Execution | None) -> None:
        """A long retry wait ended the run: tell the integration (Celery: a countdown)."""
        if execution is None or execution.status is not RETRYING:
            return
        logger.info(
            "execution %s of %s will retry at %s",
            execution.id,
            execution.job,
            execution.next_retry_at,
            extra={"execution_id": str(execution.id), "job": execution.job},
        )
        if self.on_retry_scheduled is not None:
            self.on_retry_scheduled(execution)

    def _log_end(self, state: AttemptState, execution: Execution | None) -> None:
        if execution is None:
            return
        if execution.status is ExecutionStatus.SUCCEEDED:
            logger.debug(
                "execution %s of %s succeeded", execution.id, execution.job, extra=_extra(state)
            )
        else:
            logger.warning(
                "execution %s of %s ended %s in %s: %s: %s",
                execution.id,
                execution.job,
                execution.status,
                execution.phase,
                execution.error_type,
                execution.error_message,
                extra=_extra(state),
            )

    def _lost(self, state: AttemptState, exc: LeaseLost) -> None:
        logger.warning("%s", exc, extra=_extra(state))

    def _retry_budget(self, execution: Execution) -> int:
        job_cls = self.registry.resolve_row(execution.job, execution.handler)
        return execution.attempt + job_cls.retry.max_attempts

    def _cancel_result(
        self, execution_id: uuid.UUID, execution: Execution | None, current: Execution | None
    ) -> Execution:
        if execution is not None:
            running = self._inflight.get(execution_id)
            if running is not None and execution.status is ExecutionStatus.RUNNING:
                running.signal("cancel")  # running here: no need to wait for a heartbeat
            return execution
        if current is None:
            raise ExecutionNotFound(f"no execution with id {execution_id}")
        raise InvalidTransition(
            f"execution {execution_id} is {current.status}; only pending, retrying or "
            "running executions can be cancelled"
        )

    def _retry_result(
        self, execution_id: uuid.UUID, execution: Execution | None, current: Execution
    ) -> Execution:
        if execution is None:
            raise InvalidTransition(
                f"execution {execution_id} is {current.status}; only "
                f"{', '.join(RETRYABLE_BY_HAND)} executions can be retried"
            )
        return execution


def _interval(seconds: float) -> float:
    if seconds <= 0:
        raise ConfigurationError("heartbeat_interval must be a positive number of seconds")
    return seconds


def _extra(state: AttemptState) -> dict[str, Any]:
    return {
        "execution_id": str(state.execution_id),
        "job": state.job_cls.name,
        "phase": state.phase,
    }


def _missing(execution_id: uuid.UUID) -> NoReturn:
    raise ExecutionNotFound(f"no execution with id {execution_id}")


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
        inline_retry_max_wait: retry waits up to this many seconds are slept inline;
            longer ones end the run ``retrying`` for :meth:`run_due` (default 5).
        on_retry_scheduled: called with the execution when a long wait left it
            ``retrying`` (integrations schedule it, e.g. as a Celery countdown).
        heartbeat_interval: seconds between lease refreshes of running executions, in
            one short transaction each (default 10; :meth:`reap` uses 3x by default).
        slow_phase_threshold: log phases longer than this many seconds (None: never).
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
        slow_phase_threshold: float | None = 10.0,
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
            engine if engine is not None else make_sync_engine(database_url(url), **engine_options)
        )
        self.url = display_url(self.engine.url)
        self._phases = SyncPhases(self.engine, self.url)
        self._heartbeat_interval = _interval(heartbeat_interval)
        self._heartbeat = SyncHeartbeat(
            self._inflight, self._phases.tx, _interval(heartbeat_interval)
        )

    # -- lifecycle ---------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the jobrunner tables if missing (quick start; use migrations in prod)."""
        with self._phases.tx() as conn:
            q.create_schema(conn)

    def close(self) -> None:
        """Stop the heartbeat and dispose of the engine's connections."""
        self._heartbeat.stop()
        self.engine.dispose()

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
        with self._phases.tx() as conn:
            if idempotency_key is not None:
                return q.insert_unique(conn, row)
            q.insert_execution(conn, row)
        return uuid.UUID(str(row["id"]))

    def run(
        self,
        job: JobRef,
        args: Any = None,
        *,
        idempotency_key: str | None = None,
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
                    triggered_by=triggered_by,
                    external_id=external_id,
                )
            )
        return self._drive(
            self._inline(job_cls, args, triggered_by=triggered_by, external_id=external_id)
        )

    def run_execution(self, execution_id: IdLike) -> Execution:
        """Claim and run a pending or retrying execution (e.g. one submitted elsewhere).

        An execution that already finished, or is running elsewhere, is returned as is.
        """
        current = self.get(execution_id)
        job_cls = self._claimable(current)
        if job_cls is None:
            return current
        return self._claim_and_drive(job_cls, current)

    def run_due(self, *, limit: int = 100) -> builtins.list[Execution]:
        """Claim and run executions whose time has come (retries, plain submits)."""
        with self._phases.tx() as conn:
            rows = q.claim_due(
                conn,
                worker=self.worker_id,
                now=utcnow(),
                limit=limit,
                jobs=self._runnable_jobs(),
                limits=self._limits(),
            )
        states = self._claimed(rows)
        with self._inflight.hold(states):
            self._heartbeat.ensure_running()
            return [self._drive(state) for state in states]

    # -- reading -------------------------------------------------------------------------

    def get(self, execution_id: IdLike) -> Execution:
        """One execution by id; :class:`ExecutionNotFound` if there is none."""
        eid = _as_id(execution_id)
        with self._phases.tx(single=True) as conn:
            execution = q.get(conn, eid)
        return execution if execution is not None else _missing(eid)

    def list(
        self,
        *,
        status: StatusFilter = None,
        job: str | None = None,
        since: datetime | timedelta | None = None,
        limit: int = 100,
    ) -> builtins.list[Execution]:
        """Executions newest first; ``since`` is a datetime or a timedelta back from now."""
        with self._phases.tx() as conn:
            return q.list_executions(
                conn, status=_statuses(status), job=job, since=_since(since), limit=limit
            )

    def attempts(self, execution_id: IdLike) -> builtins.list[Attempt]:
        """The attempt ledger of one execution, oldest first."""
        eid = _as_id(execution_id)
        with self._phases.tx() as conn:
            if q.get(conn, eid) is None:
                _missing(eid)
            return q.list_attempts(conn, eid)

    def stats(self, since: datetime | timedelta | None = None) -> builtins.list[JobStats]:
        """Counts and p50/p95 durations per job and status, for executions created since."""
        after = _since(since)
        with self._phases.tx() as conn:
            return q.job_stats(conn, since=after)

    # -- operator actions ------------------------------------------------------------------

    def cancel(self, execution_id: IdLike) -> Execution:
        """Cancel an execution; returns it.

        A pending or retrying execution is ``cancelled`` at once. A running one is flagged:
        its worker stops it (an async phase at its next ``await``, sync code at the next
        phase boundary or when it checks ``self.cancelled()``), at once when it runs in
        this runner, else at its next heartbeat. Finished executions raise
        :class:`InvalidTransition`.
        """
        eid = _as_id(execution_id)
        with self._phases.tx() as conn:
            execution = q.cancel(conn, eid, utcnow())
            current = None if execution else q.get(conn, eid)
        return self._cancel_result(eid, execution, current)

    def retry(self, execution_id: IdLike, *, triggered_by: str = "retry") -> Execution:
        """Put a failed, timed-out, cancelled or abandoned execution back to pending."""
        current = self.get(execution_id)
        with self._phases.tx() as conn:
            execution = q.requeue(
                conn,
                current.id,
                from_statuses=RETRYABLE_BY_HAND,
                max_attempts=self._retry_budget(current),
                triggered_by=triggered_by,
                now=utcnow(),
            )
        return self._retry_result(current.id, execution, current)

    def reap(
        self, lease_timeout: float | None = None, *, limit: int = 100
    ) -> builtins.list[Execution]:
        """Recover executions whose worker died (no heartbeat for ``lease_timeout`` s).

        Each is recorded as an abandoned attempt, then left ``retrying`` (due now, so
        :meth:`run_due` picks it up, resuming at record if execute was checkpointed) while
        attempts remain, else ``failed``. The default lease is three heartbeat intervals.
        Safe to call from many workers at once (SKIP LOCKED on PostgreSQL).
        """
        seconds = self._lease_timeout(lease_timeout)
        with self._phases.tx() as conn:
            reaped = q.reap(conn, now=utcnow(), lease_timeout=seconds, limit=limit)
        self._log_reaped(reaped)
        return reaped

    def prune(
        self,
        older_than: datetime | timedelta,
        *,
        status: StatusFilter = None,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete finished executions (and their attempts) older than ``older_than``.

        Only succeeded, failed, timed-out and cancelled executions go (``status`` narrows
        that), ``batch_size`` at a time, each batch its own short transaction, so pruning
        never holds one long lock. ``progress(deleted_so_far)`` is called after each batch.
        Returns how many executions were deleted.
        """
        before, statuses = _prune_plan(older_than, status, batch_size)
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

    def _claim_and_drive(self, job_cls: type[PhasedJob], current: Execution) -> Execution:
        concurrency = self._concurrency(job_cls, current)
        with self._phases.tx(single=concurrency is None) as conn:
            row = q.claim(
                conn,
                current.id,
                worker=self.worker_id,
                now=utcnow(),
                phase="load",
                concurrency=concurrency,
            )
        if row is None:
            return self.get(current.id)
        return self._drive(AttemptState.claimed(job_cls, row, worker=self.worker_id))

    def _scope(self) -> SessionScope:
        return SessionScope(lambda: self._phases.sessions, None, self._runner_name)

    def _drive(self, state: AttemptState) -> Execution:
        phases = self._phases

        def before_sleep(retry: tenacity.RetryCallState) -> None:
            wait = retry.upcoming_sleep
            self._after_failure(state, phases.finish_failure(state, RETRYING, wait), wait)

        try:
            if state.last_attempt:  # nothing to retry: skip tenacity's bookkeeping
                return self._attempt(state)
            for attempt in state.policy.retrying(
                done_attempts=state.number - 1,
                max_attempts=state.max_attempts,
                before_sleep=before_sleep,
            ):
                with attempt:
                    return self._attempt(state)
        except _StopRun as stop:
            self._scheduled(stop.execution)
            return stop.execution or self.get(state.execution_id)
        except LeaseLost as exc:
            self._lost(state, exc)
            return self.get(state.execution_id)
        except BaseException:
            if state.error is None:
                raise
            execution = phases.finish_failure(state, state.final_status(), None)
            self._log_end(state, execution)
            if not isinstance(state.failure, Exception):
                raise
            return execution or self.get(state.execution_id)
        raise AssertionError("unreachable: tenacity ends with a result or an exception")

    def _attempt(self, state: AttemptState) -> Execution:
        phases = self._phases
        if state.needs_claim:
            row = phases.claim(state)
            if row is None:
                raise _StopRun(None)
            state.adopt_claim(row)
        state.slow_phase_ms = self._slow_phase_ms
        running = self._inflight.running_for(state)
        job = make_job(state, self._scope, running.cancel_event)
        with self._inflight.track(running):
            self._heartbeat.ensure_running()
            try:
                running.check()  # a held lease may have been lost while it waited
                if state.resume_from == "load":
                    loaded = phases.load(state, job)
                    running.check()
                    result = phases.execute(state, job, loaded)
                    running.check()
                    phases.checkpoint(state, result)
                return phases.record(state, job)
            except BaseException as exc:
                state.capture(exc)
                raise


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
        self._phases = AsyncPhases(self.engine, self.url, self._sync_phases)
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

    async def run_execution(self, execution_id: IdLike) -> Execution:
        """Claim and run a pending or retrying execution; finished ones are returned as is."""
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
                    make_sync_engine(
                        url.render_as_string(hide_password=False), **self._engine_options
                    ),
                    self.url,
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
            if state.error is None:
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
