"""The scripts in examples/ run as their docstrings say, and leave the rows they promise."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobrunner import metadata

from ._services import scratch_database

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py")) + sorted(EXAMPLES.glob("*/__init__.py"))


def run_example(name: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run examples/<name> as a script from ``cwd`` with this interpreter."""
    environ = {k: v for k, v in os.environ.items() if k != "JOBRUNNER_DATABASE_URL"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)], cwd=cwd, env=environ, capture_output=True,
        text=True, timeout=120,
    )


def fetch(url: str, query: sa.Executable) -> list[tuple[object, ...]]:
    """All rows of ``query`` at ``url``, on a throwaway engine."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]
    finally:
        engine.dispose()


EXECUTIONS = metadata.tables["jobrunner_executions"]
ATTEMPTS = metadata.tables["jobrunner_attempts"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_says_how_to_run_it(script: Path) -> None:
    """Each example's module docstring has a "To run:" section."""
    docstring = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    assert "To run:" in docstring


def test_quickstart_example_on_sqlite(tmp_path: Path) -> None:
    """examples/quickstart.py succeeds twice in a row and records executions and attempts."""
    for _ in range(2):
        done = run_example("quickstart.py", tmp_path)
        assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        "signups.send_welcome_email: succeeded, result {'signup_id': 1, 'message_id': 'msg-1'}"
    )
    assert "signups.flaky_welcome_email: succeeded on attempt 3" in lines
    assert "signups: [(1, 'ada@example.com', 'msg-1')]" in lines
    url = f"sqlite:///{tmp_path / 'quickstart.db'}"
    statuses = fetch(url, sa.select(EXECUTIONS.c.job, EXECUTIONS.c.status))
    assert sorted(statuses) == sorted(2 * [("signups.send_welcome_email", "succeeded"),
                                           ("signups.flaky_welcome_email", "succeeded")])
    assert len(fetch(url, sa.select(ATTEMPTS.c.id))) == 2 * (1 + 3)


@pytest.fixture
def pg_database(pg_server: sa.URL) -> Iterator[str]:
    """An empty scratch PostgreSQL database, as a plain postgresql:// URL."""
    with scratch_database(pg_server, prefix="jobrunner_examples") as url:
        yield url.render_as_string(hide_password=False)


@pytest.mark.postgres
def test_postgres_async_example(tmp_path: Path, pg_database: str) -> None:
    """examples/postgres_async.py runs 20 async jobs on a pool of 2 and a sync one off-loop."""
    done = run_example("postgres_async.py", tmp_path, JOBRUNNER_DATABASE_URL=pg_database)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("images.make_thumbnail: 20/20 succeeded in ")
    assert lines[1].startswith("images.render_report: succeeded; execute ran in thread ")
    assert "'MainThread'" not in lines[1]
    assert lines[2] == "thumbnails rows with a url and one report: 20"
    url = sa.make_url(pg_database).set(drivername="postgresql+psycopg")
    rows = fetch(url.render_as_string(hide_password=False),
                 sa.select(EXECUTIONS.c.job, EXECUTIONS.c.status))
    assert sorted(set(rows)) == [("images.make_thumbnail", "succeeded"),
                                 ("images.render_report", "succeeded")]
    assert len(rows) == 21


def test_postgres_async_example_needs_a_url(tmp_path: Path) -> None:
    """Without JOBRUNNER_DATABASE_URL the PostgreSQL example exits saying what to set."""
    done = run_example("postgres_async.py", tmp_path)
    assert done.returncode == 1
    assert "set JOBRUNNER_DATABASE_URL" in done.stderr
