"""Reads stay bounded as history grows: list and stats read through indexes, never the table.

Plans are asserted, not times. The store is filled by bulk SQL (``generate_series`` on
PostgreSQL, a recursive CTE on SQLite). PostgreSQL is ``ANALYZE``d and every statement
re-run under ``EXPLAIN (ANALYZE, FORMAT JSON)``: no sequential scan of the executions,
and the rows each scan reads are bounded by the page size or the stats limits, which
does not depend on the machine. SQLite is left without statistics (jobrunner never runs
``ANALYZE`` there): ``EXPLAIN QUERY PLAN`` must read the executions through an index
with no sort over what it read, and the number of VM instructions a query takes must
not grow when the history doubles.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from jobrunner import JobRunner, Registry
from jobrunner import _queries as q
from jobrunner._schema import metadata

from .conftest import Backend

HISTORY = 20_000
LIMIT = 20
#: Statuses one list can merge: every value of ExecutionStatus.
STATUSES = 8

# Row g (0 = newest) was created g seconds ago. Most rows are jobs bulk.a and bulk.b;
# old.job only has old rows (so a newest-first walk of created_at meets it late).
_JOB = """CASE WHEN g % 20 = 0 AND g >= 10000 THEN 'old.job'
    WHEN g % 5 < 3 THEN 'bulk.a' ELSE 'bulk.b' END"""
_STATUS = """CASE WHEN g < 5 THEN 'running' WHEN g % 997 = 0 THEN 'timed_out'
    WHEN g % 499 = 0 THEN 'cancelled' WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END"""
_COLUMNS = """id, job, handler, args, status, queue, attempt, max_attempts, triggered_by,
    lease_token, created_at, started_at, finished_at"""
PG_FILL = f"""
INSERT INTO jobrunner_executions ({_COLUMNS})
SELECT gen_random_uuid(), {_JOB}, 'tests.jobs:Greet', '{{}}'::jsonb, {_STATUS},
       'q' || (g % 3), 1, 1, 'test', 1, now() - g * interval '1 s',
       now() - g * interval '1 s' + interval '10 ms',
       CASE WHEN g < 5 THEN NULL
            ELSE now() - g * interval '1 s' + (10 + g::bigint * 7919 % 2000) * interval '1 ms' END
FROM generate_series(:start, :start + :n - 1) g
"""
_LITE_TIME = (
    "(strftime('%Y-%m-%d %H:%M:%S', ({us}) / 1000000, 'unixepoch')"
    " || '.' || printf('%06d', ({us}) % 1000000))"
)
LITE_FILL = f"""
WITH RECURSIVE s(g) AS (SELECT :start UNION ALL SELECT g + 1 FROM s WHERE g < :start + :n - 1)
INSERT INTO jobrunner_executions ({_COLUMNS})
SELECT lower(hex(randomblob(16))), {_JOB}, 'tests.jobs:Greet', '{{}}', {_STATUS},
       'q' || (g % 3), 1, 1, 'test', 1, {_LITE_TIME.format(us=":now - g * 1000000")},
       {_LITE_TIME.format(us=":now - g * 1000000 + 10000")},
       CASE WHEN g < 5 THEN NULL
            ELSE {_LITE_TIME.format(us=":now - g * 1000000 + (10 + g * 7919 % 2000) * 1000")} END
FROM s
"""

#: Filter shapes of ``list`` (keyword arguments of list_executions).
SHAPES: dict[str, dict[str, Any]] = {
    "newest": {},
    "one-status": {"status": ["failed"]},
    "rare-statuses": {"status": ["failed", "timed_out"]},
    "job-with-old-rows": {"job": "old.job"},
    "job-status-none": {"job": "old.job", "status": ["running"]},
    "job-rare-statuses": {"job": "bulk.a", "status": ["timed_out", "cancelled"]},
    "queue-rare-status": {"queue": "q1", "status": ["timed_out"]},
    "job-since": {"job": "bulk.b", "since": timedelta(hours=1)},
}


def _fill(engine: sa.Engine, start: int, n: int) -> None:
    """``n`` executions created ``start`` to ``start + n - 1`` seconds ago."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(PG_FILL), {"start": start, "n": n})
        else:
            now = int(datetime.now(UTC).timestamp() * 1_000_000)
            conn.execute(sa.text(LITE_FILL), {"start": start, "n": n, "now": now})
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE jobrunner_executions"))


def _filled(backend: Backend) -> Iterator[sa.Engine]:
    url = sa.make_url(backend.url)
    if backend.is_postgres:
        url = url.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    _fill(engine, 0, HISTORY)
    yield engine
    engine.dispose()


@pytest.fixture
def filled(backend: Backend) -> Iterator[sa.Engine]:
    """Each backend's store with ``HISTORY`` executions (PostgreSQL analyzed)."""
    yield from _filled(backend)


@pytest.fixture
def pg_filled(postgres: Backend) -> Iterator[sa.Engine]:
    """PostgreSQL with ``HISTORY`` executions, analyzed."""
    yield from _filled(postgres)


@pytest.fixture
def lite(tmp_path: Path) -> Backend:
    """A fresh SQLite file with the schema (and no statistics)."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    return Backend("sqlite", url)


@pytest.fixture
def lite_filled(lite: Backend) -> Iterator[sa.Engine]:
    """The SQLite file with ``HISTORY`` executions."""
    yield from _filled(lite)


def _list(kw: dict[str, Any]) -> Callable[[sa.Connection], Any]:
    since = kw.get("since")
    args = {**kw, "since": datetime.now(UTC) - since} if since else kw
    return lambda conn: q.list_executions(conn, limit=LIMIT, **args)


def _stats(since: timedelta | None) -> Callable[[sa.Connection], Any]:
    start = None if since is None else datetime.now(UTC) - since
    return lambda conn: q.job_stats(conn, since=start)


def _statements(engine: sa.Engine, read: Callable[[sa.Connection], Any]) -> list[tuple[str, Any]]:
    """The SELECTs ``read`` runs, with their parameters."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, stmt: str, params: Any, *args: Any) -> None:
        if stmt.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append((stmt, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.begin() as conn:
            read(conn)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


# -- PostgreSQL: rows read, from EXPLAIN ANALYZE ----------------------------------------


def _pg_scans(engine: sa.Engine, read: Callable[[sa.Connection], Any]) -> list[dict[str, Any]]:
    """Every plan node that reads jobrunner_executions, over the statements of ``read``."""
    nodes: list[dict[str, Any]] = []
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL jit = off"))
        for stmt, params in _statements(engine, read):
            plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + stmt, params)
            nodes += _walk(plan.scalar_one()[0]["Plan"])
    return [n for n in nodes if n.get("Relation Name") == "jobrunner_executions"]


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _walk(child)


def _rows_read(node: dict[str, Any]) -> float:
    """Rows a scan node read per loop: those it returned and those its filters dropped."""
    dropped = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
    return node["Actual Rows"] + dropped / max(node["Actual Loops"], 1)


def _summary(scans: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{n['Node Type']} {n.get('Index Name', '')} read {_rows_read(n):.0f} x{n['Actual Loops']}"
        for n in scans
    )


def _assert_pg_bounded(scans: list[dict[str, Any]], per_scan: int, total: int) -> None:
    assert scans, "no scan of jobrunner_executions in the plan"
    assert not [n for n in scans if "Seq Scan" in n["Node Type"]], _summary(scans)
    assert max(_rows_read(n) for n in scans) <= per_scan, _summary(scans)
    assert sum(_rows_read(n) * n["Actual Loops"] for n in scans) <= total, _summary(scans)


#: PostgreSQL may read a page through a less selective index (the created_at one, filtered)
#: when its statistics say the matching rows are dense there: it then reads a few pages'
#: worth, never more. What must not happen is a read that grows with the history.
SLACK = 4


@pytest.mark.parametrize("shape", SHAPES)
def test_list_reads_a_page_per_status_on_postgres(shape: str, pg_filled: sa.Engine) -> None:
    """list on PostgreSQL: index scans only, each reading at most a page of rows."""
    scans = _pg_scans(pg_filled, _list(SHAPES[shape]))
    _assert_pg_bounded(scans, per_scan=SLACK * (LIMIT + 1), total=SLACK * STATUSES * (LIMIT + 1))


@pytest.mark.parametrize("since", [timedelta(hours=1), None], ids=["1h", "all"])
def test_stats_reads_at_most_cap_and_sample_on_postgres(
    since: timedelta | None, pg_filled: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stats on PostgreSQL: no table scan; each count stops at the cap, each sample at its size."""
    monkeypatch.setattr(q, "STATS_COUNT_CAP", 200, raising=False)
    monkeypatch.setattr(q, "STATS_SAMPLE", 100, raising=False)
    scans = _pg_scans(pg_filled, _stats(since))
    jobs = 3
    _assert_pg_bounded(scans, per_scan=SLACK * 201, total=SLACK * jobs * STATUSES * (201 + 100))


# -- SQLite: plan shape, and VM instructions as the history doubles -------------------------


Plan = list[tuple[int, int, str]]


def _lite_plans(engine: sa.Engine, read: Callable[[sa.Connection], Any]) -> list[Plan]:
    """The EXPLAIN QUERY PLAN rows (id, parent, detail) of each statement ``read`` runs."""
    with engine.connect() as conn:
        return [
            [(r[0], r[1], r[3]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + s, p)]
            for s, p in _statements(engine, read)
        ]


def _assert_lite_indexed(plans: list[Plan]) -> None:
    """Executions are read by an index range; nothing read from them is sorted whole."""
    for plan in plans:
        text = "\n".join(detail for _, _, detail in plan)
        for _, parent, detail in [r for r in plan if "jobrunner_executions" in r[2]]:
            ranged = detail.startswith("SEARCH") or "ix_jobrunner_executions_created_at" in detail
            assert ranged and "INDEX" in detail, text
            siblings = [d for _, p, d in plan if p == parent]
            assert "USE TEMP B-TREE FOR ORDER BY" not in siblings, text


def _instructions(engine: sa.Engine, read: Callable[[sa.Connection], Any]) -> int:
    """SQLite VM instructions ``read`` takes (counted in steps of 100)."""
    count = 0

    def tick() -> int:
        nonlocal count
        count += 1
        return 0

    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        read(conn)  # warm: the schema parsed, statements compiled
        raw.set_progress_handler(tick, 100)
        try:
            read(conn)
        finally:
            raw.set_progress_handler(None, 100)
    return count * 100


def _assert_lite_flat(engine: sa.Engine, read: Callable[[sa.Connection], Any]) -> None:
    """The work of ``read`` stays the same when as much history again is added."""
    before = _instructions(engine, read)
    _fill(engine, HISTORY, HISTORY)
    after = _instructions(engine, read)
    assert after <= 1.25 * before + 2_000, f"{before} -> {after} VM instructions"


@pytest.mark.parametrize("shape", SHAPES)
def test_list_is_index_backed_and_flat_on_sqlite(shape: str, lite_filled: sa.Engine) -> None:
    """list on SQLite: index ranges, no sort of the table, no more work on twice the history."""
    _assert_lite_indexed(_lite_plans(lite_filled, _list(SHAPES[shape])))
    _assert_lite_flat(lite_filled, _list(SHAPES[shape]))


@pytest.mark.parametrize("since", [timedelta(hours=1), None], ids=["1h", "all"])
def test_stats_is_index_backed_and_flat_on_sqlite(
    since: timedelta | None, lite_filled: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stats on SQLite: index ranges, and no more work on twice the history."""
    monkeypatch.setattr(q, "STATS_COUNT_CAP", 200, raising=False)
    monkeypatch.setattr(q, "STATS_SAMPLE", 100, raising=False)
    _assert_lite_indexed(_lite_plans(lite_filled, _stats(since)))
    _assert_lite_flat(lite_filled, _stats(since))


# -- results stay right --------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_list_returns_what_a_plain_query_returns(shape: str, filled: sa.Engine) -> None:
    """Each shape returns the rows and order of the plain filtered, sorted query."""
    kw = SHAPES[shape]
    since = datetime.now(UTC) - kw["since"] if "since" in kw else None
    e = q.executions.c
    plain = sa.select(e.id).order_by(e.created_at.desc(), e.id).limit(LIMIT)
    if "status" in kw:
        plain = plain.where(e.status.in_(kw["status"]))
    for column in ("job", "queue"):
        if column in kw:
            plain = plain.where(e[column] == kw[column])
    if since is not None:
        plain = plain.where(e.created_at >= since)
    with filled.connect() as conn:
        expected = list(conn.execute(plain).scalars())
        got = q.list_executions(conn, limit=LIMIT, **{**kw, "since": since})
    assert [x.id for x in got] == expected


def test_stats_counts_exactly_below_the_cap_and_says_when_capped(
    filled: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts are exact under the cap, the cap (capped) above; percentiles say when sampled."""
    e = q.executions.c
    with filled.connect() as conn:
        exact = {
            (job, status): n
            for job, status, n in conn.execute(
                sa.select(e.job, e.status, sa.func.count()).group_by(e.job, e.status)
            )
        }
        rows = q.job_stats(conn, sample=50, cap=300)
    got = {(r.job, r.status.value): r for r in rows}
    assert got.keys() == exact.keys()
    for key, n in exact.items():
        row = got[key]
        assert (row.count, row.capped) == ((300, True) if n > 300 else (n, False)), key
        assert row.sampled == (n > 50), key
        finished = key[1] != "running"
        assert row.sample_size == (min(n, 50) if finished else 0), key
        assert (row.p95_ms is not None) == finished, key


def test_stats_percentiles_are_over_the_newest_of_each_group(filled: sa.Engine) -> None:
    """p50/p95 of a sampled group are those of its newest ``sample`` durations."""
    e = q.executions.c
    ms = (sa.func.julianday(e.finished_at) - sa.func.julianday(e.started_at)) * 86_400_000.0
    if filled.dialect.name == "postgresql":
        ms = sa.func.date_part("epoch", e.finished_at - e.started_at) * 1000.0
    with filled.connect() as conn:
        newest = sorted(
            conn.execute(
                sa.select(ms)
                .where(e.job == "bulk.a", e.status == "succeeded")
                .order_by(e.created_at.desc())
                .limit(40)
            ).scalars()
        )
        row = next(
            r
            for r in q.job_stats(conn, sample=40, cap=1_000)
            if (r.job, r.status.value) == ("bulk.a", "succeeded")
        )
    assert row.sampled and row.sample_size == 40
    assert row.p50_ms == pytest.approx((newest[19] + newest[20]) / 2, abs=0.01)
    assert row.p95_ms == pytest.approx(newest[37] + 0.05 * (newest[38] - newest[37]), abs=0.01)


def test_sqlite_reads_never_take_the_write_lock(lite: Backend, lite_filled: sa.Engine) -> None:
    """A list and a stats in one read transaction leave SQLite's write lock to writers."""
    runner = JobRunner(lite.url, registry=Registry())
    try:
        with runner._phases.tx(read=True) as conn:
            q.list_executions(conn, status=["failed", "timed_out"], limit=LIMIT)
            q.job_stats(conn)
            writer = sqlite3.connect(lite.url.removeprefix("sqlite:///"), timeout=0)
            try:
                writer.execute("BEGIN IMMEDIATE")
                writer.execute("DELETE FROM jobrunner_executions WHERE status = 'running'")
                writer.execute("COMMIT")
            finally:
                writer.close()
    finally:
        runner.close()
