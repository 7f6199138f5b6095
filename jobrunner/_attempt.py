"""The state of one attempt and every value it writes: shared by both runners.

The runners only sequence I/O; what an attempt writes, and which status follows a
failure, is decided here once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import traceback
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from ._exceptions import ExecutionCancelled, JobTimedOut
from ._job import PhasedJob
from ._queries import Lease
from ._retry import RetryPolicy
from ._schema import ExecutionStatus

Phase = Literal["load", "execute", "record"]


def utcnow() -> datetime:
    """Aware UTC now; every timestamp jobrunner writes comes from here."""
    return datetime.now(UTC)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ErrorInfo:
    """What went wrong in an attempt, as stored."""

    type: str
    message: str
    traceback: str
    phase: str | None


def describe(exc: BaseException) -> tuple[str, str]:
    """Qualified type name and message of ``exc``, for the error columns."""
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__, str(exc) or repr(exc)
    if module.startswith("jobrunner._"):
        module = "jobrunner"  # the public name, not the private module
    return f"{module}.{cls.__qualname__}", str(exc) or repr(exc)


@dataclasses.dataclass(kw_only=True)
class AttemptState:
    """One execution being run by one runner, attempt after attempt."""

    job_cls: type[PhasedJob]
    lease: Lease
    number: int
    max_attempts: int
    args_json: dict[str, Any]
    triggered_by: str
    resume_from: Phase = "load"
    checkpoint: Any = None
    insert_row: dict[str, Any] | None = None
    started_at: datetime = dataclasses.field(default_factory=utcnow)
    phase: Phase | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    max_lag_ms: float | None = None
    error: ErrorInfo | None = None
    failure: BaseException | None = None
    needs_claim: bool = False
    args_value: Any = None
    phase_started: float = 0.0
    slow_phase_ms: float | None = None
    concurrency_key: str | None = None

    @property
    def execution_id(self) -> uuid.UUID:
        """The execution's id."""
        return self.lease.execution_id

    @property
    def concurrency(self) -> tuple[str, int] | None:
        """(key, limit) when the job limits how many of its executions run at once."""
        limit = self.job_cls.max_concurrency
        return (
            None if limit is None or self.concurrency_key is None else (self.concurrency_key, limit)
        )

    @property
    def last_attempt(self) -> bool:
        """True when this run's first attempt is the execution's last allowed one."""
        return self.number >= self.max_attempts

    @property
    def policy(self) -> RetryPolicy:
        """The job's retry policy."""
        return self.job_cls.retry

    # -- building ------------------------------------------------------------------------

    @classmethod
    def inline(
        cls,
        job_cls: type[PhasedJob],
        args_json: dict[str, Any],
        *,
        worker: str,
        triggered_by: str,
        external_id: str | None = None,
    ) -> AttemptState:
        """A new execution run in this process: its row is inserted running by load."""
        now = utcnow()
        lease = Lease(execution_id=uuid.uuid4(), worker=worker, token=1, how="insert")
        row = new_row(
            job_cls,
            args_json,
            execution_id=lease.execution_id,
            now=now,
            triggered_by=triggered_by,
            idempotency_key=None,
            external_id=external_id,
        )
        row.update(
            status=ExecutionStatus.RUNNING.value,
            attempt=1,
            lease_token=1,
            worker=worker,
            started_at=now,
            heartbeat_at=now,
            phase="load",
            next_retry_at=None,
        )
        return cls(
            job_cls=job_cls,
            lease=lease,
            number=1,
            max_attempts=job_cls.retry.max_attempts,
            args_json=args_json,
            triggered_by=triggered_by,
            insert_row=row,
            started_at=now,
        )

    @classmethod
    def claimed(cls, job_cls: type[PhasedJob], row: dict[str, Any], *, worker: str) -> AttemptState:
        """An execution this runner has just claimed (its lease is committed)."""
        lease = Lease(execution_id=row["id"], worker=worker, token=row["lease_token"])
        return cls(
            job_cls=job_cls,
            lease=lease,
            number=row["attempt"],
            max_attempts=row["max_attempts"],
            args_json=row["args"],
            triggered_by=row["triggered_by"],
            resume_from="record" if row["checkpointed"] else "load",
            checkpoint=row["result"],
            concurrency_key=row["concurrency_key"],
        )

    def adopt_claim(self, row: dict[str, Any]) -> None:
        """Take over the lease of a fresh claim for the next attempt."""
        self.lease = Lease(
            execution_id=row["id"], worker=self.lease.worker, token=row["lease_token"]
        )
        self.number = row["attempt"]
        self.max_attempts = row["max_attempts"]
        self.resume_from = "record" if row["checkpointed"] else "load"
        self.checkpoint = row["result"]
        self.needs_claim = False

    def prepare_retry(self) -> None:
        """Reset per-attempt state after a failure; the next attempt claims afresh."""
        self.phase = None
        self.timings = {}
        self.args_value = None
        self.max_lag_ms = None
        self.error = None
        self.failure = None
        self.insert_row = None
        self.started_at = utcnow()
        self.needs_claim = True

    # -- phases --------------------------------------------------------------------------

    def enter(self, phase: Phase) -> None:
        """Mark ``phase`` as current and start its clock."""
        self.phase = phase
        self.phase_started = time.perf_counter()

    def leave(self) -> None:
        """Stop the current phase's clock (idempotent) and record its duration."""
        key = f"{self.phase}_ms"
        if self.phase is not None and key not in self.timings:
            self.timings[key] = (time.perf_counter() - self.phase_started) * 1000

    def note_lag(self, lag_ms: float) -> None:
        """Keep the largest event-loop lag seen during this attempt."""
        if self.max_lag_ms is None or lag_ms > self.max_lag_ms:
            self.max_lag_ms = lag_ms

    def capture(self, exc: BaseException, *, replace: bool = False) -> None:
        """Remember the failure of the current phase (the first one, unless ``replace``)."""
        if self.error is not None and not replace:
            return
        name, message = describe(exc)
        tb = "".join(traceback.format_exception(exc))
        self.error = ErrorInfo(type=name, message=message, traceback=tb, phase=self.phase)
        self.failure = exc

    # -- values written ----------------------------------------------------------------

    def checkpoint_values(self, result_json: Any) -> dict[str, Any]:
        """Execute's result and timings, committed before record starts."""
        self.checkpoint = result_json
        return {
            "result": result_json,
            "checkpointed": True,
            "phase": "record",
            "heartbeat_at": utcnow(),
            **self.timings,
        }

    def success_values(self) -> dict[str, Any]:
        """The execution row's end state after a successful record."""
        self.leave()
        now = utcnow()
        return {
            "status": ExecutionStatus.SUCCEEDED.value,
            "finished_at": now,
            "heartbeat_at": now,
            "phase": "record",
            "max_loop_lag_ms": self.max_lag_ms,
            **self.timings,
        }

    def failure_values(self, status: ExecutionStatus, wait: float | None) -> dict[str, Any]:
        """The execution row after a failed attempt (``retrying`` waits ``wait`` s)."""
        assert self.error is not None
        now = utcnow()
        retrying = status is ExecutionStatus.RETRYING
        return {
            "status": status.value,
            "phase": self.error.phase,
            "finished_at": None if retrying else now,
            "next_retry_at": now + timedelta(seconds=wait or 0) if retrying else None,
            "error_type": self.error.type,
            "error_message": self.error.message,
            "error_traceback": self.error.traceback,
            "max_loop_lag_ms": self.max_lag_ms,
            **self.timings,
        }

    def insert_for_failure(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """For an inline run whose insert rolled back: the row to create instead."""
        if self.lease.how != "insert" or self.insert_row is None:
            return None
        return {**self.insert_row, **values}

    def ledger_row(self, status: ExecutionStatus, wait: float | None = None) -> dict[str, Any]:
        """This attempt's row in ``jobrunner_attempts``."""
        error = self.error
        return {
            "execution_id": self.execution_id,
            "number": self.number,
            "status": status.value,
            "phase": error.phase if error else self.phase,
            "resumed_from": self.resume_from,
            "worker": self.lease.worker,
            "triggered_by": self.triggered_by,
            "started_at": self.started_at,
            "finished_at": utcnow(),
            "load_ms": self.timings.get("load_ms"),
            "execute_ms": self.timings.get("execute_ms"),
            "record_ms": self.timings.get("record_ms"),
            "max_loop_lag_ms": self.max_lag_ms,
            "wait_s": wait,
            "error_type": error.type if error else None,
            "error_message": error.message if error else None,
            "error_traceback": error.traceback if error else None,
        }

    def final_status(self) -> ExecutionStatus:
        """The status an attempt that will not be retried ends with."""
        exc = self.failure
        if isinstance(exc, JobTimedOut):
            return ExecutionStatus.TIMED_OUT
        if isinstance(exc, ExecutionCancelled):
            return ExecutionStatus.CANCELLED
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
            return ExecutionStatus.ABANDONED
        return ExecutionStatus.FAILED


def new_row(
    job_cls: type[PhasedJob],
    args_json: dict[str, Any],
    *,
    execution_id: uuid.UUID,
    now: datetime,
    triggered_by: str,
    idempotency_key: str | None,
    external_id: str | None = None,
    due_at: datetime | None = None,
    concurrency_key: str | None = None,
) -> dict[str, Any]:
    """A fresh pending execution row."""
    return {
        "id": execution_id,
        "job": job_cls.name,
        "handler": job_cls.handler,
        "args": args_json,
        "status": ExecutionStatus.PENDING.value,
        "phase": None,
        "attempt": 0,
        "max_attempts": job_cls.retry.max_attempts,
        "triggered_by": triggered_by,
        "external_id": external_id,
        "worker": None,
        "lease_token": 0,
        "idempotency_key": idempotency_key,
        "concurrency_key": concurrency_key,
        "cancel_requested": False,
        "created_at": now,
        "next_retry_at": due_at,
        "checkpointed": False,
    }
