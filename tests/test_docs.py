"""The documentation is proven: its Python blocks run as written and the site builds strictly.

On the pages tested here, every ```python block is run; illustrations that are not meant
to run on their own (a "before" snippet, a fragment) are fenced as ```py instead. The
quickstart's files and shell commands are run by tests/test_quickstart.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

import jobrunner

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
    """Every ```python block of a docs page, in order."""
    return _BLOCK.findall((DOCS / page).read_text(encoding="utf-8"))


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
