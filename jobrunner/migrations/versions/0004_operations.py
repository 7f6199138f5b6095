"""Operations: paused queues, an audit of operator actions, trace context, bounded reads.

``jobrunner_queues`` holds a queue's pause (workers claim nothing from a paused queue);
``jobrunner_audit`` records who retried, cancelled, paused or resumed what, and when;
``trace_context`` keeps a submit's W3C trace context for the attempts that run it. The
indexes keep every listing and count bounded as history grows: each filter the CLI and
the dashboard offer (job, status, queue) comes with ``created_at`` for newest-first
pages, and ``finished_at`` serves "what ended in the last hour". The two-column
``(job, status)`` index is replaced by its three-column successor.

Revision ID: jobrunner_0004
Revises: jobrunner_0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "jobrunner_0004"
down_revision: str | Sequence[str] | None = "jobrunner_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "jobrunner_executions"

_INDEXES = {
    "ix_jobrunner_executions_job_status_created": ["job", "status", "created_at"],
    "ix_jobrunner_executions_status_created": ["status", "created_at"],
    "ix_jobrunner_executions_queue_created": ["queue", "created_at"],
    "ix_jobrunner_executions_queue_status_created": ["queue", "status", "created_at"],
    "ix_jobrunner_executions_finished_at": ["finished_at"],
}


def _json() -> sa.JSON:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column("trace_context", _json(), nullable=True))
    for name, columns in _INDEXES.items():
        op.create_index(name, TABLE, columns, if_not_exists=True)
    op.drop_index("ix_jobrunner_executions_job_status", table_name=TABLE)
    op.create_table(
        "jobrunner_queues",
        sa.Column("name", sa.String(length=100), primary_key=True),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paused_by", sa.String(length=255), nullable=True),
    )
    op.create_table(
        "jobrunner_audit",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("execution_id", sa.Uuid(), nullable=True),
        sa.Column("queue", sa.String(length=100), nullable=True),
        sa.Column("detail", _json(), nullable=True),
    )
    op.create_index("ix_jobrunner_audit_execution", "jobrunner_audit", ["execution_id", "at"])
    op.create_index("ix_jobrunner_audit_at", "jobrunner_audit", ["at"])


def downgrade() -> None:
    op.drop_table("jobrunner_audit")
    op.drop_table("jobrunner_queues")
    op.create_index("ix_jobrunner_executions_job_status", TABLE, ["job", "status"])
    for name in _INDEXES:
        op.drop_index(name, table_name=TABLE)
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column("trace_context")
