"""The state of one attempt and every value it writes: shared by both runners.

The runners only sequence I/O; what an attempt writes, and which status follows a
failure, is decided here once.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from ._job import PhasedJob
from ._queries import Lease
from ._retry import RetryPolicy
from ._schema import DEFAULT_QUEUE, ExecutionStatus

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
    queue: str = DEFAULT_QUEUE
    #: An async user step is running that a cancel or a lost lease may interrupt.
    interruptible: bool = False
    #: W3C trace context stored at submit, and when the claimed execution was due
    #: (for instruments: the consumer span's parent, the queue wait).
    trace_context: dict[str, str] | None = None
    due_at: datetime | None = None

    @property
    def execution_id(self) -> uuid.UUID:
        """The execution's id."""
        return self.lease.execution_id

    @property
    def concurrency(self) -> tuple[str, str, int] | None:
        """(job, key, limit) when the job limits how many of its executions run at once."""
        limit = self.job_cls.max_concurrency
        if limit is None or self.concurrency_key is None:
            return None
        return self.job_cls.name, self.concurrency_key, limit

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
        lease_s: float,
        triggered_by: str,
        external_id: str | None = None,
    ) -> AttemptState:
        """A new execution run in this process: its row is inserted running, held, by load.

        The insert is the last statement of load's transaction (its lease then starts
        when execute does) and says ``phase = execute``: nobody sees the row before.
        """
        now = utcnow()
        lease = Lease(
            execution_id=uuid.uuid4(), worker=worker, token=1, seconds=lease_s, how="insert"
        )
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
            lease_expires_at=lease_s,
            phase="execute",
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
            queue=row["queue"],
        )

    @classmethod
    def claimed(
        cls, job_cls: type[PhasedJob], row: dict[str, Any], *, worker: str, lease_s: float
    ) -> AttemptState:
        """An execution this runner has just claimed (its lease is committed)."""
        lease = Lease(
            execution_id=row["id"], worker=worker, token=row["lease_token"], seconds=lease_s
        )
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
            queue=row["queue"],
            trace_context=row.get("trace_context"),
            due_at=row.get("due_at"),
        )

    def adopt_claim(self, row: dict[str, Any]) -> None:
        """Take over the lease of a fresh claim for the next attempt."""
        self.lease = Lease(
            execution_id=row["id"],
            worker=self.lease.worker,
            token=row["lease_token"],
            seconds=self.lease.seconds,
        )
        self.number = row["attempt"]
        self.max_attempts = row["max_attempts"]
        self.resume_from = "record" if row["checkpointed"] else "load"
        self.checkpoint = row["result"]
        self.needs_claim = False
        self.started_at = utcnow()
        self.due_at = row.get("due_at")

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
        """Keep the longest this attempt's own code held the event loop in one step."""
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
        return {"result": result_json, "checkpointed": True, "phase": "record", **self.timings}

    def success_values(self) -> dict[str, Any]:
        """What a successful record writes beside the ``succeeded`` status."""
        self.leave()
        return {"phase": "record", "max_loop_lag_ms": self.max_lag_ms, **self.timings}

    def failure_values(self) -> dict[str, Any]:
        """What a failed attempt writes beside its status (which the ending decides)."""
        assert self.error is not None
        return {
            "phase": self.error.phase,
            "error_type": self.error.type,
            "error_message": self.error.message,
            "error_traceback": self.error.traceback,
            "max_loop_lag_ms": self.max_lag_ms,
            **self.timings,
        }

    def insert_for_failure(
        self, values: dict[str, Any], status: ExecutionStatus, wait: float, *, counted: bool
    ) -> dict[str, Any] | None:
        """For an inline run whose first insert rolled back: the row to create instead.

        Nobody else has seen the execution, so no cancel can be pending: the status the
        runner decided is the status written.
        """
        if self.lease.how != "insert" or self.insert_row is None:
            return None
        waits = status is ExecutionStatus.RETRYING
        row = {**self.insert_row, **values, "status": status.value, "lease_expires_at": None}
        row.update(
            due_at=wait if waits else 0.0,
            finished_at=None if waits else utcnow(),
            max_attempts=self.max_attempts + (0 if counted else 1),
        )
        return row

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


def new_row(
    job_cls: type[PhasedJob],
    args_json: dict[str, Any],
    *,
    execution_id: uuid.UUID,
    now: datetime,
    triggered_by: str,
    idempotency_key: str | None,
    external_id: str | None = None,
    due_at: datetime | float = 0.0,
    concurrency_key: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """A fresh pending execution row (``due_at`` in seconds is from the database's now)."""
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
        "due_at": due_at,
        "checkpointed": False,
        "queue": queue or job_cls.queue,
        "priority": job_cls.priority if priority is None else priority,
        "dispatch": None,
        "dispatched_at": None,
    }
