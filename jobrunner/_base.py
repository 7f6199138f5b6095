"""What JobRunner and AsyncJobRunner share that does no I/O: job lookup, submission
rows, the decisions after a failure, messages. The twins only sequence I/O."""

from __future__ import annotations

import builtins
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from ._attempt import AttemptState, new_row, utcnow
from ._exceptions import (
    ConfigurationError,
    ExecutionNotFound,
    InvalidTransition,
    LeaseLost,
)
from ._inflight import InFlight
from ._job import PhasedJob
from ._records import Execution
from ._registry import JobRef, Registry, default_registry
from ._schema import TERMINAL_STATUSES, ExecutionStatus

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

    def _hinted(self, job: JobRef | None) -> type[PhasedJob] | None:
        """The hinted job class when run_execution may claim without reading the row:
        runnable here, and without a concurrency limit (which needs the row's key)."""
        if job is None:
            return None
        job_cls = self.registry.resolve(job)
        self._check_runnable(job_cls)
        return job_cls if job_cls.max_concurrency is None else None

    def _claimed_one(self, hinted: type[PhasedJob], row: dict[str, Any]) -> AttemptState:
        """The state of a row claimed on a hint; the row, not the hint, names the job."""
        job_cls = hinted
        if row["job"] != hinted.name:
            job_cls = self.registry.resolve_row(row["job"], row["handler"])
            self._check_runnable(job_cls)
        return AttemptState.claimed(job_cls, row, worker=self.worker_id)

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


def _full_url(engine: Engine | AsyncEngine) -> str:
    """The engine's URL with its password, to build a companion engine from."""
    return str(engine.url.render_as_string(hide_password=False))


def _missing(execution_id: uuid.UUID) -> NoReturn:
    raise ExecutionNotFound(f"no execution with id {execution_id}")
