"""The framework's SQL, all of it: plain functions over a SQLAlchemy ``Connection``.

Every status transition lives here and checks where it comes from, so two workers can
never both move one execution. The async runner calls these through
``AsyncConnection.run_sync``; nothing here knows whether it runs sync or async.
Statements are Core and built once at import (SQLAlchemy's compiled cache then skips
recompiling), and writes use ``RETURNING`` instead of reading back.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy import update as sa_update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

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
    E.concurrency_key,
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


def insert_unique(conn: Connection, values: Mapping[str, Any]) -> uuid.UUID:
    """Insert an execution with an idempotency key, or return the id already holding it.

    ``INSERT ... ON CONFLICT DO NOTHING`` on the unique key, so concurrent submitters
    race safely: exactly one row is created, everybody gets its id.
    """
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = (
        dialect_insert(executions)
        .values(dict(values))
        .on_conflict_do_nothing(index_elements=[E.idempotency_key])
        .returning(E.id)
    )
    inserted = conn.execute(stmt).scalar()
    if inserted is not None:
        return uuid.UUID(str(inserted))
    existing = select(E.id).where(E.idempotency_key == values["idempotency_key"])
    return uuid.UUID(str(conn.execute(existing).scalar_one()))


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
    conn: Connection,
    execution_id: uuid.UUID,
    *,
    worker: str,
    now: datetime,
    phase: str,
    concurrency: tuple[str, int] | None = None,
) -> dict[str, Any] | None:
    """Move a pending/retrying execution to running for ``worker``; None if not claimable.

    With ``concurrency=(key, limit)`` the claim also fails while ``limit`` executions with
    that concurrency key are running (the execution then stays pending).
    """
    if concurrency is not None and _capacity(conn, *concurrency) < 1:
        return None
    row = (
        conn.execute(
            _CLAIM_ONE, {"eid": execution_id, "worker": worker, "now": now, "phase": phase}
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


def _lock_key(conn: Connection, key: str) -> None:
    """Serialise claims of one concurrency key until this transaction ends.

    PostgreSQL: a transaction-scoped advisory lock on the key's hash. SQLite needs none:
    every write transaction already holds the database's write lock (BEGIN IMMEDIATE).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(key))))


def _capacity(conn: Connection, key: str, limit: int) -> int:
    """How many more executions with ``key`` may start now (takes the key's lock)."""
    _lock_key(conn, key)
    running = conn.execute(
        select(func.count()).where(E.status == RUNNING, E.concurrency_key == key)
    ).scalar_one()
    return limit - int(running)


def _saturated(conn: Connection, limits: Mapping[str, int]) -> list[str]:
    """Concurrency keys of limited jobs that are at their limit right now (a hint only)."""
    if not limits:
        return []
    stmt = (
        select(E.job, E.concurrency_key, func.count())
        .where(E.status == RUNNING, E.job.in_(list(limits)), E.concurrency_key.is_not(None))
        .group_by(E.job, E.concurrency_key)
    )
    return [key for job, key, n in conn.execute(stmt) if n >= limits[job]]


def claim_due(
    conn: Connection,
    *,
    worker: str,
    now: datetime,
    limit: int,
    jobs: Sequence[str],
    limits: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Claim up to ``limit`` executions whose ``next_retry_at`` has come.

    On PostgreSQL the candidates are locked with ``FOR UPDATE SKIP LOCKED``, so workers
    calling this at once each get different executions and nobody waits. SQLite
    serialises writers (BEGIN IMMEDIATE), which gives the same guarantee. Only
    executions of ``jobs`` (names this worker can run) are taken, and jobs in ``limits``
    (name -> max_concurrency) never get more running executions per concurrency key.
    """
    if not jobs:
        return []
    limits = limits or {}
    where = [_CLAIMABLE, E.next_retry_at <= now, E.job.in_(list(jobs))]
    saturated = _saturated(conn, limits)
    if saturated:  # don't let executions waiting for a slot starve the others
        where.append(or_(E.concurrency_key.is_(None), E.concurrency_key.not_in(saturated)))
    # Lock the candidates first, then update exactly those ids. A single
    # `UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` is not safe:
    # PostgreSQL may re-run the subquery, and each run skips the rows the last one locked,
    # so far more than ``limit`` rows get claimed.
    due = (
        select(E.id, E.job, E.concurrency_key)
        .where(*where)
        .order_by(E.next_retry_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = _within_limits(conn, conn.execute(due).all(), limits)
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


def _within_limits(
    conn: Connection, candidates: Sequence[Any], limits: Mapping[str, int]
) -> list[uuid.UUID]:
    """The candidate ids that fit their job's concurrency limit (keys locked in order)."""
    free: list[uuid.UUID] = []
    by_key: dict[str, list[uuid.UUID]] = {}
    for execution_id, job, key in candidates:
        if job in limits and key is not None:
            by_key.setdefault(key, []).append(execution_id)
        else:
            free.append(execution_id)
    for key in sorted(by_key):  # a fixed order: two claimers never wait on each other
        job = next(j for _, j, k in candidates if k == key)
        free.extend(by_key[key][: max(0, _capacity(conn, key, limits[job]))])
    return free


# -- writes an attempt makes while it holds the lease -----------------------------------


def _owned_where(how: str) -> Any:
    """WHERE clause matching the row only while the lease (bound as b_*) still owns it."""
    owned = and_(
        E.id == bindparam("b_id"), E.status == RUNNING, E.lease_token == bindparam("b_token")
    )
    return owned if how == "held" else and_(owned, E.worker == bindparam("b_worker"))


def _lease_params(lease: Lease, values: Mapping[str, Any]) -> dict[str, Any]:
    return {**values, "b_id": lease.execution_id, "b_token": lease.token, "b_worker": lease.worker}


# Built once: the SET clause comes from the parameters' keys, so one statement serves
# every call and SQLAlchemy compiles it once per key set.
_CHECKPOINT = {
    how: sa_update(executions).where(_owned_where(how)).returning(E.cancel_requested)
    for how in ("held", "insert")
}
_FINISH = {
    how: sa_update(executions).where(_owned_where(how)).returning(executions)
    for how in ("held", "insert")
}
_INSERT_ATTEMPT = insert(attempts)


@functools.cache
def _finish_cte(how: str, value_keys: tuple[str, ...], attempt_keys: tuple[str, ...]) -> Any:
    """``WITH finished AS (UPDATE ... RETURNING *), ledger AS (INSERT ... SELECT FROM
    finished) SELECT * FROM finished``: the ledger row exists only if the update matched."""
    finished = (
        sa_update(executions)
        .where(_owned_where(how))
        .values({k: bindparam(f"v_{k}", type_=executions.c[k].type) for k in value_keys})
        .returning(*executions.c)
        .cte("finished")
    )
    ledger_values = [bindparam(f"a_{k}", type_=attempts.c[k].type) for k in attempt_keys]
    ledger = (
        insert(attempts)
        .from_select(list(attempt_keys), select(*ledger_values).select_from(finished))
        .cte("ledger")
    )
    return select(finished).add_cte(ledger)


def checkpoint(conn: Connection, lease: Lease, values: Mapping[str, Any]) -> bool | None:
    """Store execute's result. Returns ``cancel_requested``, or None if the lease is lost."""
    row = conn.execute(_CHECKPOINT[lease.how], _lease_params(lease, values)).first()
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
    On PostgreSQL both writes are one statement (a data-modifying CTE): one round trip,
    atomic even outside a transaction.
    """
    if conn.dialect.name == "postgresql" and insert_if_missing is None:
        stmt = _finish_cte(lease.how, tuple(values), tuple(attempt_row))
        params = {f"v_{k}": v for k, v in values.items()}
        params.update({f"a_{k}": v for k, v in attempt_row.items()})
        found = conn.execute(stmt, _lease_params(lease, params)).mappings().first()
        return Execution.from_row(found) if found is not None else None
    row = conn.execute(_FINISH[lease.how], _lease_params(lease, values)).mappings().first()
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
    conn.execute(_INSERT_ATTEMPT, dict(attempt_row))
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


def reap(conn: Connection, *, now: datetime, lease_timeout: float, limit: int) -> list[Execution]:
    """Recover executions whose worker died, and say so in their ledger.

    Running executions whose heartbeat is older than ``lease_timeout`` seconds are
    abandoned: their attempt gets an ``abandoned`` ledger row and their lease token moves
    on, so the old worker, if it is only paused, can no longer write. Those, and
    executions an interrupted worker left ``abandoned``, then go to ``retrying`` (due now;
    a checkpointed one resumes at record) while attempts remain, else to ``failed``.
    Candidates are locked with SKIP LOCKED, so many reapers can run at once.
    """
    cutoff = now - timedelta(seconds=lease_timeout)
    stale = (
        select(
            E.id,
            E.status,
            E.attempt,
            E.max_attempts,
            E.worker,
            E.heartbeat_at,
            E.phase,
            E.triggered_by,
            E.started_at,
        )
        .where(
            or_(
                and_(E.status == RUNNING, E.heartbeat_at < cutoff),
                E.status == ExecutionStatus.ABANDONED.value,
            )
        )
        .order_by(E.heartbeat_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    reaped = []
    for row in conn.execute(stale).mappings().all():
        values: dict[str, Any] = {"lease_token": E.lease_token + 1, "worker": None}
        if row["status"] == RUNNING:
            beat = row["heartbeat_at"]
            last = f"{beat:%Y-%m-%d %H:%M:%S} UTC" if beat is not None else "never"
            message = (
                f"worker {row['worker']} stopped heartbeating (last beat {last}, lease "
                f"{lease_timeout:g}s); attempt {row['attempt']} was abandoned"
            )
            conn.execute(
                insert(attempts),
                {
                    "execution_id": row["id"],
                    "number": row["attempt"],
                    "status": ExecutionStatus.ABANDONED.value,
                    "phase": row["phase"],
                    "resumed_from": "unknown",
                    "worker": row["worker"],
                    "triggered_by": row["triggered_by"],
                    "started_at": row["heartbeat_at"] or row["started_at"] or now,
                    "finished_at": now,
                    "error_type": "jobrunner.WorkerLost",
                    "error_message": message,
                },
            )
            values.update(
                error_type="jobrunner.WorkerLost", error_message=message, error_traceback=None
            )
        if row["attempt"] < row["max_attempts"]:
            values.update(
                status=ExecutionStatus.RETRYING.value, next_retry_at=now, finished_at=None
            )
        else:
            values.update(status=ExecutionStatus.FAILED.value, finished_at=now, next_retry_at=None)
        updated = (
            conn.execute(
                sa_update(executions).where(E.id == row["id"]).values(values).returning(executions)
            )
            .mappings()
            .first()
        )
        if updated is not None:
            reaped.append(Execution.from_row(updated))
    return reaped


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
