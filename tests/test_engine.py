"""Engines: URLs, drivers, in-memory SQLite shared safely, unreachable databases."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from jobrunner import (
    AsyncJobRunner,
    ConfigurationError,
    DatabaseUnavailable,
    ExecutionStatus,
    JobRunner,
    PhasedJob,
    Registry,
    SchemaMissing,
)


class Counts(PhasedJob, register=False):
    """Reads in load, so concurrent runs really share the database."""

    def load(self, session: sa.orm.Session, args: Any) -> int:
        return int(session.execute(sa.text("select count(*) from jobrunner_executions")).scalar())

    def execute(self, n: int) -> int:
        return n


class AsyncCounts(PhasedJob, register=False):
    """The async twin of Counts, awaiting in execute so runs interleave."""

    async def load(self, session: AsyncSession, args: Any) -> int:
        result = await session.execute(sa.text("select count(*) from jobrunner_executions"))
        return int(result.scalar_one())

    async def execute(self, n: int) -> int:
        await asyncio.sleep(0.005)
        return n


def test_in_memory_sqlite_serves_concurrent_threads() -> None:
    """sqlite:// keeps one shared in-memory database; 8 threads' runs all succeed."""
    runner = JobRunner("sqlite://", registry=Registry())
    runner.create_schema()
    statuses: list[ExecutionStatus] = []

    def work() -> None:
        statuses.extend(runner.run(Counts).status for _ in range(5))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [ExecutionStatus.SUCCEEDED] * 40
    assert len(runner.list(limit=100)) == 40
    runner.close()


async def test_in_memory_sqlite_serves_concurrent_async_runs() -> None:
    """The async runner on sqlite:// runs 30 interleaved executions on one database."""
    runner = AsyncJobRunner("sqlite://", registry=Registry())
    await runner.create_schema()
    try:
        results = await asyncio.gather(*(runner.run(AsyncCounts) for _ in range(30)))
        assert {e.status for e in results} == {ExecutionStatus.SUCCEEDED}
        assert len(await runner.list(limit=100)) == 30
    finally:
        await runner.aclose()


def test_urls_pick_a_driver_for_each_runner(tmp_path: Any) -> None:
    """Plain URLs get psycopg/sqlite3 for JobRunner and asyncpg/aiosqlite for the async one."""
    file_url = f"sqlite:///{tmp_path / 'x.db'}"
    assert JobRunner(file_url).engine.url.drivername == "sqlite+pysqlite"
    assert AsyncJobRunner(file_url).engine.url.drivername == "sqlite+aiosqlite"
    pg = "postgresql://postgres@127.0.0.1:1/x"
    assert JobRunner(pg).engine.url.drivername == "postgresql+psycopg"
    assert AsyncJobRunner(pg).engine.url.drivername == "postgresql+asyncpg"


def test_bad_urls_fail_clearly() -> None:
    """A malformed or unsupported URL is a ConfigurationError naming what was expected."""
    with pytest.raises(ConfigurationError, match="could not parse database URL"):
        JobRunner("not a url")
    with pytest.raises(ConfigurationError, match="supports sqlite and postgresql"):
        JobRunner("mysql://root@localhost/x")


def test_unreachable_database_is_one_clear_error() -> None:
    """Nothing listening: DatabaseUnavailable says where and what to check."""
    runner = JobRunner("postgresql://postgres@127.0.0.1:1/nowhere", registry=Registry())
    with pytest.raises(DatabaseUnavailable, match=r"127\.0\.0\.1:1/nowhere.*server is running"):
        runner.run(Counts)
    runner.close()


def test_missing_tables_say_how_to_create_them(tmp_path: Any) -> None:
    """A database without jobrunner's tables: SchemaMissing pointing at migrate."""
    runner = JobRunner(f"sqlite:///{tmp_path / 'empty.db'}", registry=Registry())
    with pytest.raises(SchemaMissing, match="jobrunner migrate"):
        runner.list()
    with pytest.raises(SchemaMissing, match="create_schema"):
        runner.run(Counts)
    runner.close()
