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

from sqlalchemy import Connection, and_, bindparam, delete, false, func, insert, select, true, tuple_
from sqlalchemy import update as sa_update

from ._records import Attempt, Execution, JobStats
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
    # Lock the candidates first, then update exactly those ids. A single
    # `UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` is not safe:
    # PostgreSQL may re-run the subquery, and each run skips the rows the last one locked,
    # so far more than ``limit`` rows get claimed.
    due = (
        select(E.id)
        .where(_CLAIMABLE, E.next_retry_at <= now, E.job.in_(list(jobs)))
        .order_by(E.next_retry_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(conn.execute(due).scalars())
    if not ids:
        return []
    stmt = (
        sa_update(executions)
        .where(E.id.in_(ids), _CLAIMABLE)
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


def heartbeat(
    conn: Connection, leases: Sequence[tuple[uuid.UUID, int]], now: datetime
) -> dict[uuid.UUID, bool]:
    """Refresh many leases in one statement; ``{id: cancel_requested}`` for those still held.

    An id missing from the answer has lost its lease (reaped, or claimed by another worker).
    """
    if not leases:
        return {}
    stmt = (
        sa_update(executions)
        .where(E.status == RUNNING, tuple_(E.id, E.lease_token).in_(list(leases)))
        .values(heartbeat_at=now)
        .returning(E.id, E.cancel_requested)
    )
    return {row[0]: bool(row[1]) for row in conn.execute(stmt)}


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


# -- housekeeping and statistics (prune, stats, id prefixes) --------------------------------


def prune_batch(conn: Connection, *, before: datetime, statuses: Sequence[str], limit: int) -> int:
    """Delete up to ``limit`` executions in ``statuses`` that finished before ``before``.

    Returns how many were deleted; callers loop, one short transaction per batch. Rows
    are found through the ``created_at`` index (an execution finishes after it is
    created) and, on PostgreSQL, locked with ``SKIP LOCKED`` so a concurrent ``retry()``
    of the same execution either wins or waits, never half-applies.
    """
    finished = func.coalesce(E.finished_at, E.created_at)
    ids = (
        conn.execute(
            select(E.id)
            .where(E.created_at < before, finished < before, E.status.in_(list(statuses)))
            .order_by(E.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    return delete_executions(conn, ids) if ids else 0


_PERCENTILES = (50, 95)


def _duration_ms(dialect: str) -> Any:
    """Start-to-finish milliseconds as SQL: interval arithmetic differs per backend."""
    if dialect == "postgresql":
        return func.date_part("epoch", E.finished_at - E.started_at) * 1000.0
    return (func.julianday(E.finished_at) - func.julianday(E.started_at)) * 86_400_000.0


def _rank_bounds(n: Any, pct: int) -> tuple[Any, Any]:
    """1-based ranks around the ``pct`` percentile of ``n`` sorted values (integer SQL)."""
    return 1 + (n - 1) * pct // 100, 1 + ((n - 1) * pct + 99) // 100


def _percentile(values: Mapping[int, float], n: int, pct: int) -> float:
    """``percentile_cont``: linear interpolation between the two neighbouring ranks."""
    lo, hi = _rank_bounds(n, pct)
    fraction = ((n - 1) * pct % 100) / 100
    return values[lo] + fraction * (values[hi] - values[lo])


def job_stats(conn: Connection, *, since: datetime | None = None) -> list[JobStats]:
    """Counts per job and status, with p50/p95 durations, for executions created since.

    Percentiles are computed portably: a window query ranks durations per group and
    returns only the (at most four) rows around each percentile, so the result stays
    small however many executions the window holds.
    """
    window = [] if since is None else [E.created_at >= since]
    counts = conn.execute(
        select(E.job, E.status, func.count()).where(*window).group_by(E.job, E.status)
    ).all()
    ms = _duration_ms(conn.dialect.name)
    ranked = (
        select(
            E.job,
            E.status,
            ms.label("ms"),
            func.row_number().over(partition_by=[E.job, E.status], order_by=ms).label("rn"),
            func.count().over(partition_by=[E.job, E.status]).label("n"),
        )
        .where(*window, E.started_at.is_not(None), E.finished_at.is_not(None))
        .subquery()
    )
    wanted = [rank for pct in _PERCENTILES for rank in _rank_bounds(ranked.c.n, pct)]
    rows = conn.execute(
        select(ranked.c.job, ranked.c.status, ranked.c.rn, ranked.c.n, ranked.c.ms).where(
            ranked.c.rn.in_(wanted)
        )
    ).all()
    ranks: dict[tuple[str, str], tuple[int, dict[int, float]]] = {}
    for job, status, rn, n, ms in rows:
        ranks.setdefault((job, status), (int(n), {}))[1][int(rn)] = float(ms)
    return sorted(
        (_stats_row(job, status, count, ranks.get((job, status))) for job, status, count in counts),
        key=lambda s: (s.job, s.status.value),
    )


def _stats_row(
    job: str, status: str, count: int, ranked: tuple[int, dict[int, float]] | None
) -> JobStats:
    p50 = p95 = None
    if ranked is not None:
        n, values = ranked
        p50, p95 = (_percentile(values, n, pct) for pct in _PERCENTILES)
    return JobStats(
        job=job, status=ExecutionStatus(status), count=int(count), p50_ms=p50, p95_ms=p95
    )


def find_ids_by_prefix(conn: Connection, prefix: str, *, limit: int = 2) -> list[uuid.UUID]:
    """Execution ids starting with the hex ``prefix`` (dashes ignored), at most ``limit``.

    A range scan on the primary key: UUIDs sort like their hex digits on both backends.
    """
    digits = prefix.replace("-", "").lower()
    low = uuid.UUID(digits.ljust(32, "0"))
    high = uuid.UUID(digits.ljust(32, "f"))
    stmt = select(E.id).where(E.id.between(low, high)).order_by(E.id).limit(limit)
    return list(conn.execute(stmt).scalars())


# -- queue integrations (Celery) ---------------------------------------------------------------


def mark_due(conn: Connection, execution_id: uuid.UUID, at: datetime) -> bool:
    """Make a pending/retrying execution due at ``at`` for ``run_due()``.

    For a queue message that could not be sent: the row is not orphaned. False when
    the execution is no longer waiting (it ran, or was cancelled, meanwhile).
    """
    stmt = (
        sa_update(executions)
        .where(E.id == execution_id, _CLAIMABLE)
        .values(next_retry_at=at)
        .returning(E.id)
    )
    return conn.execute(stmt).first() is not None


def set_external_id(conn: Connection, execution_id: uuid.UUID, external_id: str) -> bool:
    """Point a waiting execution at the queue message that will run it next."""
    stmt = (
        sa_update(executions)
        .where(E.id == execution_id, _CLAIMABLE)
        .values(external_id=external_id)
        .returning(E.id)
    )
    return conn.execute(stmt).first() is not None
