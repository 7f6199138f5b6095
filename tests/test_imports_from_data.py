"""A handler string in a row or a message is data: it never makes a process import a
module the application did not allow (issue 19, defect 8)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from jobrunner import JobNotFound, JobRunner, Registry
from jobrunner._engine import make_sync_engine
from jobrunner._schema import executions
from jobrunner.cli import app as cli

from .conftest import Backend
from .jobs import Greet


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A module on sys.path that leaves a mark when imported, and defines a real job."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_mod.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from jobrunner import PhasedJob

            Path({str(marker)!r}).write_text("imported")

            class Job(PhasedJob, register=False):
                name = "planted.job"

                def execute(self, loaded):
                    return "ran"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("planted_mod", None)


def _plant(url: str, execution_id: object, *, status: str) -> None:
    """Point a stored execution at the planted module, as a tampered row would."""
    engine = make_sync_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(executions)
            .where(executions.c.id == execution_id)
            .values(job="planted.job", handler="planted_mod:Job", status=status)
        )
    engine.dispose()


def test_rows_and_hints_never_import_an_unlisted_module(backend: Backend, planted: Path) -> None:
    with JobRunner(backend.url, registry=Registry([Greet])) as runner:
        waiting = runner.submit(Greet, {"who": "w"})
        _plant(backend.url, waiting, status="pending")
        with pytest.raises(JobNotFound, match="imports no module named by stored data"):
            runner.run_execution(waiting)
        with pytest.raises(JobNotFound, match="allow_imports"):
            runner.run_execution(waiting, job="planted_mod:Job")  # a message's hint
        runner.work(concurrency=1, until_idle=True)  # claims only jobs it has
        assert runner.get(waiting).status.value == "pending"

        failed, by_cli = (runner.submit(Greet, {"who": w}) for w in ("api", "cli"))
        for eid in (failed, by_cli):
            _plant(backend.url, eid, status="failed")
        again = runner.retry(failed)  # a budget of one more attempt, nothing imported
        assert again.status.value == "pending" and again.max_attempts == again.attempt + 1
        result = CliRunner().invoke(cli, ["--database-url", backend.url, "retry", str(by_cli)])
        assert result.exit_code == 0, result.output
        assert runner.get(by_cli).status.value == "pending"
        [entry] = runner.audit(by_cli)
        assert entry.action == "retry" and entry.actor.startswith("cli")
    assert not planted.exists(), "a module named only by data was imported"


def test_an_allowed_package_is_imported_on_demand(backend: Backend, planted: Path) -> None:
    registry = Registry([Greet], allow_imports=["planted_mod"])
    with JobRunner(backend.url, registry=registry) as runner:
        waiting = runner.submit(Greet, {"who": "w"})
        _plant(backend.url, waiting, status="pending")
        execution = runner.run_execution(waiting)
    assert planted.exists() and execution.succeeded and execution.result == "ran"


def test_allow_imports_takes_module_prefixes_only() -> None:
    registry = Registry(allow_imports=["myapp.jobs"])
    assert registry._allows("myapp.jobs") and registry._allows("myapp.jobs.email")
    assert not registry._allows("myapp.jobsite") and not registry._allows("myapp")
    with pytest.raises(Exception, match="not a module prefix"):
        Registry(allow_imports=["my app"])
