"""The framework's SQL, all of it: plain functions over a SQLAlchemy ``Connection``.

Every status write takes its ``WHERE`` clause from the transition table in
:mod:`jobrunner._lifecycle` (``sources(Event.X)``), so two workers can never both move
one execution, and the table is the one place that says what may happen. Times that
decide anything (due, lease expiry) come from the database's clock (:mod:`._clock`).
The async runner calls these through ``AsyncConnection.run_sync``; nothing here knows
whether it runs sync or async. Statements are Core and built once where they can be
(SQLAlchemy's compiled cache then skips recompiling), and writes use ``RETURNING``
instead of reading back.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    tuple_,
    union_all,
)
from sqlalchemy import update as sa_update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import _prepared
from ._clock import after, db_now, seconds
from ._exceptions import IdempotencyConflict
from ._lifecycle import Event, sources, target, target_of
from ._prepared import Conn
from ._records import Attempt, AuditEntry, Execution, JobStats, QueueState
from ._schema import ExecutionStatus, attempts, audit, executions, metadata, queues

E = executions.c
RUNNING = ExecutionStatus.RUNNING.value
RETRYING = ExecutionStatus.RETRYING.value
CANCELLED = ExecutionStatus.CANCELLED.value

#: The channel a commit of new work notifies on PostgreSQL (payload: the queue).
NOTIFY_CHANNEL = "jobrunner_insert"
#: Advisory lock key of the reaper: one reaper at a time per database ("jrrp").
_REAPER_LOCK = 0x6A727270

#: Columns a claim returns: what a worker needs to run the execution.
_CLAIM_COLUMNS = (
    E.id,
    E.job,
    E.handler,
    E.args,
    E.queue,
    E.attempt,
    E.max_attempts,
    E.lease_token,
    E.checkpointed,
    E.result,
    E.triggered_by,
    E.concurrency_key,
    E.cancel_requested,
    # For instruments: the consumer span's parent, and how long it waited.
    E.due_at,
    E.trace_context,
)


@dataclasses.dataclass(kw_only=True)
class Lease:
    """The right of one attempt to write an execution's status.

    ``token`` is the fencing token of the claim; ``seconds`` how long each renewal keeps
    it (the owner's own lease length). ``how`` is ``insert`` while an inline run's first
    phase (which creates the row already running) has not committed yet, and ``held``
    once the lease is known to be in the database.
    """

    execution_id: uuid.UUID
    worker: str
    token: int
    seconds: float
    how: Literal["insert", "held"] = "held"


# -- schema --------------------------------------------------------------------------


#: Advisory lock key of schema changes ("jobr"), shared with :mod:`jobrunner._migrate`.
SCHEMA_LOCK = 0x6A6F6272


def create_schema(conn: Connection) -> None:
    """Create the jobrunner tables and indexes if they are missing.

    Safe from every replica at once: on PostgreSQL ``CREATE TABLE IF NOT EXISTS`` races
    (two creators both see no table, one fails on the catalog's unique index), so
    creators queue on an advisory lock until this transaction ends; SQLite's write
    transaction (``BEGIN IMMEDIATE``) serialises them already.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
    metadata.create_all(conn)


# -- creating executions (event: submit, run_inline) ------------------------------------


def _dialect_insert(conn: Connection) -> Any:
    return pg_insert if conn.dialect.name == "postgresql" else sqlite_insert


def insert_execution(conn: Conn, values: Mapping[str, Any]) -> None:
    """Insert one execution row (pending for submit, running for an inline run).

    ``due_at`` and ``lease_expires_at`` given as numbers are seconds from the database's
    now. On PostgreSQL a pending row NOTIFYs its queue in the same statement (NOTIFY is
    transactional: workers are woken when, and only if, the insert commits).
    """
    params, relative = _clock_params(values)
    notify = params["status"] == target(Event.SUBMIT)
    stmt = _insert_statement(conn.dialect.name, _columns(params), relative, notify, False)
    _prepared.execute(conn, stmt, params)


def insert_many(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Store submitted executions of one shape: one batched INSERT, one NOTIFY per queue.

    The driver sends the rows together (psycopg's pipeline, asyncpg's ``executemany``,
    SQLAlchemy's multi-row VALUES); workers are woken once per queue at commit.
    """
    if not rows:
        return
    params = [_clock_params(row) for row in rows]
    first, relative = params[0]
    stmt = _insert_statement(conn.dialect.name, _columns(first), relative, False, False)
    conn.execute(stmt, [p for p, _ in params])
    notify(conn, {str(row["queue"]) for row in rows})


def submit_row(
    conn: Connection, values: Mapping[str, Any], *, unique_for: float | None = None
) -> uuid.UUID:
    """Store a submitted execution; with an idempotency key, at most one per (job, key).

    ``INSERT ... ON CONFLICT DO NOTHING`` on (job, key), so concurrent submitters race
    safely: exactly one row is created, everybody gets its id. The key stands for one
    request: the same key with other args raises :class:`IdempotencyConflict`. With
    ``unique_for`` (seconds), a key whose execution was created longer ago than that is
    released (cleared on the old row) and used again for a new execution.
    """
    if values.get("idempotency_key") is None:
        insert_execution(conn, values)
        return uuid.UUID(str(values["id"]))
    while True:
        inserted = _insert_unique(conn, values)
        if inserted is not None:
            return inserted
        existing = conn.execute(
            select(E.id, E.args).where(
                E.job == values["job"], E.idempotency_key == values["idempotency_key"]
            )
        ).first()
        if existing is None:
            continue  # released by someone else meanwhile: insert again
        if unique_for is not None and _release_key(conn, existing.id, unique_for):
            continue  # its window has passed: the key is free for this request
        if existing.args != values["args"]:
            raise IdempotencyConflict(
                f"idempotency key {values['idempotency_key']!r} of job {values['job']!r} "
                f"was used by execution {existing.id} with other args; a key stands for "
                "one request: use a new key for new args (or unique_for= to reuse keys "
                "after a while)",
                existing.id,
            )
        return uuid.UUID(str(existing.id))


def _insert_unique(conn: Connection, values: Mapping[str, Any]) -> uuid.UUID | None:
    """Insert unless the (job, key) is taken; the new id, or None."""
    params, relative = _clock_params(values)
    stmt = _insert_statement(conn.dialect.name, _columns(params), relative, True, True)
    inserted = conn.execute(stmt, params).first()
    return None if inserted is None else uuid.UUID(str(inserted[0]))


def _release_key(conn: Connection, execution_id: uuid.UUID, unique_for: float) -> bool:
    """Clear the key of an execution created more than ``unique_for`` seconds ago."""
    stmt = (
        sa_update(executions)
        .where(
            E.id == execution_id,
            E.idempotency_key.is_not(None),
            E.created_at < seconds(-float(unique_for)),
        )
        .values(idempotency_key=None)
        .returning(E.id)
    )
    return conn.execute(stmt).first() is not None


_RELATIVE = ("due_at", "lease_expires_at", "dispatched_at")


def _clock_params(values: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The row as parameters, with times given in seconds moved to ``<column>_s``."""
    params = dict(values)
    relative = []
    for key in _RELATIVE:
        value = params.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            params[f"{key}_s"] = float(params.pop(key))
            relative.append(key)
    return params, tuple(relative)


_EXECUTION_COLUMNS = frozenset(executions.c.keys())


def _columns(params: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(key for key in params if key in _EXECUTION_COLUMNS)


@functools.cache
def _insert_statement(
    dialect: str, columns: tuple[str, ...], relative: tuple[str, ...], notify: bool, unique: bool
) -> Any:
    """The INSERT for a row of these columns, built once per shape (and compiled once):
    every value a named parameter, times given in seconds from the database's clock."""
    table_insert = pg_insert if dialect == "postgresql" else sqlite_insert
    values: dict[str, Any] = {c: bindparam(c, type_=executions.c[c].type) for c in columns}
    values.update({key: after(f"{key}_s") for key in relative})
    stmt = table_insert(executions).values(values)
    if unique:
        stmt = stmt.on_conflict_do_nothing(index_elements=[E.job, E.idempotency_key])
    if notify and dialect == "postgresql":
        inserted = stmt.returning(E.id, E.queue).cte("inserted")
        return select(inserted.c.id, func.pg_notify(NOTIFY_CHANNEL, inserted.c.queue)).select_from(
            inserted
        )
    return stmt.returning(E.id) if unique else stmt


def _due(values: Mapping[str, Any]) -> dict[str, Any]:
    """Seconds from now (``due_at``, ``lease_expires_at``) as the database's clock."""
    row = dict(values)
    for key in _RELATIVE:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            row[key] = seconds(value)
    return row


# -- claiming (event: claim) ----------------------------------------------------------------

_WAITING = sources(Event.CLAIM)


def status_in(statuses: Sequence[str]) -> Any:
    """``status IN ('a', 'b')`` with the statuses as SQL literals, not parameters.

    They come from the transition table, never from input. As literals they need no
    per-execution expansion, and PostgreSQL can prove a partial index's predicate
    (``WHERE status IN ('pending', 'retrying')``) even with a generic prepared plan.
    """
    if len(statuses) == 1:
        return E.status == literal_column(f"'{statuses[0]}'")
    return E.status.in_([literal_column(f"'{s}'") for s in statuses])


def _claim_set(first_phase: Any) -> dict[str, Any]:
    """What a claim writes: the attempt starts, the lease is the claimer's own length."""
    return {
        "status": target(Event.CLAIM),
        "attempt": E.attempt + 1,
        "lease_token": E.lease_token + 1,
        "worker": bindparam("worker"),
        "started_at": func.coalesce(E.started_at, db_now()),
        "heartbeat_at": db_now(),
        "lease_expires_at": after("lease_s"),
        "finished_at": None,
        "phase": first_phase,
        "error_type": None,
        "error_message": None,
        "error_traceback": None,
    }


# The phase a claimed attempt starts in: record when execute was checkpointed, execute
# for jobs without a load phase (nothing is written between claim and execute), else load.
_FIRST_PHASE = case(
    (E.checkpointed == true(), "record"),
    (E.job.in_(bindparam("no_load", expanding=True)), "execute"),
    else_="load",
)
_CLAIMABLE = and_(status_in(_WAITING), E.cancel_requested == false())

_CLAIM_ONE = (
    sa_update(executions)
    .where(E.id == bindparam("eid"), _CLAIMABLE, E.due_at <= after("early_s"))
    .values(_claim_set(_FIRST_PHASE))
    .returning(*_CLAIM_COLUMNS)
)


def claim_one(
    conn: Connection,
    execution_id: uuid.UUID,
    *,
    worker: str,
    lease_s: float,
    no_load: Sequence[str] = (),
    concurrency: tuple[str, str, int] | None = None,
    early_s: float = 0.0,
) -> dict[str, Any] | None:
    """Claim one waiting, due execution for ``worker``; None if it is not claimable now.

    With ``concurrency=(job, key, limit)`` the claim also fails while ``limit``
    executions with that key run. The key's lock is taken before the row's, as in
    :func:`claim_batch` (which never waits for a key), so the two cannot deadlock.
    ``early_s`` lets the runner that slept a retry's backoff itself claim it that much
    before the database's clock says it is due (clocks tick at different moments).
    """
    if concurrency is not None:
        job, key, limit = concurrency
        _lock_key(conn, key, wait=True)
        if _running_with_key(conn, job, key) >= limit:
            return None
    params = {
        "eid": execution_id,
        "worker": worker,
        "lease_s": float(lease_s),
        "no_load": list(no_load),
        "early_s": float(early_s),
    }
    row = conn.execute(_CLAIM_ONE, params).mappings().first()
    return dict(row) if row else None


def _lock_key(conn: Connection, key: str, *, wait: bool) -> bool:
    """Serialise claims of one concurrency key until this transaction ends.

    PostgreSQL: a transaction-scoped advisory lock on the key's hash (``wait=False``
    tries and says whether it got it). SQLite needs none: a write transaction already
    holds the database's write lock.
    """
    if conn.dialect.name != "postgresql":
        return True
    if wait:
        conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(key))))
        return True
    return bool(conn.execute(select(func.pg_try_advisory_xact_lock(func.hashtext(key)))).scalar())


def _running_with_key(conn: Connection, job: str, key: str) -> int:
    stmt = select(func.count()).where(E.job == job, E.status == RUNNING, E.concurrency_key == key)
    return int(conn.execute(stmt).scalar_one())


def _saturated(conn: Connection, limits: Mapping[str, int]) -> list[str]:
    """Concurrency keys of limited jobs that are at their limit right now (a hint only)."""
    stmt = (
        select(E.job, E.concurrency_key, func.count())
        .where(E.status == RUNNING, E.job.in_(list(limits)), E.concurrency_key.is_not(None))
        .group_by(E.job, E.concurrency_key)
    )
    return [key for job, key, n in conn.execute(stmt) if n >= limits[job]]


_ORDER = (E.priority.desc(), E.due_at, E.id)


def claim_batch(
    conn: Connection,
    *,
    worker: str,
    lease_s: float,
    limit: int,
    jobs: Sequence[str],
    queues: Sequence[str] | None = None,
    no_load: Sequence[str] = (),
    limits: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Claim up to ``limit`` due executions: the caller starts each one at once.

    Callers ask for no more than they have free slots, so nothing is claimed that waits.
    Highest priority first, then oldest due. Only executions of ``jobs`` (names this
    worker can run) in ``queues`` (None: every queue) are taken, and jobs in ``limits``
    (name -> max_concurrency) never get more running executions per concurrency key.
    On PostgreSQL candidates are locked with ``FOR UPDATE SKIP LOCKED``, so workers
    claiming at once each get different executions and nobody waits; SQLite's write
    lock serialises claimers.
    """
    if not jobs or limit < 1:
        return []
    params: dict[str, Any] = {
        "worker": worker,
        "lease_s": float(lease_s),
        "no_load": list(no_load),
        "jobs": list(jobs),
        "n": limit,
    }
    if queues is not None:
        params["queues"] = list(queues)
    limited = {job: n for job, n in (limits or {}).items() if job in jobs}
    if not limited:
        stmt = _claim_picked(conn.dialect.name, queues is not None)
        return [dict(r) for r in conn.execute(stmt, params).mappings()]
    where = _claim_where(queues is not None)
    saturated = _saturated(conn, limited)
    if saturated:  # executions waiting for a slot must not starve the others
        where.append(or_(E.concurrency_key.is_(None), E.concurrency_key.not_in(saturated)))
    candidates = conn.execute(
        select(E.id, E.job, E.concurrency_key)
        .where(*where)
        .order_by(*_ORDER)
        .limit(bindparam("n"))
        .with_for_update(skip_locked=True),
        params,
    ).all()
    ids = _within_limits(conn, candidates, limited)
    if not ids:
        return []
    stmt = (
        sa_update(executions)
        .where(E.id.in_(ids), _CLAIMABLE)
        .values(_claim_set(_FIRST_PHASE))
        .returning(*_CLAIM_COLUMNS)
    )
    return [dict(r) for r in conn.execute(stmt, params).mappings()]


_PAUSED = select(queues.c.name).where(queues.c.paused_at.is_not(None)).scalar_subquery()


def _claim_where(with_queues: bool) -> list[Any]:
    """Due, claimable executions of the worker's jobs (and queues), as parameters."""
    where = [
        _CLAIMABLE,
        E.due_at <= db_now(),
        E.job.in_(bindparam("jobs", expanding=True)),
        E.dispatch.is_(None),  # a broker's executions are sent to it, not claimed here
        E.queue.not_in(_PAUSED),
    ]
    if with_queues:
        where.append(E.queue.in_(bindparam("queues", expanding=True)))
    return where


@functools.cache
def _claim_picked(dialect: str, with_queues: bool) -> Any:
    """One statement: pick the candidates (locked, skipping locked ones) and claim them.

    Built once per shape. PostgreSQL: a MATERIALIZED CTE, evaluated once. (``UPDATE ...
    WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)`` is not safe: the planner may
    re-run the subquery, and each run skips the rows the last one locked, claiming more
    than n.)
    """
    picked_q = select(E.id).where(*_claim_where(with_queues)).order_by(*_ORDER)
    picked_q = picked_q.limit(bindparam("n"))
    if dialect == "postgresql":
        picked = (
            picked_q.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
        )
        stmt = sa_update(executions).where(E.id == picked.c.id)
    else:
        stmt = sa_update(executions).where(E.id.in_(picked_q.scalar_subquery()))
    return stmt.values(_claim_set(_FIRST_PHASE)).returning(*_CLAIM_COLUMNS)


def _within_limits(
    conn: Connection, candidates: Sequence[Any], limits: Mapping[str, int]
) -> list[uuid.UUID]:
    """The candidate ids that fit their job's concurrency limit.

    Keys are only *tried* (never waited for) while candidate rows are locked, so this
    cannot deadlock with :func:`claim_one`, which takes a key before its row.
    """
    free: list[uuid.UUID] = []
    by_key: dict[tuple[str, str], list[uuid.UUID]] = {}
    for execution_id, job, key in candidates:
        if job in limits and key is not None:
            by_key.setdefault((job, key), []).append(execution_id)
        else:
            free.append(execution_id)
    for job, key in sorted(by_key):
        if not _lock_key(conn, key, wait=False):
            continue  # another claimer is deciding this key now
        room = limits[job] - _running_with_key(conn, job, key)
        free.extend(by_key[(job, key)][: max(0, room)])
    return free


# -- writes an attempt makes while it holds the lease ---------------------------------------


def _owned_where(event: Event, how: str) -> Any:
    """WHERE clause matching the row only while the lease (bound as b_*) still owns it."""
    owned = and_(
        E.id == bindparam("b_id"),
        status_in(sources(event)),
        E.lease_token == bindparam("b_token"),
    )
    return owned if how == "held" else and_(owned, E.worker == bindparam("b_worker"))


def _lease_params(lease: Lease, values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **values,
        "b_id": lease.execution_id,
        "b_token": lease.token,
        "b_worker": lease.worker,
        "lease_s": float(lease.seconds),
    }


_HOW = ("held", "insert")


def _renewing(event: Event) -> dict[str, Any]:
    """A fenced write that renews the lease and answers ``cancel_requested``, built once
    per lease mode: its other columns come from the parameters' keys, so one statement
    serves every call and SQLAlchemy compiles it once per key set."""
    renew = {"heartbeat_at": db_now(), "lease_expires_at": after("lease_s")}
    return {
        how: sa_update(executions)
        .where(_owned_where(event, how))
        .values(renew)
        .returning(E.cancel_requested)
        for how in _HOW
    }


_PHASE_STARTED = _renewing(Event.PHASE_STARTED)
_CHECKPOINT = _renewing(Event.CHECKPOINT)


def _renew(conn: Conn, stmts: Any, lease: Lease, values: Mapping[str, Any]) -> bool | None:
    row = _prepared.first(conn, stmts[lease.how], _lease_params(lease, values))
    return None if row is None else bool(row["cancel_requested"])


def phase_started(conn: Conn, lease: Lease, values: Mapping[str, Any]) -> bool | None:
    """Mark a new phase (and renew the lease) in the phase's own transaction.

    Returns ``cancel_requested``, or None when the lease is lost: the caller must then
    roll the phase's transaction back, so a stale owner's writes never commit.
    """
    return _renew(conn, _PHASE_STARTED, lease, values)


def checkpoint(conn: Conn, lease: Lease, values: Mapping[str, Any]) -> bool | None:
    """Store execute's result. Returns ``cancel_requested``, or None if the lease is lost.

    Written even when a cancel is requested: a finished execute is never thrown away.
    """
    return _renew(conn, _CHECKPOINT, lease, values)


def heartbeat(
    conn: Connection, leases: Sequence[tuple[uuid.UUID, int, float]]
) -> dict[uuid.UUID, bool]:
    """Renew many leases in one statement; ``{id: cancel_requested}`` for those still held.

    Each lease is renewed by its own length (its owner's). An id missing from the answer
    has lost its lease (reaped, or claimed by another worker).
    """
    if not leases:
        return {}
    by_length: dict[float, list[tuple[uuid.UUID, int]]] = {}
    for execution_id, token, length in leases:
        by_length.setdefault(float(length), []).append((execution_id, token))
    answer: dict[uuid.UUID, bool] = {}
    for length, pairs in by_length.items():
        stmt = (
            sa_update(executions)
            .where(status_in(sources(Event.HEARTBEAT)), tuple_(E.id, E.lease_token).in_(pairs))
            .values(heartbeat_at=db_now(), lease_expires_at=seconds(length))
            .returning(E.id, E.cancel_requested)
        )
        answer.update({row[0]: bool(row[1]) for row in conn.execute(stmt)})
    return answer


#: How each kind of ending writes the fixed columns; the rest come from the attempt.
Ending = Literal["finish", "done", "retry", "final", "interrupted"]


def _ending_set(kind: Ending) -> dict[str, Any]:
    cancel = E.cancel_requested == true()
    unless_cancelled = case((cancel, CANCELLED), else_=bindparam("v_status"))
    ended = {"lease_expires_at": None, "heartbeat_at": db_now()}
    if kind in ("finish", "done"):
        return {**ended, "status": target_of(Event.FINISH), "finished_at": db_now()}
    if kind == "final":
        return {**ended, "status": unless_cancelled, "finished_at": db_now()}
    waits = {
        **ended,
        "status": unless_cancelled,
        "due_at": case((cancel, E.due_at), else_=after("wait_s")),
        "finished_at": case((cancel, db_now()), else_=None),
    }
    if kind == "interrupted":  # the process stopped, the job did not fail: not counted
        waits["max_attempts"] = case((cancel, E.max_attempts), else_=E.max_attempts + 1)
    return waits


@functools.cache
def _end_statement(kind: Ending, how: str, keys: tuple[str, ...], with_ledger: bool) -> Any:
    """The UPDATE that ends an attempt; on PostgreSQL with the ledger row in one statement.

    ``WITH ended AS (UPDATE ... RETURNING *), ledger AS (INSERT ... SELECT FROM ended)
    SELECT * FROM ended``: the ledger row exists only if the update matched.
    """
    event = Event.FINISH if kind in ("finish", "done") else Event.FAIL
    values = {k: bindparam(f"v_{k}", type_=executions.c[k].type) for k in keys}
    owned = _owned_where(event, how)
    if kind == "done":  # the checkpoint's write finishing too: not past a cancel request
        owned = and_(owned, E.cancel_requested == false())
    update = (
        sa_update(executions)
        .where(owned)
        .values({**_ending_set(kind), **values})
        .returning(*executions.c)
    )
    if not with_ledger:
        return update
    ended = update.cte("ended")
    ledger_keys = [c.name for c in attempts.c if c.name != "id"]
    ledger_values = [bindparam(f"a_{k}", type_=attempts.c[k].type) for k in ledger_keys]
    ledger = (
        insert(attempts).from_select(ledger_keys, select(*ledger_values).select_from(ended))
    ).cte("ledger")
    return select(ended).add_cte(ledger)


def end_attempt(
    conn: Conn,
    lease: Lease,
    kind: Ending,
    values: Mapping[str, Any],
    attempt_row: Mapping[str, Any],
    *,
    status: str | None = None,
    wait_s: float = 0.0,
    insert_if_missing: Mapping[str, Any] | None = None,
) -> Execution | None:
    """End an attempt: update the execution and append its ledger row, atomically.

    ``kind`` is ``finish`` (succeeded), ``done`` (succeeded, written by the checkpoint
    of a job without record, so only while no cancel is requested), ``retry``
    (retrying, due in ``wait_s``), ``final`` (``status``: failed or timed_out) or
    ``interrupted`` (retrying, due now, not counted). Whatever the kind, a failure of
    an execution whose cancel was requested ends ``cancelled``: decided by the
    database, so a cancel that arrives after the runner's own decision still wins.
    Returns the execution, or None when the lease was lost (nothing written).
    ``insert_if_missing`` creates the row instead when an inline run's first insert
    rolled back.
    """
    params = {f"v_{k}": v for k, v in values.items()}
    params.update(v_status=status or RUNNING, wait_s=float(wait_s))
    ledger = {f"a_{c.name}": attempt_row.get(c.name) for c in attempts.c if c.name != "id"}
    pg = conn.dialect.name == "postgresql" and insert_if_missing is None
    stmt = _end_statement(kind, lease.how, tuple(values), pg)
    row = _prepared.first(conn, stmt, _lease_params(lease, {**params, **ledger}))
    if row is None and insert_if_missing is not None:
        assert isinstance(conn, Connection)  # a transaction: see the runners' end()
        row = _insert_ended(conn, lease, insert_if_missing)
    if row is None:
        return None
    if not pg:
        _prepared.execute(conn, _LEDGER, {k[2:]: v for k, v in ledger.items()})
    return Execution.from_row(row)


_LEDGER = insert(attempts)


def _insert_ended(conn: Connection, lease: Lease, values: Mapping[str, Any]) -> Any:
    """An inline run whose first transaction rolled back: create its row as it ended."""
    if conn.execute(select(E.id).where(E.id == lease.execution_id)).first() is not None:
        return None
    conn.execute(insert(executions).values(_due(values)))
    return conn.execute(select(executions).where(E.id == lease.execution_id)).mappings().first()


# -- reads -----------------------------------------------------------------------------------


def get(conn: Connection, execution_id: uuid.UUID) -> Execution | None:
    """One execution by id."""
    row = conn.execute(select(executions).where(E.id == execution_id)).mappings().first()
    return Execution.from_row(row) if row else None


_ALL_STATUSES = tuple(s.value for s in ExecutionStatus)


def list_executions(
    conn: Connection,
    *,
    status: Iterable[str] | None = None,
    job: str | None = None,
    queue: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[Execution]:
    """Executions newest first, filtered by status, job name, queue and creation time.

    A page reads O(``limit``) rows whatever the history holds: each filter is the
    equality prefix of an index ending in ``created_at`` (``(job, status, created_at)``,
    ``(status, created_at)``, ``(queue, status, created_at)``, ``(queue, created_at)``,
    ``(created_at)``), read newest first and stopped at ``limit``. An index needs one
    status to be read in order, so several statuses, or a job without a status, are one
    such read per status (at most ``limit`` rows each) merged by a ``UNION ALL``. Only a
    job together with a queue filters the queue within the job's rows.
    """
    statuses = None if status is None else sorted({str(s) for s in status})
    if statuses == []:
        return []
    if statuses is None and job is not None:
        statuses = list(_ALL_STATUSES)
    params: dict[str, Any] = {"job": job, "queue": queue, "since": since, "limit": limit}
    params.update({f"s{i}": s for i, s in enumerate(statuses or ())})
    stmt = _list_statement(
        len(statuses or ()), job is not None, queue is not None, since is not None
    )
    return [Execution.from_row(r) for r in conn.execute(stmt, params).mappings()]


@functools.lru_cache(maxsize=128)
def _list_statement(statuses: int, job: bool, queue: bool, windowed: bool) -> Any:
    """The list query of one filter shape, built once: one newest-first index read per
    status (parameters ``s0``, ``s1``...), merged, or a single one without statuses."""
    where = [E.job == bindparam("job")] if job else []
    where += [E.queue == bindparam("queue")] if queue else []
    where += [E.created_at >= bindparam("since", type_=E.created_at.type)] if windowed else []
    per_status = [[*where, E.status == bindparam(f"s{i}")] for i in range(statuses)]
    arms = [
        select(executions).where(*w).order_by(E.created_at.desc(), E.id).limit(bindparam("limit"))
        for w in per_status or [where]
    ]
    if len(arms) == 1:
        return arms[0]
    both = union_all(*(select(*arm.subquery().c) for arm in arms)).subquery()
    return select(both).order_by(both.c.created_at.desc(), both.c.id).limit(bindparam("limit"))


def list_attempts(conn: Connection, execution_id: uuid.UUID) -> list[Attempt]:
    """The ledger of one execution, oldest attempt first."""
    stmt = (
        select(attempts)
        .where(attempts.c.execution_id == execution_id)
        .order_by(attempts.c.number, attempts.c.id)
    )
    return [Attempt.from_row(r) for r in conn.execute(stmt).mappings()]


# -- operator actions (events: cancel, cancel_requested, retried_by_hand) --------------------


def cancel(
    conn: Connection, execution_id: uuid.UUID, *, actor: str | None = None
) -> Execution | None:
    """Cancel a waiting execution at once, or flag a running one for its holder to stop.

    One statement, so a claim racing it either happened first (the flag is set on the
    running row) or not at all (the row is cancelled). None if neither applies.
    """
    waiting = status_in(sources(Event.CANCEL))
    stmt = (
        sa_update(executions)
        .where(
            E.id == execution_id,
            status_in(sources(Event.CANCEL) + sources(Event.CANCEL_REQUESTED)),
        )
        .values(
            status=case((waiting, target(Event.CANCEL)), else_=E.status),
            finished_at=case((waiting, db_now()), else_=E.finished_at),
            cancel_requested=true(),
        )
        .returning(executions)
    )
    row = conn.execute(stmt).mappings().first()
    if row is None:
        return None
    execution = Execution.from_row(row)
    if actor is not None:
        detail = {"status": execution.status.value}
        record_action(conn, actor=actor, action="cancel", execution_id=execution_id, detail=detail)
    return execution


def requeue(
    conn: Connection,
    execution_id: uuid.UUID,
    *,
    max_attempts: int,
    triggered_by: str,
    actor: str | None = None,
) -> Execution | None:
    """Put an execution that ended badly back to pending for an explicit retry."""
    stmt = (
        sa_update(executions)
        .where(E.id == execution_id, status_in(sources(Event.RETRIED_BY_HAND)))
        .values(
            status=target(Event.RETRIED_BY_HAND),
            max_attempts=max_attempts,
            triggered_by=triggered_by,
            cancel_requested=false(),
            due_at=db_now(),
            finished_at=None,
            lease_expires_at=None,
            dispatched_at=None,  # a broker's execution: the relay sends it again soon
        )
        .returning(executions)
    )
    row = conn.execute(stmt).mappings().first()
    if row is None:
        return None
    notify(conn, [row["queue"]])
    if actor is not None:
        record_action(conn, actor=actor, action="retry", execution_id=execution_id)
    return Execution.from_row(row)


def notify(conn: Connection, names: Iterable[str]) -> None:
    """Wake the workers of queues ``names`` when this transaction commits (PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        for queue in sorted(set(names)):
            conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, queue)))


def delete_executions(conn: Connection, ids: Sequence[uuid.UUID]) -> int:
    """Delete executions (their attempts go with them)."""
    conn.execute(delete(attempts).where(attempts.c.execution_id.in_(ids)))
    return conn.execute(delete(executions).where(E.id.in_(ids))).rowcount


# -- queues and the audit of operator actions -----------------------------------------------


def set_paused(conn: Connection, queue: str, *, paused: bool, actor: str) -> bool:
    """Pause or resume ``queue``; False if it already was. Resuming wakes its workers.

    Upsert then compare, in one transaction: concurrent pauses of one queue serialise on
    its row, and exactly one of them reports the change.
    """
    before = conn.execute(
        select(queues.c.paused_at).where(queues.c.name == queue).with_for_update()
    ).first()
    was_paused = before is not None and before.paused_at is not None
    if was_paused == paused:
        return False
    values = {"paused_at": db_now() if paused else None, "paused_by": actor if paused else None}
    if before is None:
        conn.execute(insert(queues).values(name=queue, **values))
    else:
        conn.execute(sa_update(queues).where(queues.c.name == queue).values(values))
    record_action(conn, actor=actor, action="pause" if paused else "resume", queue=queue)
    if not paused:
        notify(conn, [queue])
    return True


def queue_states(conn: Connection) -> list[QueueState]:
    """Every queue that was ever paused or resumed, by name."""
    rows = conn.execute(select(queues).order_by(queues.c.name)).mappings()
    return [QueueState(**dict(r)) for r in rows]


def record_action(
    conn: Connection,
    *,
    actor: str,
    action: str,
    execution_id: uuid.UUID | None = None,
    queue: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Write one audit row, in the caller's transaction (it commits with the action)."""
    conn.execute(
        insert(audit).values(
            at=db_now(),
            actor=actor,
            action=action,
            execution_id=execution_id,
            queue=queue,
            detail=dict(detail) if detail else None,
        )
    )


def list_audit(
    conn: Connection, *, execution_id: uuid.UUID | None = None, limit: int = 100
) -> list[AuditEntry]:
    """Operator actions newest first, all or on one execution."""
    stmt = select(audit).order_by(audit.c.at.desc(), audit.c.id.desc()).limit(limit)
    if execution_id is not None:
        stmt = stmt.where(audit.c.execution_id == execution_id)
    return [AuditEntry.from_row(r) for r in conn.execute(stmt).mappings()]


# -- the reaper (events: lease_expired, reaped, stopped_cancelled) ---------------------------


def reap(conn: Connection, *, limit: int) -> list[Execution]:
    """Recover running executions whose lease expired, and say so in their ledger.

    Compares ``lease_expires_at`` with the database's clock only: each lease has its
    owner's length, renewed by its owner's heartbeats. Each expired attempt gets an
    ``abandoned`` ledger row and its token moves on, so the old worker, if it is only
    paused, can no longer write. The execution then goes to ``cancelled`` if a cancel
    was requested, else ``retrying`` (due now; a checkpointed one resumes at record)
    while attempts remain, else ``failed``. One reaper at a time per database (a
    transaction-scoped advisory lock on PostgreSQL; SQLite's write lock); candidates
    are locked with SKIP LOCKED.
    """
    if (
        conn.dialect.name == "postgresql"
        and not conn.execute(select(func.pg_try_advisory_xact_lock(_REAPER_LOCK))).scalar()
    ):
        return []  # another reaper is at it now
    expired = (
        conn.execute(
            select(executions, db_now().label("db_now"))
            .where(status_in(sources(Event.LEASE_EXPIRED)), E.lease_expires_at < db_now())
            .order_by(E.lease_expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .mappings()
        .all()
    )
    return [r for r in (_reap_one(conn, row) for row in expired) if r is not None]


def _reap_one(conn: Connection, row: Any) -> Execution | None:
    now, phase = row["db_now"], row["phase"] or "load"
    message = (
        f"worker {row['worker']} lost its lease in {phase} (lease expired "
        f"{row['lease_expires_at']:%Y-%m-%d %H:%M:%S} UTC, last heartbeat "
        f"{_when(row['heartbeat_at'])}); attempt {row['attempt']} was abandoned"
    )
    conn.execute(
        insert(attempts),
        {
            "execution_id": row["id"],
            "number": row["attempt"],
            "status": ExecutionStatus.ABANDONED.value,
            "phase": phase,
            "resumed_from": "unknown",  # the row no longer says where this attempt began
            "worker": row["worker"],
            "triggered_by": row["triggered_by"],
            "started_at": row["heartbeat_at"] or row["started_at"] or now,
            "finished_at": now,
            "error_type": "jobrunner.WorkerLost",
            "error_message": message,
        },
    )
    cancel = E.cancel_requested == true()
    last = E.attempt >= E.max_attempts
    stmt = (
        sa_update(executions)
        .where(E.id == row["id"], E.status == RUNNING, E.lease_token == row["lease_token"])
        .values(
            status=case(
                (cancel, target_of(Event.STOPPED_CANCELLED)),
                (last, target(Event.REAPED)),
                else_=target(Event.LEASE_EXPIRED),
            ),
            lease_token=E.lease_token + 1,
            lease_expires_at=None,
            due_at=case((or_(cancel, last), E.due_at), else_=db_now()),
            finished_at=case((or_(cancel, last), db_now()), else_=None),
            dispatched_at=None,  # a broker's execution: the relay sends it again soon
            error_type="jobrunner.WorkerLost",
            error_message=message,
            error_traceback=None,
        )
        .returning(executions)
    )
    updated = conn.execute(stmt).mappings().first()
    if updated is None:
        return None
    if updated["status"] == RETRYING:
        notify(conn, [updated["queue"]])
    return Execution.from_row(updated)


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if value is not None else "never"


# -- housekeeping and statistics (prune, stats, id prefixes) --------------------------------


def prune_batch(conn: Connection, *, before: datetime, statuses: Sequence[str], limit: int) -> int:
    """Delete up to ``limit`` executions in ``statuses`` that finished before ``before``.

    Returns how many were deleted; callers loop, one short transaction per batch. Rows
    are found through the ``created_at`` index (an execution finishes after it is
    created) and, on PostgreSQL, locked with ``SKIP LOCKED`` so a concurrent ``retry()``
    of the same execution either wins or waits, never half-applies.
    """
    ids = (
        conn.execute(
            select(E.id)
            .where(*_prunable(before, statuses))
            .order_by(E.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    return delete_executions(conn, ids) if ids else 0


def _prunable(before: datetime, statuses: Sequence[str]) -> list[Any]:
    finished = func.coalesce(E.finished_at, E.created_at)
    return [E.created_at < before, finished < before, E.status.in_(list(statuses))]


def count_prunable(conn: Connection, *, before: datetime, statuses: Sequence[str]) -> int:
    """How many executions :func:`prune_batch` would delete, in all."""
    stmt = select(func.count()).where(*_prunable(before, statuses))
    return int(conn.execute(stmt).scalar_one())


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


#: stats computes p50/p95 over at most this many of the newest executions per job and
#: status in its window (``JobStats.sampled`` says when a group had more). A p95 of 1,000
#: durations is their 950th: within about one percentile point of the whole window's.
STATS_SAMPLE = 1_000
#: stats counts at most this many executions per job and status (``JobStats.capped``),
#: like the dashboard's counts.
STATS_COUNT_CAP = 10_000


def job_stats(
    conn: Connection,
    *,
    since: datetime | None = None,
    sample: int | None = None,
    cap: int | None = None,
) -> list[JobStats]:
    """Counts per job and status, with p50/p95 durations, for executions created since.

    Bounded whatever the history holds, on the ``(job, status, created_at)`` index:
    the jobs are found by a skip scan (one index probe per job); each job and status
    is counted by an index-only read of its rows in the window that stops at ``cap``
    (then ``capped``: at least that many); percentiles are over the durations of the
    newest ``sample`` executions of each job and status in the window (``sampled``
    when there were more; ``sample_size`` how many durations they hold). So at most
    jobs x statuses x (``cap`` index entries + ``sample`` rows) are read. ``sample``
    and ``cap`` default to :data:`STATS_SAMPLE` and :data:`STATS_COUNT_CAP`.
    """
    sample = STATS_SAMPLE if sample is None else sample
    cap = STATS_COUNT_CAP if cap is None else cap
    if conn.dialect.name == "postgresql":
        # The sample's UNION ALL is estimated costly enough for JIT, whose compiling
        # alone takes longer than the query (200 ms for a few dozen jobs).
        conn.execute(text("SET LOCAL jit = off"))
    params = {"since": since, "cap": cap + 1}
    counts = [
        (job, status, int(n))
        for job, *per_status in conn.execute(_COUNTS[since is not None], params)
        for status, n in zip(_ALL_STATUSES, per_status, strict=True)
        if n
    ]
    ranks = _sampled_ranks(conn, [(job, status) for job, status, _ in counts], since, sample)
    return sorted(
        (
            _stats_row(job, status, min(n, cap), n > cap, n > sample, ranks.get(i))
            for i, (job, status, n) in enumerate(counts)
        ),
        key=lambda s: (s.job, s.status.value),
    )


def _capped_counts(windowed: bool) -> Any:
    """Per job (a recursive skip scan), its executions per status, each up to ``cap``."""
    jobs = select(func.min(E.job).label("job")).cte("jobs", recursive=True)
    following = select(func.min(E.job)).where(E.job > jobs.c.job).scalar_subquery()
    jobs = jobs.union_all(select(following).where(jobs.c.job.is_not(None)))
    window = [E.created_at >= bindparam("since", type_=E.created_at.type)] if windowed else []

    def count(status: str) -> Any:
        rows = (
            select(literal_column("1"))
            .select_from(executions)
            .where(E.job == jobs.c.job, status_in([status]), *window)
            .limit(bindparam("cap"))
            .correlate(jobs)
            .subquery()
        )
        return select(func.count()).select_from(rows).scalar_subquery()

    return select(jobs.c.job, *(count(s) for s in _ALL_STATUSES)).where(jobs.c.job.is_not(None))


_COUNTS = {windowed: _capped_counts(windowed) for windowed in (False, True)}


def _sampled_ranks(
    conn: Connection, groups: Sequence[tuple[str, str]], since: datetime | None, sample: int
) -> dict[int, tuple[int, dict[int, float]]]:
    """Per group index: how many durations its sample holds, and those at the wanted ranks."""
    if not groups:
        return {}
    params: dict[str, Any] = {"since": since, "sample": sample}
    for i, (job, status) in enumerate(groups):
        params.update({f"j{i}": job, f"s{i}": status})
    stmt = _ranks_statement(conn.dialect.name, len(groups), since is not None)
    ranks: dict[int, tuple[int, dict[int, float]]] = {}
    for g, rn, n, value in conn.execute(stmt, params):
        ranks.setdefault(int(g), (int(n), {}))[1][int(rn)] = float(value)
    return ranks


@functools.lru_cache(maxsize=64)
def _ranks_statement(dialect: str, groups: int, windowed: bool) -> Any:
    """Durations of the newest ``sample`` executions of each group (parameters ``j0``,
    ``s0``...), ranked per group; only the rows around each percentile come back."""
    ms = _duration_ms(dialect)
    window = [E.created_at >= bindparam("since", type_=E.created_at.type)] if windowed else []
    arms = []
    for i in range(groups):
        newest = (
            select(ms.label("ms"))
            .where(E.job == bindparam(f"j{i}"), E.status == bindparam(f"s{i}"), *window)
            .order_by(E.created_at.desc())
            .limit(bindparam("sample"))
            .subquery()
        )
        arms.append(select(literal(i).label("g"), newest.c.ms).where(newest.c.ms.is_not(None)))
    both = union_all(*arms).subquery()
    ranked = select(
        both.c.g,
        both.c.ms,
        func.row_number().over(partition_by=both.c.g, order_by=both.c.ms).label("rn"),
        func.count().over(partition_by=both.c.g).label("n"),
    ).subquery()
    wanted = [rank for pct in _PERCENTILES for rank in _rank_bounds(ranked.c.n, pct)]
    return select(ranked.c.g, ranked.c.rn, ranked.c.n, ranked.c.ms).where(ranked.c.rn.in_(wanted))


def _stats_row(
    job: str,
    status: str,
    count: int,
    capped: bool,
    sampled: bool,
    ranked: tuple[int, dict[int, float]] | None,
) -> JobStats:
    p50 = p95 = None
    size = 0
    if ranked is not None:
        size, values = ranked
        p50, p95 = (_percentile(values, size, pct) for pct in _PERCENTILES)
    return JobStats(
        job=job,
        status=ExecutionStatus(status),
        count=count,
        capped=capped,
        p50_ms=p50,
        p95_ms=p95,
        sample_size=size,
        sampled=sampled,
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


# -- queue integrations (Celery): the outbox ---------------------------------------------------

#: Advisory lock key of the relay: one relay at a time per database ("jrrl").
_RELAY_LOCK = 0x6A72726C


def mark_dispatched(conn: Connection, execution_id: uuid.UUID, *, sent: bool) -> bool:
    """Record that a waiting execution's message was sent now (or was not, after all).

    False when the execution is no longer waiting (it ran, or was cancelled, meanwhile).
    """
    stmt = (
        sa_update(executions)
        .where(E.id == execution_id, _CLAIMABLE)
        .values(dispatched_at=db_now() if sent else None)
        .returning(E.id)
    )
    return conn.execute(stmt).first() is not None


def relay_due(
    conn: Connection,
    *,
    dispatch: str,
    visibility_s: float,
    grace_s: float,
    lookahead_s: float,
    limit: int,
) -> list[dict[str, Any]]:
    """Waiting executions of ``dispatch`` whose message must be sent (again), marked sent.

    Those never sent (created more than ``grace_s`` ago: the process that wrote them died
    before sending, or the broker was down), and those sent more than ``visibility_s``
    ago that have not started (the message was lost, or acked away). Only what is due
    within ``lookahead_s`` (the rest is sent closer to its time). The caller sends each
    after this transaction commits. One relay at a time per database on PostgreSQL;
    candidates are locked with SKIP LOCKED.
    """
    if (
        conn.dialect.name == "postgresql"
        and not conn.execute(select(func.pg_try_advisory_xact_lock(_RELAY_LOCK))).scalar()
    ):
        return []
    # A message sent for a later due time is waited for until then, plus the window.
    waited_since = case((E.dispatched_at > E.due_at, E.dispatched_at), else_=E.due_at)
    lost = or_(
        and_(
            E.dispatched_at.is_(None),
            E.created_at < seconds(-grace_s),
            E.due_at <= seconds(lookahead_s),
        ),
        and_(E.dispatched_at.is_not(None), waited_since < seconds(-visibility_s)),
    )
    rows = (
        conn.execute(
            select(E.id, E.job, E.handler, E.due_at, db_now().label("db_now"))
            .where(E.dispatch == dispatch, _CLAIMABLE, lost)
            .order_by(E.due_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .mappings()
        .all()
    )
    if rows:
        conn.execute(
            sa_update(executions)
            .where(E.id.in_([r["id"] for r in rows]))
            .values(dispatched_at=db_now())
        )
    return [dict(r) for r in rows]


def set_external_id(conn: Connection, execution_id: uuid.UUID, external_id: str) -> bool:
    """Point a waiting execution at the queue message that will run it next (sent now)."""
    stmt = (
        sa_update(executions)
        .where(E.id == execution_id, _CLAIMABLE)
        .values(external_id=external_id, dispatched_at=db_now())
        .returning(E.id)
    )
    return conn.execute(stmt).first() is not None


# -- gauges (metrics) ----------------------------------------------------------------------

#: The statuses counted by :func:`live_counts`: history (finished rows) is never scanned.
LIVE_STATUSES = (ExecutionStatus.PENDING.value, RETRYING, RUNNING)


def live_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(queue, status, count) of the executions not finished yet.

    Only pending, retrying and running rows are counted: the partial indexes of the
    claim and the reaper (and the status index) hold exactly those, so the cost grows
    with the backlog, never with the history.
    """
    stmt = (
        select(E.queue, E.status, func.count())
        .where(status_in(LIVE_STATUSES))
        .group_by(E.queue, E.status)
    )
    return [(row[0], row[1], int(row[2])) for row in conn.execute(stmt)]


def oldest_due(conn: Connection) -> list[tuple[str, float]]:
    """(queue, seconds) since the oldest waiting execution of each queue came due, by the
    database's clock (queues with nothing due are left out). Scans the claim's index."""
    stmt = (
        select(E.queue, func.min(E.due_at), db_now())
        .where(_CLAIMABLE, E.due_at <= db_now())
        .group_by(E.queue)
    )
    return [
        (row[0], max(0.0, (row[2] - row[1]).total_seconds()))
        for row in conn.execute(stmt)
        if row[1] is not None
    ]
