"""Lifecycle v2: leases on the row, due times, queues and priorities.

Adds ``queue``, ``priority`` and ``lease_expires_at``; renames ``next_retry_at`` to
``due_at`` (every waiting execution now has one, so nothing waits where no worker looks);
replaces the claim and reaper indexes. Rows written by 0.1 are carried over: waiting rows
without a due time become due at their creation, ``abandoned`` rows go on to ``retrying``
or ``failed`` as the reaper would have sent them, waiting rows stuck with a cancel
request become ``cancelled``, and running rows get a lease of 30 s from their last
heartbeat (0.1's default). Stop 0.1 workers before upgrading.

Revision ID: jobrunner_0002
Revises: jobrunner_0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "jobrunner_0002"
down_revision: str | Sequence[str] | None = "jobrunner_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "jobrunner_executions"
#: 0.1's lease: three of its default 10 s heartbeat intervals.
OLD_LEASE_S = 30


def _rows() -> sa.TableClause:
    return sa.table(
        TABLE,
        sa.column("status", sa.String()),
        sa.column("attempt", sa.Integer()),
        sa.column("max_attempts", sa.Integer()),
        sa.column("cancel_requested", sa.Boolean()),
        sa.column("created_at", sa.DateTime()),
        sa.column("finished_at", sa.DateTime()),
        sa.column("due_at", sa.DateTime()),
    )


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(
            sa.Column("queue", sa.String(length=100), server_default="default", nullable=False)
        )
        batch.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_index("ix_jobrunner_executions_status_next_retry")
    # The same statement on PostgreSQL and SQLite (3.25+), without recreating the table.
    op.execute(f"ALTER TABLE {TABLE} RENAME COLUMN next_retry_at TO due_at")
    _carry_rows_over()
    op.create_index(
        "ix_jobrunner_executions_due",
        TABLE,
        ["queue", sa.literal_column("priority DESC"), "due_at"],
        postgresql_where=sa.text("status IN ('pending', 'retrying')"),
        sqlite_where=sa.text("status IN ('pending', 'retrying')"),
    )
    op.create_index(
        "ix_jobrunner_executions_lease",
        TABLE,
        ["lease_expires_at"],
        postgresql_where=sa.text("status = 'running'"),
        sqlite_where=sa.text("status = 'running'"),
    )


def _carry_rows_over() -> None:
    """Plain statements (they also render for ``migrate --sql``), times from the database."""
    from jobrunner._clock import db_now

    rows = _rows()
    c = rows.c
    waiting = c.status.in_(["pending", "retrying"])
    abandoned = c.status == "abandoned"
    now = db_now()
    op.execute(
        sa.update(rows)
        .where(sa.or_(waiting, abandoned), c.cancel_requested == sa.true())
        .values(status="cancelled", finished_at=now)
    )
    op.execute(sa.update(rows).where(waiting, c.due_at.is_(None)).values(due_at=c.created_at))
    op.execute(
        sa.update(rows)
        .where(abandoned, c.attempt < c.max_attempts)
        .values(status="retrying", due_at=now, finished_at=None)
    )
    op.execute(sa.update(rows).where(abandoned).values(status="failed", finished_at=now))
    since = "COALESCE(heartbeat_at, started_at, created_at)"
    lease = (
        f"{since} + interval '{OLD_LEASE_S} seconds'"
        if op.get_context().dialect.name == "postgresql"
        else f"strftime('%Y-%m-%d %H:%M:%f', {since}, '+{OLD_LEASE_S} seconds') || '000'"
    )
    op.execute(f"UPDATE {TABLE} SET lease_expires_at = {lease} WHERE status = 'running'")


def downgrade() -> None:
    op.drop_index("ix_jobrunner_executions_lease", table_name=TABLE)
    op.drop_index("ix_jobrunner_executions_due", table_name=TABLE)
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("priority")
        batch.drop_column("queue")
    op.execute(f"ALTER TABLE {TABLE} RENAME COLUMN due_at TO next_retry_at")
    op.create_index("ix_jobrunner_executions_status_next_retry", TABLE, ["status", "next_retry_at"])
