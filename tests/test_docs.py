"""The documentation is proven: its Python blocks run as written and the site builds strictly.

On the pages tested here, every ```python block is run; illustrations that are not meant
to run on their own (a "before" snippet, a fragment) are fenced as ```py instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import jobrunner
from jobrunner import metadata

from ._services import scratch_database

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
POSTGRES_HEADING = "## 5. Switch to PostgreSQL"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
    """Every ```python block of a docs page, in order."""
    return _BLOCK.findall((DOCS / page).read_text(encoding="utf-8"))


def quickstart_script(*, postgres: bool) -> str:
    """The quickstart's blocks as the one file the page tells readers to build."""
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    assert POSTGRES_HEADING in text, "the quickstart lost its PostgreSQL section"
    if not postgres:
        text = text.split(POSTGRES_HEADING)[0]
    return "\n\n".join(_BLOCK.findall(text))


def run_script(source: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Save ``source`` as welcome.py in ``cwd`` and run it with this interpreter."""
    script = cwd / "welcome.py"
    script.write_text(source, encoding="utf-8")
    environ = {k: v for k, v in os.environ.items() if k != "JOBRUNNER_DATABASE_URL"}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=environ, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def job_rows(url: str) -> list[tuple[str, str]]:
    """(job, status) of every row in jobrunner_executions at ``url``, oldest first."""
    executions = metadata.tables["jobrunner_executions"]
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            query = sa.select(executions.c.job, executions.c.status).order_by(
                executions.c.created_at)
            return [tuple(row) for row in conn.execute(query)]
    finally:
        engine.dispose()


@pytest.fixture
def pg_database(pg_server: sa.URL) -> Iterator[str]:
    """An empty scratch PostgreSQL database, as a plain postgresql:// URL."""
    with scratch_database(pg_server, prefix="jobrunner_docs") as url:
        yield url.render_as_string(hide_password=False)


def test_quickstart_reaches_the_jobs_row_on_sqlite(tmp_path: Path) -> None:
    """Following the quickstart up to PostgreSQL writes the custom job's executions row."""
    done = run_script(quickstart_script(postgres=False), tmp_path)
    lines = done.stdout.splitlines()
    assert lines[0] == "succeeded {'signup_id': 1, 'message_id': 'msg-1'}"
    assert lines[1].startswith("('signups.send_welcome_email', 'succeeded', 1,")
    assert "succeeded after 3 attempts" in lines
    assert "failed load sqlalchemy.exc.NoResultFound" in lines
    assert job_rows(f"sqlite:///{tmp_path / 'welcome.db'}") == [
        ("signups.send_welcome_email", "succeeded"),
        ("signups.flaky_welcome_email", "succeeded"),
        ("signups.send_welcome_email", "failed"),
    ]


@pytest.mark.postgres
def test_quickstart_switches_to_postgres(tmp_path: Path, pg_database: str) -> None:
    """The whole quickstart, PostgreSQL section included, writes the row on PostgreSQL."""
    done = run_script(
        quickstart_script(postgres=True), tmp_path, JOBRUNNER_DATABASE_URL=pg_database
    )
    assert done.stdout.splitlines()[-1].startswith("('signups.send_welcome_email', 'succeeded'")
    pg_url = sa.make_url(pg_database).set(drivername="postgresql+psycopg")
    assert job_rows(pg_url.render_as_string(hide_password=False)) == [
        ("signups.send_welcome_email", "succeeded")
    ]


def test_index_example_runs(tmp_path: Path) -> None:
    """The complete example on the home page runs and its job succeeds."""
    first, *_ = python_blocks("index.md")
    done = run_script(first, tmp_path)
    assert done.stdout.startswith("succeeded")


def exec_page(page: str, module_name: str) -> dict[str, object]:
    """Run every ```python block of ``page`` in order, in one fresh module namespace."""
    namespace: dict[str, object] = {"__name__": module_name}
    code = "\n\n".join(python_blocks(page))
    exec(compile(code, str(DOCS / page), "exec"), namespace)
    return namespace


def test_fastapi_howto_app_submits_runs_and_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FastAPI how-to's app: 202 with an id, the background run, status, inline run."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv("JOBRUNNER_DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    app = exec_page("howto/fastapi.md", "docs_fastapi_howto")["app"]
    with TestClient(app) as client:  # type: ignore[arg-type]
        accepted = client.post("/reports/7/export")
        assert accepted.status_code == 202
        status = client.get(f"/executions/{accepted.json()['execution_id']}").json()
        assert status["status"] == "succeeded"
        assert status["result"] == {"url": "https://files.example.com/reports/7.csv"}
        assert client.get("/executions/not-an-id").status_code == 404
        assert client.post("/reports/8/export-now").json()["status"] == "succeeded"


def test_celery_migration_task_runs_the_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The migrated Celery task runs its phased job with JobRunner and marks the games."""
    from datetime import UTC, datetime, timedelta

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    monkeypatch.setenv("JOBRUNNER_DATABASE_URL", url)
    page = exec_page("howto/migrate-celery-async.md", "docs_celery_migration")
    games: sa.Table = page["games"]  # type: ignore[assignment]
    runner = page["jobs"]()  # type: ignore[operator]
    runner.create_schema()
    soon, later = datetime.now(UTC) + timedelta(minutes=10), datetime.now(UTC) + timedelta(days=1)
    with runner.engine.begin() as conn:
        page["app_metadata"].create_all(conn)  # type: ignore[attr-defined]
        conn.execute(sa.insert(games), [{"id": 1, "starts_at": soon},
                                        {"id": 2, "starts_at": later}])
    try:
        task = page["check_notifications"].apply(kwargs={"window_minutes": 60})  # type: ignore[attr-defined]
        outcome = task.get()
        assert outcome["status"] == "succeeded"
        execution = runner.get(outcome["execution_id"])
        assert execution.result == {"game_ids": [1]} and execution.external_id == task.id
        assert execution.triggered_by == "celery"
        with runner.engine.connect() as conn:
            sent = conn.execute(sa.select(games.c.id, games.c.reminder_sent)).all()
        assert sorted(sent) == [(1, True), (2, False)]
    finally:
        runner.close()


def test_testing_howto_module_passes(tmp_path: Path) -> None:
    """The test module on the testing how-to passes under pytest, as a reader would run it."""
    (tmp_path / "test_welcome.py").write_text(
        "\n\n".join(python_blocks("howto/testing.md")), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_welcome.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 passed" in done.stdout


def test_api_reference_covers_the_public_api() -> None:
    """Every name in jobrunner.__all__ has a ::: entry on the API reference page."""
    page = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: jobrunner\.([A-Za-z]\w*)$", page, re.M))
    public = {name for name in jobrunner.__all__ if not name.startswith("__")}
    assert sorted(public - documented) == []
    assert sorted(documented - public) == []


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    """mkdocs build --strict succeeds: no broken links, no missing references."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "quickstart" / "index.html").exists()
