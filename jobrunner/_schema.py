"""The two tables jobrunner owns, and the statuses an execution moves through."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    false,
    literal_column,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class ExecutionStatus(enum.StrEnum):
    """Where an execution is in its life.

    ``pending → running → succeeded | failed | retrying → running ... | timed_out |
    cancelled``. ``abandoned`` is an attempt's status in the ledger (its worker died or
    was stopped); an execution moves on from it at once. Every change is a row of
    :data:`jobrunner._lifecycle.TRANSITIONS`.
    """

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    ABANDONED = "abandoned"

    @property
    def is_terminal(self) -> bool:
        """True when only an explicit ``retry()`` can change this status."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {
        ExecutionStatus.SUCCEEDED,
        ExecutionStatus.FAILED,
        ExecutionStatus.TIMED_OUT,
        ExecutionStatus.CANCELLED,
    }
)
CLAIMABLE_STATUSES = (ExecutionStatus.PENDING.value, ExecutionStatus.RETRYING.value)

#: The queue of executions whose job and submit name none.
DEFAULT_QUEUE = "default"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("jobrunner stores aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _json() -> Any:
    return JSON().with_variant(JSONB(), "postgresql")


metadata = MetaData()

executions = Table(
    "jobrunner_executions",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("job", String(200), nullable=False),
    Column("handler", String(500), nullable=False),
    Column("args", _json(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("phase", String(16)),
    Column("queue", String(100), nullable=False, server_default=DEFAULT_QUEUE),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("attempt", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("triggered_by", String(100), nullable=False),
    Column("external_id", String(255)),
    Column("worker", String(255)),
    Column("lease_token", BigInteger, nullable=False),
    Column("idempotency_key", String(255)),
    Column("concurrency_key", String(255)),
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime()),
    Column("finished_at", UTCDateTime()),
    Column("heartbeat_at", UTCDateTime()),
    Column("lease_expires_at", UTCDateTime()),
    Column("due_at", UTCDateTime()),
    Column("dispatch", String(32)),
    Column("dispatched_at", UTCDateTime()),
    Column("load_ms", Float),
    Column("execute_ms", Float),
    Column("record_ms", Float),
    Column("max_loop_lag_ms", Float),
    Column("checkpointed", Boolean, nullable=False, server_default=false()),
    Column("result", _json()),
    Column("error_type", String(255)),
    Column("error_message", Text),
    Column("error_traceback", Text),
    # W3C trace context of the submit (``traceparent``/``tracestate``), for tracing.
    Column("trace_context", _json()),
    # The claim: waiting executions by queue, highest priority first, oldest due first.
    Index(
        "ix_jobrunner_executions_due",
        "queue",
        literal_column("priority DESC"),
        "due_at",
        postgresql_where=literal_column("status IN ('pending', 'retrying')"),
        sqlite_where=literal_column("status IN ('pending', 'retrying')"),
    ),
    # The reaper: running executions by lease expiry.
    Index(
        "ix_jobrunner_executions_lease",
        "lease_expires_at",
        postgresql_where=literal_column("status = 'running'"),
        sqlite_where=literal_column("status = 'running'"),
    ),
    # The relay: executions a broker should run, by when their message was last sent.
    Index(
        "ix_jobrunner_executions_dispatch",
        "dispatch",
        "dispatched_at",
        postgresql_where=literal_column("status IN ('pending', 'retrying')"),
        sqlite_where=literal_column("status IN ('pending', 'retrying')"),
    ),
    # Listing and counting stay index-backed and bounded as history grows: every filter
    # the CLI and the dashboard offer, newest first.
    Index("ix_jobrunner_executions_job_status_created", "job", "status", "created_at"),
    Index("ix_jobrunner_executions_status_created", "status", "created_at"),
    Index("ix_jobrunner_executions_queue_created", "queue", "created_at"),
    Index("ix_jobrunner_executions_queue_status_created", "queue", "status", "created_at"),
    Index("ix_jobrunner_executions_created_at", "created_at"),
    Index("ix_jobrunner_executions_finished_at", "finished_at"),
    # An idempotency key means one request of one job: unique per job, not across jobs.
    Index("ux_jobrunner_executions_job_idempotency_key", "job", "idempotency_key", unique=True),
)

attempts = Table(
    "jobrunner_attempts",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column(
        "execution_id",
        Uuid(),
        ForeignKey("jobrunner_executions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("number", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("phase", String(16)),
    Column("resumed_from", String(16), nullable=False),
    Column("worker", String(255)),
    Column("triggered_by", String(100)),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=False),
    Column("load_ms", Float),
    Column("execute_ms", Float),
    Column("record_ms", Float),
    Column("max_loop_lag_ms", Float),
    Column("wait_s", Float),
    Column("error_type", String(255)),
    Column("error_message", Text),
    Column("error_traceback", Text),
    Index("ix_jobrunner_attempts_execution", "execution_id", "number"),
)


queues = Table(
    "jobrunner_queues",
    metadata,
    Column("name", String(100), primary_key=True),
    # Set while the queue is paused: workers claim nothing from it.
    Column("paused_at", UTCDateTime()),
    Column("paused_by", String(255)),
)

audit = Table(
    "jobrunner_audit",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("action", String(32), nullable=False),
    # No foreign key: the record of an action outlives the pruned execution it was on.
    Column("execution_id", Uuid()),
    Column("queue", String(100)),
    Column("detail", _json()),
    Index("ix_jobrunner_audit_execution", "execution_id", "at"),
    Index("ix_jobrunner_audit_at", "at"),
)
