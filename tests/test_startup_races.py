"""Replicas starting at once: migrate() and create_schema() from every one of them, at the
same moment, all succeed and leave one schema (issue 19, defect 6)."""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from jobrunner._migrate import VERSION_TABLE, head_revision

from ._services import scratch_database

REPLICAS = 4
ROUNDS = 3


def _start(kind: str, url: str, barrier: Any, errors: Any) -> None:
    import jobrunner
    from jobrunner import JobRunner, Registry

    try:
        barrier.wait(60)
        if kind == "migrate":
            jobrunner.migrate(url)
        else:
            with JobRunner(url, registry=Registry()) as runner:
                runner.create_schema()
    except BaseException:
        errors.put(traceback.format_exc())


def _start_replicas(kind: str, url: str) -> list[str]:
    # fork: a replica per process without re-importing (each makes its own engine)
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(REPLICAS), ctx.Queue()
    procs = [ctx.Process(target=_start, args=(kind, url, barrier, errors)) for _ in range(REPLICAS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert [p.exitcode for p in procs] == [0] * REPLICAS
    return found


def _version(url: str) -> list[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
    finally:
        engine.dispose()


def _fresh(backend_name: str, tmp_path: Path, round_: int, request: pytest.FixtureRequest) -> Any:
    if backend_name == "sqlite":
        return None, f"sqlite:///{tmp_path / f'fresh{round_}.db'}"
    server = request.getfixturevalue("pg_server")
    scratch = scratch_database(server)
    url = scratch.__enter__().set(drivername="postgresql+psycopg")
    return scratch, url.render_as_string(hide_password=False)


@pytest.mark.parametrize("kind", ["migrate", "create_schema"])
@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_every_replica_may_set_up_the_schema_at_once(
    kind: str, backend_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    for round_ in range(ROUNDS):
        scratch, url = _fresh(backend_name, tmp_path, round_, request)
        try:
            errors = _start_replicas(kind, url)
            assert errors == [], errors[0]
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            with engine.connect() as conn:
                tables = set(sa.inspect(conn).get_table_names())
            engine.dispose()
            assert {"jobrunner_executions", "jobrunner_attempts"} <= tables
            if kind == "migrate":
                assert _version(url) == [head_revision()]
        finally:
            if scratch is not None:
                scratch.__exit__(None, None, None)

