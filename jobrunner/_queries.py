"""The framework's SQL, all of it: plain functions over a SQLAlchemy ``Connection``.

Every status transition lives here and checks where it comes from, so two workers can
never both move one execution. The async runner calls these through
``AsyncConnection.run_sync``; nothing here knows whether it runs sync or async.
Statements are Core and built once at import (SQLAlchemy's compiled cache then skips
recompiling), and writes use ``RETURNING`` instead of reading back.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, and_, bindparam, delete, false, func, insert, select, true
from sqlalchemy import update as sa_update

from ._records import Attempt, Execution
from ._schema import CLAIMABLE_STATUSES, ExecutionStatus, attempts, executions, metadata

E = executions.c
RUNNING = ExecutionStatus.RUNNING.value

#: Columns a claim returns: what a worker needs to run the execution.
_CLAIM_COLUMNS = (
    E.id,
    E.job,
    E.handler,
    E.args,
    E.attempt,
    E.max_attempts,
    E.lease_token,
    E.checkpointed,
    E.result,
    E.triggered_by,
)


@dataclasses.dataclass(kw_only=True)
class Lease:
    """The right of one attempt to write an execution's status.

    ``token`` is the fencing token of the claim. ``how`` is ``insert`` while an inline
    run's first phase (which creates the row already running) has not committed yet, and
    ``held`` once the lease is known to be in the database.
    """

    execution_id: uuid.UUID
    worker: str
    token: int
    how: Literal["insert", "held"] = "held"


# -- schema --------------------------------------------------------------------------


def create_schema(conn: Connection) -> None:
    """Create the jobrunner tables and indexes if they are missing."""
    metadata.create_all(conn)


# -- creating executions ---------------------------------------------------------------

_INSERT = insert(executions)


def insert_execution(conn: Connection, values: Mapping[str, Any]) -> None:
    """Insert one execution row (pending for submit, running for an inline run)."""
    conn.execute(_INSERT, dict(values))


def find_by_idempotency_key(conn: Connection, key: str) -> Execution | None:
    """The execution submitted earlier with ``key``, if any."""
    row = conn.execute(select(executions).where(E.idempotency_key == key)).mappings().first()
    return Execution.from_row(row) if row else None


# -- claiming ----------------------------------------------------------------------------

_CLAIM_SET = {
    "status": RUNNING,
    "attempt": E.attempt + 1,
    "lease_token": E.lease_token + 1,
    "worker": bindparam("worker"),
    "started_at": func.coalesce(E.started_at, bindparam("now")),
    "heartbeat_at": bindparam("now"),
    "finished_at": None,
    "next_retry_at": None,
    "phase": bindparam("phase"),
    "error_type": None,
    "error_message": None,
    "error_traceback": None,
}
_CLAIMABLE = and_(E.status.in_(CLAIMABLE_STATUSES), E.cancel_requested == false())

_CLAIM_ONE = (
    sa_update(executions)
    .where(E.id == bindparam("eid"), _CLAIMABLE)
    .values(_CLAIM_SET)
    .returning(*_CLAIM_COLUMNS)
)


def claim(
    conn: Connection, execution_id: uuid.UUID, *, worker: str, now: datetime, phase: str
) -> dict[str, Any] | None:
    """Move a pending/retrying execution to running for ``worker``; None if not claimable."""
    row = (
        conn.execute(
            _CLAIM_ONE, {"eid": execution_id, "worker": worker, "now": now, "phase": phase}
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


def claim_due(
    conn: Connection, *, worker: str, now: datetime, limit: int, jobs: Sequence[str]
) -> list[dict[str, Any]]:
    """Claim up to ``limit`` executions whose ``next_retry_at`` has come.

    On PostgreSQL the candidates are locked with ``FOR UPDATE SKIP LOCKED``, so workers
    calling this at once each get different executions and nobody waits. SQLite
    serialises writers (BEGIN IMMEDIATE), which gives the same guarantee. Only
    executions of ``jobs`` (names this worker can run) are taken.
    """
    if not jobs:
        return []
    due = (
        select(E.id)
        .where(_CLAIMABLE, E.next_retry_at <= now, E.job.in_(list(jobs)))
        .order_by(E.next_retry_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        sa_update(executions)
        .where(E.id.in_(due.scalar_subquery()), _CLAIMABLE)
        .values({**_CLAIM_SET, "phase": "load"})
        .returning(*_CLAIM_COLUMNS)
    )
    rows = conn.execute(stmt, {"worker": worker, "now": now}).mappings().all()
    return [dict(r) for r in rows]


# -- writes an attempt makes while it holds the lease -----------------------------------


def _owned(lease: Lease) -> Any:
    """WHERE clause matching the row only while ``lease`` still owns it."""
    owned = and_(E.id == lease.execution_id, E.status == RUNNING, E.lease_token == lease.token)
    return owned if lease.how == "held" else and_(owned, E.worker == lease.worker)


def checkpoint(conn: Connection, lease: Lease, values: Mapping[str, Any]) -> bool | None:
    """Store execute's result. Returns ``cancel_requested``, or None if the lease is lost."""
    stmt = (
        sa_update(executions)
        .where(_owned(lease))
        .values(dict(values))
        .returning(E.cancel_requested)
    )
    row = conn.execute(stmt).first()
    return None if row is None else bool(row[0])


def heartbeat(conn: Connection, lease: Lease, now: datetime) -> bool | None:
    """Refresh the lease. Returns ``cancel_requested``, or None if the lease is lost."""
    return checkpoint(conn, lease, {"heartbeat_at": now})


def finish(
    conn: Connection,
    lease: Lease,
    values: Mapping[str, Any],
    attempt_row: Mapping[str, Any],
    *,
    insert_if_missing: Mapping[str, Any] | None = None,
) -> Execution | None:
    """End an attempt: update the execution and append its ledger row, atomically.

    Returns the updated execution, or None when the lease was lost (nothing written).
    ``insert_if_missing`` creates the row instead when an inline run's insert rolled back.
    """
    stmt = sa_update(executions).where(_owned(lease)).values(dict(values)).returning(executions)
    row = conn.execute(stmt).mappings().first()
    if row is None and insert_if_missing is not None:
        exists = conn.execute(select(E.id).where(E.id == lease.execution_id)).first()
        if exists is None:
            conn.execute(_INSERT, dict(insert_if_missing))
            row = (
                conn.execute(select(executions).where(E.id == lease.execution_id))
                .mappings()
                .first()
            )
    if row is None:
        return None
    conn.execute(insert(attempts), dict(attempt_row))
    return Execution.from_row(row)


# -- reads -----------------------------------------------------------------------------------


def get(conn: Connection, execution_id: uuid.UUID) -> Execution | None:
    """One execution by id."""
    row = conn.execute(select(executions).where(E.id == execution_id)).mappings().first()
    return Execution.from_row(row) if row else None


def list_executions(
    conn: Connection,
    *,
    status: Iterable[str] | None = None,
    job: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[Execution]:
    """Executions newest first, filtered by status, job name and creation time."""
    stmt = select(executions).order_by(E.created_at.desc(), E.id).limit(limit)
    if status is not None:
        stmt = stmt.where(E.status.in_([str(s) for s in status]))
    if job is not None:
        stmt = stmt.where(E.job == job)
    if since is not None:
        stmt = stmt.where(E.created_at >= since)
    return [Execution.from_row(r) for r in conn.execute(stmt).mappings()]


def list_attempts(conn: Connection, execution_id: uuid.UUID) -> list[Attempt]:
    """The ledger of one execution, oldest attempt first."""
    stmt = (
        select(attempts)
        .where(attempts.c.execution_id == execution_id)
        .order_by(attempts.c.number, attempts.c.id)
    )
    return [Attempt.from_row(r) for r in conn.execute(stmt).mappings()]


# -- operator actions ------------------------------------------------------------------------


def cancel(conn: Connection, execution_id: uuid.UUID, now: datetime) -> Execution | None:
    """Cancel at once if not running; flag a running execution for its worker to stop."""
    stmt = (
        sa_update(executions)
        .where(E.id == execution_id, E.status.in_(CLAIMABLE_STATUSES))
        .values(
            status=ExecutionStatus.CANCELLED.value,
            finished_at=now,
            next_retry_at=None,
            cancel_requested=true(),
        )
        .returning(executions)
    )
    row = conn.execute(stmt).mappings().first()
    if row is None:
        stmt = (
            sa_update(executions)
            .where(E.id == execution_id, E.status == RUNNING)
            .values(cancel_requested=true())
            .returning(executions)
        )
        row = conn.execute(stmt).mappings().first()
    return Execution.from_row(row) if row else None


def requeue(
    conn: Connection,
    execution_id: uuid.UUID,
    *,
    from_statuses: Sequence[str],
    max_attempts: int,
    triggered_by: str,
    now: datetime,
) -> Execution | None:
    """Put a finished execution back to pending for an explicit retry."""
    stmt = (
        sa_update(executions)
        .where(E.id == execution_id, E.status.in_(list(from_statuses)))
        .values(
            status=ExecutionStatus.PENDING.value,
            max_attempts=max_attempts,
            triggered_by=triggered_by,
            cancel_requested=false(),
            next_retry_at=now,
            finished_at=None,
        )
        .returning(executions)
    )
    row = conn.execute(stmt).mappings().first()
    return Execution.from_row(row) if row else None


def delete_executions(conn: Connection, ids: Sequence[uuid.UUID]) -> int:
    """Delete executions (their attempts go with them)."""
    conn.execute(delete(attempts).where(attempts.c.execution_id.in_(ids)))
    return conn.execute(delete(executions).where(E.id.in_(ids))).rowcount
