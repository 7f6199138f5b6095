"""JobRunner: the synchronous twin. Sync phases with a sync Session, never an event loop."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Self

import tenacity
from sqlalchemy import Engine
from sqlalchemy.engine import URL

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
    make_sync_engine,
)
from ._errors_db import WrongEventLoop
from ._exceptions import (
    ConfigurationError,
    LeaseLost,
)
from ._inflight import SyncHeartbeat
from ._job import PhasedJob
from ._phases import SyncPhases, make_job
from ._records import Attempt, Execution, JobStats
from ._registry import JobRef, Registry
from ._session import SessionScope


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
        self._phases = SyncPhases(self.engine, self.url, self._autocommit_engine)
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

    def run_execution(self, execution_id: IdLike, *, job: JobRef | None = None) -> Execution:
        """Claim and run a pending or retrying execution (e.g. one submitted elsewhere).

        An execution that already finished, or is running elsewhere, is returned as is.
        ``job`` is an optional hint (a queue message may carry it): with it, the runner
        claims at once instead of reading the row first, saving a round trip.
        """
        hinted = self._hinted(job)
        if hinted is not None:
            eid = _as_id(execution_id)
            with self._phases.tx(single=True) as conn:
                row = q.claim(conn, eid, worker=self.worker_id, now=utcnow(), phase="load")
            return self.get(eid) if row is None else self._drive(self._claimed_one(hinted, row))
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
            if state.error is None or isinstance(state.failure, WrongEventLoop):
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
