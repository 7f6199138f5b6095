"""Read-only values returned by the runners: one execution, one attempt."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Self

from ._exceptions import ExecutionFailed
from ._schema import ExecutionStatus


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Execution:
    """One row of ``jobrunner_executions``: what ran, how, and how it ended."""

    id: uuid.UUID
    job: str
    handler: str
    args: dict[str, Any]
    status: ExecutionStatus
    phase: str | None
    queue: str
    priority: int
    attempt: int
    max_attempts: int
    triggered_by: str
    external_id: str | None
    worker: str | None
    lease_token: int
    idempotency_key: str | None
    concurrency_key: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    due_at: datetime | None
    dispatch: str | None
    dispatched_at: datetime | None
    load_ms: float | None
    execute_ms: float | None
    record_ms: float | None
    max_loop_lag_ms: float | None
    checkpointed: bool
    result: Any
    error_type: str | None
    error_message: str | None
    error_traceback: str | None
    #: The W3C trace context of the submit (``traceparent``, ``tracestate``), if traced.
    trace_context: dict[str, str] | None = None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        """Build from a ``jobrunner_executions`` row mapping."""
        values = dict(row)
        values["status"] = ExecutionStatus(values["status"])
        return cls(**values)

    def log_fields(self) -> dict[str, Any]:
        """The structured fields (``extra``) of a log line about this execution."""
        return {
            "execution_id": str(self.id),
            "job": self.job,
            "attempt": self.attempt,
            "phase": self.phase,
        }

    @property
    def next_retry_at(self) -> datetime | None:
        """When a ``retrying`` execution is due again (None otherwise)."""
        return self.due_at if self.status is ExecutionStatus.RETRYING else None

    @property
    def duration_ms(self) -> float | None:
        """Wall time from start to finish, when both are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds() * 1000

    @property
    def succeeded(self) -> bool:
        """True when the execution ended ``succeeded``."""
        return self.status is ExecutionStatus.SUCCEEDED

    def raise_for_status(self) -> Self:
        """Return self if succeeded, else raise :class:`ExecutionFailed` with the error."""
        if self.status is not ExecutionStatus.SUCCEEDED:
            raise ExecutionFailed(self)
        return self


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class JobStats:
    """Executions of one job in one status over a window: how many, how long they took.

    Durations run from start to finish (retry waits included, as in
    :attr:`Execution.duration_ms`); the percentiles interpolate like PostgreSQL's
    ``percentile_cont`` and are None when no execution in the group has finished.
    Reading stays bounded however long the history: counting stops at a cap (then
    ``capped`` is True and ``count`` is a lower bound), and the percentiles are over
    the newest executions of the group only (then ``sampled`` is True);
    ``sample_size`` is how many durations they were computed from. The limits are
    ``jobrunner._queries.STATS_COUNT_CAP`` (10,000) and ``STATS_SAMPLE`` (1,000).
    """

    job: str
    status: ExecutionStatus
    count: int
    p50_ms: float | None
    p95_ms: float | None
    #: True when counting stopped at the cap: there are at least ``count``.
    capped: bool = False
    #: How many durations p50/p95 were computed from.
    sample_size: int = 0
    #: True when p50/p95 are over the newest executions of the group only.
    sampled: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Attempt:
    """One row of ``jobrunner_attempts``: a single try at an execution."""

    id: int
    execution_id: uuid.UUID
    number: int
    status: ExecutionStatus
    phase: str | None
    resumed_from: str
    worker: str | None
    triggered_by: str | None
    started_at: datetime
    finished_at: datetime
    load_ms: float | None
    execute_ms: float | None
    record_ms: float | None
    max_loop_lag_ms: float | None
    wait_s: float | None
    error_type: str | None
    error_message: str | None
    error_traceback: str | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        """Build from a ``jobrunner_attempts`` row mapping."""
        values = dict(row)
        values["status"] = ExecutionStatus(values["status"])
        return cls(**values)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditEntry:
    """One row of ``jobrunner_audit``: an operator's action, who took it and when."""

    id: int
    at: datetime
    actor: str
    action: str
    execution_id: uuid.UUID | None
    queue: str | None
    detail: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        """Build from a ``jobrunner_audit`` row mapping."""
        return cls(**dict(row))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class QueueState:
    """A queue's pause, as ``jobrunner_queues`` holds it (a queue never paused has none)."""

    name: str
    paused_at: datetime | None
    paused_by: str | None

    @property
    def paused(self) -> bool:
        """True while workers claim nothing from this queue."""
        return self.paused_at is not None
