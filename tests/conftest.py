"""Fixtures: a real PostgreSQL and SQLite per backend, runners that must give back every
connection they took."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobrunner import AsyncJobRunner, JobRunner, Registry
from jobrunner._schema import metadata

from ._services import postgres_server, scratch_database


@dataclasses.dataclass(frozen=True)
class Backend:
    """A database the test may use: its name and URL (driver picked by the runner)."""

    name: str
    url: str

    @property
    def is_postgres(self) -> bool:
        return self.name == "postgres"


def _require(var: str) -> bool:
    return os.environ.get(var, "") not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[sa.URL]:
    """A PostgreSQL server URL, found or started (see tests/_services.py)."""
    with postgres_server() as (url, how):
        if url is None:
            if _require("JOBRUNNER_REQUIRE_POSTGRES"):
                pytest.fail(f"JOBRUNNER_REQUIRE_POSTGRES=1 but {how}")
            pytest.skip(how)
        yield url


@pytest.fixture(scope="session")
def pg_url(pg_server: sa.URL) -> Iterator[str]:
    """A database of this test run with the jobrunner schema, dropped at the end."""
    with scratch_database(pg_server) as url:
        rendered = url.render_as_string(hide_password=False)
        engine = sa.create_engine(url.set(drivername="postgresql+psycopg"))
        metadata.create_all(engine)
        engine.dispose()
        yield rendered


def _truncate_pg(url: str) -> None:
    engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"),
                              poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "TRUNCATE jobrunner_attempts, jobrunner_executions, jobrunner_queues,"
            " jobrunner_audit RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn: a fresh SQLite file, or the run's PostgreSQL emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        engine = sa.create_engine(url)
        metadata.create_all(engine)
        engine.dispose()
        return Backend("sqlite", url)
    url = request.getfixturevalue("pg_url")
    _truncate_pg(url)
    return Backend("postgres", url)


@pytest.fixture
def postgres(pg_url: str) -> Backend:
    """PostgreSQL only, emptied."""
    _truncate_pg(pg_url)
    return Backend("postgres", pg_url)


def assert_no_checked_out(pool: sa.pool.Pool, what: str) -> None:
    """Teardown check: every connection the runner took was given back."""
    checked_out = pool.checkedout() if isinstance(pool, sa.pool.QueuePool) else 0
    assert checked_out == 0, f"{what}: {checked_out} connection(s) still checked out"


@pytest.fixture
def runner(backend: Backend) -> Iterator[JobRunner]:
    """A JobRunner with its own registry on the backend."""
    r = JobRunner(backend.url, registry=Registry())
    yield r
    assert_no_checked_out(r.engine.pool, "JobRunner")
    if r._autocommit_engine is not None:
        assert_no_checked_out(r._autocommit_engine.pool, "JobRunner autocommit engine")
    r.close()


@pytest.fixture
async def arunner(backend: Backend) -> AsyncIterator[AsyncJobRunner]:
    """An AsyncJobRunner with its own registry on the backend."""
    r = AsyncJobRunner(backend.url, registry=Registry())
    yield r
    assert_no_checked_out(r.engine.pool, "AsyncJobRunner")
    if r._autocommit_engine is not None:
        assert_no_checked_out(r._autocommit_engine.pool, "AsyncJobRunner autocommit engine")
    if r._sync is not None:
        assert_no_checked_out(r._sync.engine.pool, "AsyncJobRunner sync engine")
    await r.aclose()
