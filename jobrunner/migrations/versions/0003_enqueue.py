"""Enqueue: idempotency keys per job, and an outbox for brokers.

The unique index on ``idempotency_key`` alone made a key global: another job submitting
the same key got the first job's execution back. It becomes unique per (job, key).
``dispatch`` names who runs an execution when it is not a jobrunner worker (``celery``),
and ``dispatched_at`` when its message was last sent: the relay sends again what was
never sent, or never started within a visibility window.

Revision ID: jobrunner_0003
Revises: jobrunner_0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "jobrunner_0003"
down_revision: str | Sequence[str] | None = "jobrunner_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "jobrunner_executions"


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column("dispatch", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobrunner_executions_dispatch",
        TABLE,
        ["dispatch", "dispatched_at"],
        postgresql_where=sa.text("status IN ('pending', 'retrying')"),
        sqlite_where=sa.text("status IN ('pending', 'retrying')"),
    )
    op.drop_index("ux_jobrunner_executions_idempotency_key", table_name=TABLE)
    op.create_index(
        "ux_jobrunner_executions_job_idempotency_key",
        TABLE,
        ["job", "idempotency_key"],
        unique=True,
    )


def downgrade() -> None:
    # Keys reused across jobs while 0003 was applied would collide: downgrading refuses
    # (a unique violation) rather than drop executions.
    op.drop_index("ux_jobrunner_executions_job_idempotency_key", table_name=TABLE)
    op.create_index(
        "ux_jobrunner_executions_idempotency_key", TABLE, ["idempotency_key"], unique=True
    )
    op.drop_index("ix_jobrunner_executions_dispatch", table_name=TABLE)
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column("dispatched_at")
        batch.drop_column("dispatch")
