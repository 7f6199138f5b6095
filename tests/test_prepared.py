"""The per-execution statements run on the driver's cursor (``jobrunner._prepared``):
they store and return exactly what Core would, and fail the way Core would."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from jobrunner import AsyncJobRunner, JobRunner, PhasedJob, Registry, _prepared
from jobrunner._schema import executions

from .conftest import Backend

RESULT = {"ünïcode": "✓", "nested": [1, 2.5, None, {"a": True}], "none": None}


class Returns(PhasedJob, register=False):
    """Returns a JSON result with every JSON kind in it."""

    name = "prepared.returns"

    def execute(self, loaded: Any) -> Any:
        return RESULT


class ReturnsAsync(PhasedJob, register=False):
    name = "prepared.returns_async"

    async def execute(self, loaded: Any) -> Any:
        return RESULT


def _check(execution: Any, stored: Any, before: datetime, after: datetime) -> None:
    """``before``/``after``: this process's UTC clock around the run (the database runs
    on the same host's clock): every moment lies between them, so none was shifted by a
    time zone on its way through the driver."""
    assert execution == stored  # every column, as Core reads it back
    assert isinstance(execution.id, uuid.UUID)
    assert execution.result == RESULT
    assert execution.args == {"k": "v"}
    for moment in (execution.created_at, execution.started_at, execution.finished_at):
        assert moment is not None and moment.tzinfo is not None
        assert moment.utcoffset() == UTC.utcoffset(None)
        # SQLite's clock has milliseconds: a moment may round down below ``before``.
        assert before - timedelta(milliseconds=1) <= moment <= after


def test_the_sync_runner_returns_what_core_reads_back(backend: Backend) -> None:
    with JobRunner(backend.url, registry=Registry([Returns])) as runner:
        before = datetime.now(UTC)
        execution = runner.run(Returns, {"k": "v"})  # insert, checkpoint, end: prepared
        _check(execution, runner.get(execution.id), before, datetime.now(UTC))
        [attempt] = runner.attempts(execution.id)
        assert attempt.status.value == "succeeded"
        assert attempt.finished_at >= attempt.started_at


async def test_the_async_runner_returns_what_core_reads_back(backend: Backend) -> None:
    async with AsyncJobRunner(backend.url, registry=Registry([ReturnsAsync])) as runner:
        before = datetime.now(UTC)
        execution = await runner.run(ReturnsAsync, {"k": "v"})
        _check(execution, await runner.get(execution.id), before, datetime.now(UTC))
        [attempt] = await runner.attempts(execution.id)
        assert attempt.status.value == "succeeded"


def _engine(backend: Backend) -> sa.Engine:
    if backend.is_postgres:
        url = sa.make_url(backend.url).set(drivername="postgresql+psycopg")
        return sa.create_engine(url, isolation_level="AUTOCOMMIT")
    return sa.create_engine(backend.url)


def _row(**values: Any) -> dict[str, Any]:
    row = {
        "id": uuid.uuid4(),
        "job": "prepared.row",
        "handler": "tests.test_prepared:Returns",
        "args": {"k": "v"},
        "status": "pending",
        "queue": "default",
        "attempt": 0,
        "max_attempts": 1,
        "triggered_by": "test",
        "lease_token": 0,
        "created_at": datetime.now(UTC),
    }
    return {**row, **values}


def test_a_failing_statement_raises_core_errors_and_leaves_the_connection_usable(
    backend: Backend,
) -> None:
    engine = _engine(backend)
    insert = sa.insert(executions)
    try:
        with _prepared.Checkout(engine) as conn:
            row = _row()
            _prepared.execute(conn, insert, row)
            conn.connection.commit()  # a no-op in autocommit (PostgreSQL)
            with pytest.raises(sa_exc.IntegrityError) as caught:
                _prepared.execute(conn, insert, row)  # the same primary key again
            assert not caught.value.connection_invalidated
            if not backend.is_postgres:
                conn.connection.rollback()  # SQLite: the failed statement's transaction
            count = sa.select(sa.func.count()).select_from(executions)
            [got] = _prepared.execute(conn, count.where(executions.c.id == row["id"]), {})
            assert list(got.values()) == [1]
    finally:
        engine.dispose()


def test_a_connection_lost_mid_statement_is_invalidated_not_pooled(postgres: Backend) -> None:
    engine = _engine(postgres)
    admin = _engine(postgres)
    try:
        with _prepared.Checkout(engine) as conn:
            [pid] = _prepared.execute(conn, sa.select(sa.func.pg_backend_pid().label("pid")), {})
            with admin.connect() as other:
                other.execute(sa.select(sa.func.pg_terminate_backend(pid["pid"])))
            with pytest.raises(sa_exc.DBAPIError) as caught:
                _prepared.execute(conn, sa.insert(executions), _row())
            assert caught.value.connection_invalidated
        assert engine.pool.checkedout() == 0
        with _prepared.Checkout(engine) as conn:  # a new connection, not the dead one
            [again] = _prepared.execute(
                conn, sa.select(sa.func.pg_backend_pid().label("pid")), {}
            )
            assert again["pid"] != pid["pid"]
    finally:
        engine.dispose()
        admin.dispose()


def test_an_unreachable_server_at_checkout_is_a_core_error(postgres: Backend) -> None:
    url = sa.make_url(postgres.url).set(drivername="postgresql+psycopg", port=1)
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with pytest.raises(sa_exc.OperationalError):
            _prepared.Checkout(engine)
    finally:
        engine.dispose()


def test_a_job_without_record_ends_in_its_checkpoints_own_write(backend: Backend) -> None:
    """Inline, a job with only execute makes two writes: the row's insert, then one that
    stores the result and ends the attempt succeeded (counted as pool checkouts: each
    framework write takes a connection of its own)."""
    with JobRunner(backend.url, registry=Registry([Returns])) as runner:
        pools = {runner.engine.pool}
        if runner._autocommit_engine is not None:
            pools.add(runner._autocommit_engine.pool)
        runner.run(Returns, {"k": "v"})  # connections opened, statements prepared
        checkouts: list[object] = []

        def count(*_: object) -> None:
            checkouts.append(None)

        for pool in pools:
            sa.event.listen(pool, "checkout", count)
        try:
            execution = runner.run(Returns, {"k": "v"})
        finally:
            for pool in pools:
                sa.event.remove(pool, "checkout", count)
        assert len(checkouts) == 2
        assert execution.succeeded and execution.checkpointed and execution.result == RESULT
        [attempt] = runner.attempts(execution.id)
        assert attempt.status.value == "succeeded"


def test_the_finishing_checkpoint_times_execute_and_no_record_phase(backend: Backend) -> None:
    """The row and the ledger of a job without record say how long execute took, and
    carry no record time: no record phase ran."""

    class Sleeps(PhasedJob, register=False):
        name = "prepared.sleeps"

        def execute(self, loaded: Any) -> None:
            threading.Event().wait(0.05)  # a measurable execute

    with JobRunner(backend.url, registry=Registry([Sleeps])) as runner:
        execution = runner.run(Sleeps)
        assert execution.succeeded and execution.phase == "record"
        assert execution.execute_ms is not None and execution.execute_ms >= 50
        assert execution.record_ms is None
        [attempt] = runner.attempts(execution.id)
        assert attempt.execute_ms == execution.execute_ms and attempt.record_ms is None


def _stored(url: str, execution_id: uuid.UUID) -> str | None:
    """The execution's status as another connection sees it (committed, or nothing)."""
    engine = _engine(Backend("postgres", url))
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.select(executions.c.status).where(executions.c.id == execution_id)
            ).scalar_one_or_none()
    finally:
        engine.dispose()


def test_writes_through_your_own_sync_engine_are_committed(postgres: Backend) -> None:
    """With ``engine=`` (no dedicated autocommit engine) every write still commits: a bare
    checkout of a non-autocommit connection would have been rolled back at checkin."""
    url = sa.make_url(postgres.url).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url)
    try:
        with JobRunner(engine=engine, registry=Registry([Returns])) as runner:
            assert runner._autocommit_engine is None
            execution = runner.run(Returns, {"k": "v"})
            assert _stored(postgres.url, execution.id) == "succeeded"
            submitted = runner.submit(Returns, {"k": "v"})
            assert _stored(postgres.url, submitted) == "pending"
            [ran] = runner.run_due()
            assert _stored(postgres.url, ran.id) == "succeeded"
    finally:
        engine.dispose()


async def test_writes_through_your_own_async_engine_are_committed(postgres: Backend) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    url = sa.make_url(postgres.url).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url)
    try:
        async with AsyncJobRunner(engine=engine, registry=Registry([ReturnsAsync])) as runner:
            assert runner._autocommit_engine is None
            execution = await runner.run(ReturnsAsync, {"k": "v"})
            assert _stored(postgres.url, execution.id) == "succeeded"
            submitted = await runner.submit(ReturnsAsync, {"k": "v"})
            assert _stored(postgres.url, submitted) == "pending"
            [ran] = await runner.run_due()
            assert _stored(postgres.url, ran.id) == "succeeded"
    finally:
        await engine.dispose()
