"""Initial schema: jobrunner_executions and jobrunner_attempts.

Revision ID: jobrunner_0001
Revises:
Create Date: 2024-06-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "jobrunner_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("jobrunner",)
depends_on: str | Sequence[str] | None = None


def _json() -> sa.JSON:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobrunner_executions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("job", sa.String(length=200), nullable=False),
        sa.Column("handler", sa.String(length=500), nullable=False),
        sa.Column("args", _json(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("triggered_by", sa.String(length=100), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("lease_token", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("concurrency_key", sa.String(length=255), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=True),
        sa.Column("finished_at", _timestamp(), nullable=True),
        sa.Column("heartbeat_at", _timestamp(), nullable=True),
        sa.Column("next_retry_at", _timestamp(), nullable=True),
        sa.Column("load_ms", sa.Float(), nullable=True),
        sa.Column("execute_ms", sa.Float(), nullable=True),
        sa.Column("record_ms", sa.Float(), nullable=True),
        sa.Column("max_loop_lag_ms", sa.Float(), nullable=True),
        sa.Column("checkpointed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("result", _json(), nullable=True),
        sa.Column("error_type", sa.String(length=255), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_jobrunner_executions_status_next_retry",
        "jobrunner_executions",
        ["status", "next_retry_at"],
    )
    op.create_index("ix_jobrunner_executions_job_status", "jobrunner_executions", ["job", "status"])
    op.create_index("ix_jobrunner_executions_created_at", "jobrunner_executions", ["created_at"])
    op.create_index(
        "ux_jobrunner_executions_idempotency_key",
        "jobrunner_executions",
        ["idempotency_key"],
        unique=True,
    )
    op.create_table(
        "jobrunner_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=True),
        sa.Column("resumed_from", sa.String(length=16), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("triggered_by", sa.String(length=100), nullable=True),
        sa.Column("started_at", _timestamp(), nullable=False),
        sa.Column("finished_at", _timestamp(), nullable=False),
        sa.Column("load_ms", sa.Float(), nullable=True),
        sa.Column("execute_ms", sa.Float(), nullable=True),
        sa.Column("record_ms", sa.Float(), nullable=True),
        sa.Column("max_loop_lag_ms", sa.Float(), nullable=True),
        sa.Column("wait_s", sa.Float(), nullable=True),
        sa.Column("error_type", sa.String(length=255), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["execution_id"], ["jobrunner_executions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_jobrunner_attempts_execution", "jobrunner_attempts", ["execution_id", "number"]
    )


def downgrade() -> None:
    op.drop_table("jobrunner_attempts")
    op.drop_table("jobrunner_executions")
