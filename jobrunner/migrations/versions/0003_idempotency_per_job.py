"""Idempotency keys scoped to their job.

The unique index on ``idempotency_key`` alone made a key global: another job submitting
the same key got the first job's execution back. It becomes unique per (job, key).

Revision ID: jobrunner_0003
Revises: jobrunner_0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "jobrunner_0003"
down_revision: str | Sequence[str] | None = "jobrunner_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "jobrunner_executions"


def upgrade() -> None:
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
