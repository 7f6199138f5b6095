"""The dashboard's read SQL: plain functions over a SQLAlchemy ``Connection``.

Every query is bounded whatever the table holds: counts stop at a cap (shown as
"10,000+"), the whole table's size is PostgreSQL's estimate, windows read at most a
fixed number of the newest rows, and pages use keyset conditions on
``(created_at, id)``, never an offset. Distinct queues and jobs are read with a
skip scan over their index (one index probe per value). Values are always bound
parameters.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Select,
    and_,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy import Integer as SAInteger

from .. import _queries as core
from .._queries import status_in
from .._schema import ExecutionStatus, executions
from ._filters import STATUSES, Cursor, Filters

E = executions.c
WAITING = (ExecutionStatus.PENDING.value, ExecutionStatus.RETRYING.value)
RUNNING = ExecutionStatus.RUNNING.value
FAILED_STATUSES = (ExecutionStatus.FAILED.value, ExecutionStatus.TIMED_OUT.value)

#: Counts stop here; the page says "10,000+".
COUNT_CAP = 10_000
#: An error-text search reads at most this many of the newest matching rows per request.
SEARCH_WINDOW = 5_000
#: Charts and percentiles read at most this many of the latest finishes in their window.
WINDOW_ROWS = 50_000
#: Percentiles on SQLite are computed here from fetched rows: fewer of them.
SQLITE_PERCENTILE_ROWS = 10_000
#: Queues and jobs listed at most.
MAX_NAMES = 200

#: What the executions page shows of a row (no args, result or traceback).
LIST_COLUMNS = (
    E.id,
    E.job,
    E.status,
    E.queue,
    E.attempt,
    E.max_attempts,
    E.worker,
    E.triggered_by,
    E.created_at,
    E.started_at,
    E.finished_at,
    E.error_type,
    func.substr(E.error_message, 1, 300).label("error_message"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Page:
    """One page of executions and where the next one starts."""

    rows: list[dict[str, Any]]
    next_cursor: Cursor | None
    #: With an error-text search: how many rows were read, and where to read on from.
    searched: int | None = None
    search_more: Cursor | None = None


# -- counting --------------------------------------------------------------------------


def bounded_count(conn: Connection, *where: Any, cap: int = COUNT_CAP) -> int:
    """``count(*)`` of matching rows, stopping at ``cap + 1`` (more than cap: capped)."""
    inner = select(literal(1)).select_from(executions).where(*where).limit(cap + 1).subquery()
    return int(conn.execute(select(func.count()).select_from(inner)).scalar_one())


def status_counts(conn: Connection, statuses: Sequence[str]) -> dict[str, int]:
    """Executions per status, each counted up to ``COUNT_CAP + 1``, in one statement."""
    columns = [
        select(func.count())
        .select_from(select(literal(1)).where(E.status == s).limit(COUNT_CAP + 1).subquery())
        .scalar_subquery()
        .label(f"c{i}")
        for i, s in enumerate(statuses)
    ]
    row = conn.execute(select(*columns)).one()
    return {s: int(row[i]) for i, s in enumerate(statuses)}


def estimated_total(conn: Connection) -> int | None:
    """The table's size by PostgreSQL's statistics (no scan); None elsewhere or unknown."""
    if conn.dialect.name != "postgresql":
        return None
    value = conn.execute(
        text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"),
        {"t": executions.name},
    ).scalar()
    return None if value is None or value < 0 else int(value)


# -- names -----------------------------------------------------------------------------


def distinct_values(conn: Connection, column: str) -> list[str]:
    """Distinct ``queue`` or ``job`` values by a skip scan over their index."""
    if column not in ("queue", "job"):
        raise ValueError(column)
    sql = (
        # The column is one of two names checked above; values are bound.
        f"WITH RECURSIVE t(v) AS ("
        f" SELECT min({column}) FROM {executions.name}"
        f" UNION ALL"
        f" SELECT (SELECT min({column}) FROM {executions.name} WHERE {column} > t.v)"
        f" FROM t WHERE t.v IS NOT NULL)"
        f" SELECT v FROM t WHERE v IS NOT NULL LIMIT :cap"
    )
    return [str(v) for v in conn.execute(text(sql), {"cap": MAX_NAMES}).scalars()]


# -- the executions page ---------------------------------------------------------------


def _common(f: Filters) -> list[Any]:
    where: list[Any] = []
    if f.job is not None:
        where.append(E.job == f.job)
    if f.queue is not None:
        where.append(E.queue == f.queue)
    if f.since is not None:
        where.append(E.created_at >= f.since)
    if f.until is not None:
        where.append(E.created_at < f.until)
    if f.cursor is not None:
        where.append(_after(f.cursor, f.newest_first))
    return where


def _after(cursor: Cursor, newest_first: bool) -> Any:
    """Rows after the cursor in the page's order (a range the index serves)."""
    at, ident = cursor.created_at, cursor.id
    if newest_first:
        return and_(E.created_at <= at, or_(E.created_at < at, E.id < ident))
    return and_(E.created_at >= at, or_(E.created_at > at, E.id > ident))


def _order(columns: Any, newest_first: bool) -> list[Any]:
    if newest_first:
        return [columns.created_at.desc(), columns.id.desc()]
    return [columns.created_at.asc(), columns.id.asc()]


def _keys(f: Filters, limit: int, *extra: Any) -> Select[Any]:
    """The sort keys (and ``extra`` columns) of the first ``limit`` matching rows.

    With statuses (or a job, whose index leads with job and status), one branch per
    status, each read in index order and cut at ``limit``, merged: bounded however
    many rows each status holds.
    """
    statuses: Sequence[str] = f.status
    if not statuses and f.job is not None:
        statuses = [s.value for s in ExecutionStatus if s is not ExecutionStatus.ABANDONED]
    where = _common(f)
    if not statuses:
        return (
            select(E.created_at, E.id, *extra)
            .where(*where)
            .order_by(*_order(E, f.newest_first))
            .limit(limit)
        )
    branches = [
        select(E.created_at, E.id, *extra)
        .where(E.status == s, *where)
        .order_by(*_order(E, f.newest_first))
        .limit(limit)
        .subquery()
        for s in statuses
    ]
    if len(branches) == 1:
        return select(branches[0])
    merged = union_all(*(select(b) for b in branches)).subquery()
    return select(merged).order_by(*_order(merged.c, f.newest_first)).limit(limit)


def list_page(conn: Connection, f: Filters) -> Page:
    """One page of executions matching ``f``, after ``f.cursor``."""
    if f.error is not None:
        return _search_page(conn, f)
    keys = _keys(f, f.limit + 1).subquery()
    stmt = (
        select(*LIST_COLUMNS)
        .join_from(executions, keys, keys.c.id == E.id)
        .order_by(*_order(keys.c, f.newest_first))
    )
    rows = [dict(r) for r in conn.execute(stmt).mappings()]
    return _paged(rows, f.limit)


def _paged(rows: list[dict[str, Any]], limit: int) -> Page:
    if len(rows) <= limit:
        return Page(rows=rows, next_cursor=None)
    rows = rows[:limit]
    last = rows[-1]
    return Page(rows=rows, next_cursor=Cursor(created_at=last["created_at"], id=last["id"]))


def _matches(text: str) -> Any:
    """The error type or message contains ``text`` (``%`` and ``_`` match themselves)."""
    return or_(
        E.error_message.icontains(text, autoescape=True),
        E.error_type.icontains(text, autoescape=True),
    )


def _search_page(conn: Connection, f: Filters) -> Page:
    """Error-text search within the newest ``SEARCH_WINDOW`` rows the other filters match.

    One pass over the window: each row says whether it matches, its rank among the
    matches and whether it is the window's last; only the first page of matches and the
    last row come back. Then the page's columns for those few ids.
    """
    assert f.error is not None
    window = _keys(f, SEARCH_WINDOW, _matches(f.error).label("hit")).subquery()
    order = _order(window.c, f.newest_first)
    hit = case((window.c.hit, 1), else_=0)
    ranked = select(
        window.c.created_at,
        window.c.id,
        window.c.hit,
        func.row_number().over(order_by=order).label("rn"),
        func.count().over().label("n"),
        func.sum(hit).over(order_by=order).label("hits"),
    ).subquery()
    keep = or_(and_(ranked.c.hit, ranked.c.hits <= f.limit + 1), ranked.c.rn == ranked.c.n)
    rows = conn.execute(select(ranked).where(keep).order_by(ranked.c.rn)).all()
    hits = [r.id for r in rows if r.hit]
    page = _paged(_rows_by_id(conn, hits, f.newest_first), f.limit)
    if page.next_cursor is not None or not rows:
        return dataclasses.replace(page, searched=0) if not rows else page
    # Fewer matches than a page: say how far the search read, and where to go on.
    last, searched = rows[-1], int(rows[-1].n)
    if searched < SEARCH_WINDOW:
        return dataclasses.replace(page, searched=searched)
    more = Cursor(created_at=last.created_at, id=last.id)
    return dataclasses.replace(page, searched=searched, search_more=more)


def _rows_by_id(conn: Connection, ids: Sequence[Any], newest_first: bool) -> list[dict[str, Any]]:
    if not ids:
        return []
    stmt = select(*LIST_COLUMNS).where(E.id.in_(ids)).order_by(*_order(E, newest_first))
    return [dict(r) for r in conn.execute(stmt).mappings()]


def retryable_ids(
    conn: Connection, f: Filters, statuses: Sequence[str], limit: int
) -> list[uuid.UUID]:
    """Ids of up to ``limit`` executions matching ``f`` in ``statuses`` (bulk retry)."""
    wanted = [s for s in (f.status or statuses) if s in statuses]
    if not wanted:
        return []
    scoped = dataclasses.replace(f, status=tuple(wanted), cursor=None)
    if scoped.error is not None:
        window = _keys(scoped, SEARCH_WINDOW, _matches(scoped.error).label("hit")).subquery()
        stmt = select(window.c.id).where(window.c.hit).limit(limit)
    else:
        keys = _keys(scoped, limit).subquery()
        stmt = select(keys.c.id)
    return [uuid.UUID(str(i)) for i in conn.execute(stmt).scalars()]


# -- the overview ----------------------------------------------------------------------


def _epoch_minute(conn: Connection, column: Any) -> Any:
    if conn.dialect.name == "postgresql":
        return cast(func.floor(func.date_part("epoch", column) / 60), SAInteger)
    return cast(func.strftime("%s", column), SAInteger) / 60


def per_minute(conn: Connection, since: datetime) -> list[tuple[int, str, int]]:
    """(epoch minute, status, count) of executions finished since ``since``.

    Reads at most ``WINDOW_ROWS`` of the latest finishes (the chart says so when hit).
    """
    latest = (
        select(E.finished_at, E.status)
        .where(E.finished_at >= since)
        .order_by(E.finished_at.desc())
        .limit(WINDOW_ROWS)
        .subquery()
    )
    minute = _epoch_minute(conn, latest.c.finished_at).label("minute")
    stmt = select(minute, latest.c.status, func.count()).group_by(minute, latest.c.status)
    return [(int(m), str(s), int(n)) for m, s, n in conn.execute(stmt)]


def recent_failures(conn: Connection, since: datetime) -> list[tuple[str, str | None, int]]:
    """(job, error type, count) of failures finished since ``since``, most first."""
    latest = (
        select(E.job, E.error_type, E.status)
        .where(E.finished_at >= since)
        .order_by(E.finished_at.desc())
        .limit(WINDOW_ROWS)
        .subquery()
    )
    n = func.count().label("n")
    stmt = (
        select(latest.c.job, latest.c.error_type, n)
        .where(latest.c.status.in_(FAILED_STATUSES))
        .group_by(latest.c.job, latest.c.error_type)
        .order_by(n.desc(), latest.c.job)
        .limit(50)
    )
    return [(str(j), t, int(c)) for j, t, c in conn.execute(stmt)]


def live_workers(conn: Connection) -> list[dict[str, Any]]:
    """Workers holding leases now: how many executions, last heartbeat, next expiry."""
    stmt = (
        select(
            E.worker,
            func.count().label("running"),
            func.max(E.heartbeat_at).label("heartbeat_at"),
            func.min(E.lease_expires_at).label("lease_expires_at"),
        )
        .where(status_in([RUNNING]))
        .group_by(E.worker)
        .order_by(E.worker)
        .limit(MAX_NAMES)
    )
    return [dict(r) for r in conn.execute(stmt).mappings()]


# -- queues ----------------------------------------------------------------------------


def queue_row(conn: Connection, queue: str, now: datetime) -> dict[str, Any]:
    """Depth (waiting), due now, running and the oldest due time of one queue."""
    waiting = [status_in(list(WAITING)), E.queue == queue]

    def capped(*where: Any) -> Any:
        inner = select(literal(1)).where(*where).limit(COUNT_CAP + 1).subquery()
        return select(func.count()).select_from(inner).scalar_subquery()

    stmt = select(
        capped(*waiting).label("waiting"),
        capped(*waiting, E.due_at <= now).label("due"),
        capped(status_in([RUNNING]), E.queue == queue).label("running"),
        select(func.min(E.due_at)).where(*waiting).scalar_subquery().label("oldest_due_at"),
    )
    row = dict(conn.execute(stmt).mappings().one())
    oldest = row["oldest_due_at"]
    if isinstance(oldest, str):  # SQLite: a scalar subquery loses the column's type
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=now.tzinfo)
    row["oldest_due_at"] = oldest if oldest is not None and oldest <= now else None
    return row


# -- jobs ------------------------------------------------------------------------------

PHASES = ("load", "execute", "record")


def percentile_rows(dialect: str) -> int:
    """How many of the latest finishes the jobs page's percentiles read at most."""
    return WINDOW_ROWS if dialect == "postgresql" else SQLITE_PERCENTILE_ROWS


def phase_percentiles(conn: Connection, since: datetime) -> dict[str, dict[str, Any]]:
    """Per job: finishes counted and p50/p95 of each phase's milliseconds since ``since``.

    Over at most :func:`percentile_rows` of the latest finishes. PostgreSQL computes the
    percentiles (``percentile_cont``); on SQLite they are sorted here.
    """
    latest = (
        select(E.job, E.load_ms, E.execute_ms, E.record_ms)
        .where(E.finished_at >= since)
        .order_by(E.finished_at.desc())
        .limit(percentile_rows(conn.dialect.name))
        .subquery()
    )
    if conn.dialect.name != "postgresql":
        return _percentiles_here(conn.execute(select(latest)).all())
    columns: list[Any] = [latest.c.job, func.count()]
    for phase in PHASES:
        col = latest.c[f"{phase}_ms"]
        columns += [
            func.percentile_cont(0.5).within_group(col),
            func.percentile_cont(0.95).within_group(col),
        ]
    out: dict[str, dict[str, Any]] = {}
    for row in conn.execute(select(*columns).group_by(latest.c.job)):
        stats: dict[str, Any] = {"count": int(row[1])}
        for i, phase in enumerate(PHASES):
            stats[phase] = (row[2 + 2 * i], row[3 + 2 * i])
        out[str(row[0])] = stats
    return out


def _percentiles_here(rows: Iterable[Sequence[Any]]) -> dict[str, dict[str, Any]]:
    by_job: dict[str, list[Sequence[Any]]] = {}
    for row in rows:
        by_job.setdefault(str(row[0]), []).append(row)
    out: dict[str, dict[str, Any]] = {}
    for job, job_rows in by_job.items():
        stats: dict[str, Any] = {"count": len(job_rows)}
        for i, phase in enumerate(PHASES):
            values = sorted(float(r[1 + i]) for r in job_rows if r[1 + i] is not None)
            stats[phase] = (_cont(values, 0.5), _cont(values, 0.95))
        out[job] = stats
    return out


def _cont(values: Sequence[float], fraction: float) -> float | None:
    """``percentile_cont``: interpolate between the two neighbouring ranks."""
    if not values:
        return None
    position = (len(values) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (position - low) * (values[high] - values[low])


# -- one execution ---------------------------------------------------------------------


def raw_field(conn: Connection, execution_id: uuid.UUID, field: str) -> Any:
    """One large column of one execution (args, result or traceback), whole."""
    column = {"args": E.args, "result": E.result, "traceback": E.error_traceback}[field]
    return conn.execute(select(column).where(E.id == execution_id)).scalar()


def change_mark(conn: Connection) -> tuple[Any, ...]:
    """Something that changes whenever an execution is created, starts or finishes.

    Three index probes: the newest creation, the newest finish, and how many run.
    """
    stmt = select(
        select(func.max(E.created_at)).scalar_subquery(),
        select(func.max(E.finished_at)).scalar_subquery(),
        select(func.count()).where(status_in([RUNNING])).scalar_subquery(),
    )
    return tuple(conn.execute(stmt).one())


# -- whole pages, each in one read transaction -------------------------------------------


def queue_rows(conn: Connection, now: datetime, known: Iterable[str]) -> list[dict[str, Any]]:
    """Every queue (seen in executions, paused once, or a registered job's), its numbers."""
    states = {s.name: s for s in core.queue_states(conn)}
    names = sorted({*distinct_values(conn, "queue"), *states, *known})[:MAX_NAMES]
    rows = []
    for name in names:
        row = queue_row(conn, name, now)
        state = states.get(name)
        row.update(
            name=name,
            paused_at=None if state is None else state.paused_at,
            paused_by=None if state is None else state.paused_by,
        )
        rows.append(row)
    return rows


def overview(conn: Connection, now: datetime, known_queues: Iterable[str]) -> dict[str, Any]:
    """Everything the overview shows."""
    hour_ago = now - timedelta(hours=1)
    return {
        "counts": status_counts(conn, STATUSES),
        "total": estimated_total(conn),
        "queues": queue_rows(conn, now, known_queues),
        "per_minute": per_minute(conn, hour_ago),
        "failures": recent_failures(conn, hour_ago),
        "workers": live_workers(conn),
    }
