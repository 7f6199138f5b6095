"""The rough edges a new user meets first (issue 17), each as it looks to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from jobrunner import JobRunner, PhasedJob, Registry
from jobrunner.cli import app

from .conftest import Backend
from .jobs import Greet

ROOT = Path(__file__).resolve().parents[1]


def cli(url: str | None, *args: str, columns: int = 160) -> Result:
    """``jobrunner [--database-url url] args...`` in-process, in a terminal this wide."""
    prefix = ["--database-url", url] if url is not None else []
    return CliRunner().invoke(app, [*prefix, *args], env={"COLUMNS": str(columns)})


class Fails(PhasedJob):
    """Fails with a long message, the way a reaped execution's error reads."""

    name = "tests.first_hour.a_job_with_a_rather_long_name"

    def execute(self, loaded: Any) -> None:
        raise RuntimeError(
            "worker host-1:4242:ab12cd lost its lease in execute (lease expired "
            "2026-11-27 10:00:00 UTC, last heartbeat 2026-11-27 09:59:30 UTC); attempt 1 "
            "was abandoned and this sentence goes on well past what fits on one line"
        )


@pytest.mark.parametrize("columns", [80, 120])
def test_tables_fit_the_terminal(backend: Backend, runner: JobRunner, columns: int) -> None:
    """At 80 and 120 columns no line is cut or wraps: fewer columns when narrow."""
    runner.registry.register(Greet)
    runner.registry.register(Fails)
    runner.run(Greet, {"who": "table"})
    runner.run(Fails)
    result = cli(backend.url, "list", columns=columns)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= columns
    header = next(line for line in lines if line.startswith("id"))
    assert "started (UTC)" in header
    assert ("triggered by" in header) is (columns >= 110)
    assert "trigg " not in result.stdout
    # The error folds under the job, whole: no sentence cut off mid-way.
    [execution] = [e for e in runner.list() if e.error_message]
    assert all(word in result.stdout for word in (execution.error_message or "").split())


def test_show_prints_non_ascii_args_as_text(backend: Backend, runner: JobRunner) -> None:
    """Cyrillic args print as text, in the table and in --json."""
    runner.registry.register(Greet)
    execution = runner.run(Greet, {"who": "кот Мурзик"})
    shown = cli(backend.url, "show", str(execution.id))
    assert "кот Мурзик" in shown.stdout and "\\u" not in shown.stdout
    as_json = cli(backend.url, "show", str(execution.id), "--json")
    assert "кот Мурзик" in as_json.stdout


def test_check_without_app_passes_when_the_database_is_ready(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A readiness probe: database reachable and migrated is enough, exit 0."""
    monkeypatch.setattr("jobrunner.cli.default_registry", Registry())
    result = cli(backend.url, "check")
    assert result.exit_code == 0, result.output
    assert "none registered" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["bogus"], "No such command 'bogus'"),
        (["list", "--limit", "0"], "--limit"),
        (["show"], "Missing argument 'ID'"),
        (["prune"], "Missing option '--older-than'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    """Unknown commands, bad values and missing options: one ``error:`` line, exit 2."""
    result = cli(None, *args)
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line and "--help" in line
    assert "╭" not in result.output


def test_an_unknown_status_lists_the_statuses(backend: Backend) -> None:
    """--status bogus names the statuses an execution can have, not a Python class."""
    result = cli(backend.url, "list", "--status", "bogus")
    assert result.exit_code == 2
    assert "ExecutionStatus" not in result.stderr
    assert "pending, running, retrying, succeeded, failed, timed_out, cancelled" in result.stderr


def test_flags_show_no_value_in_help() -> None:
    """--verbose and --debug are flags: the help shows no value for them."""
    help_text = cli(None, "--help").stdout
    verbose = next(line for line in help_text.splitlines() if "--verbose" in line)
    assert "<bool>" not in help_text and verbose.split("--verbose")[1].strip().startswith("Log")


def test_stats_json_rounds_durations(backend: Backend, runner: JobRunner) -> None:
    """Durations in --json have at most three decimals (microseconds)."""
    runner.registry.register(Greet)
    for who in ("a", "b", "c"):
        runner.run(Greet, {"who": who})
    result = cli(backend.url, "stats", "--json")
    for row in json.loads(result.stdout)["stats"]:
        for key in ("p50_ms", "p95_ms"):
            assert row[key] == round(row[key], 3)
    shown = json.loads(cli(backend.url, "list", "--json").stdout)
    assert all(e["duration_ms"] == round(e["duration_ms"], 3) for e in shown["executions"])


def test_a_failing_runner_leaves_no_empty_sqlite_file(tmp_path: Path) -> None:
    """JobRunner('sqlite:///typo.db') that finds no tables leaves no file behind."""
    from jobrunner import SchemaMissing

    path = tmp_path / "typo.db"
    runner = JobRunner(f"sqlite:///{path}", registry=Registry())
    with pytest.raises(SchemaMissing):
        runner.list()
    runner.close()
    assert list(tmp_path.iterdir()) == []


def test_migrate_sql_prints_only_what_is_missing(tmp_path: Path) -> None:
    """On a current database --sql says there is nothing to apply; --from base shows it all."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    assert cli(url, "migrate").exit_code == 0
    current = cli(url, "migrate", "--sql")
    assert "nothing to apply" in current.stdout and "CREATE TABLE" not in current.stdout
    everything = cli(url, "migrate", "--sql", "--from", "base")
    assert "CREATE TABLE jobrunner_executions" in everything.stdout
    upgrade = cli(url, "migrate", "--sql", "--from", "jobrunner_0001")
    assert "ADD COLUMN lease_expires_at" in upgrade.stdout
    assert "CREATE TABLE jobrunner_attempts" not in upgrade.stdout


def test_prune_counts_first_and_has_a_dry_run(backend: Backend, runner: JobRunner) -> None:
    """prune --dry-run counts what would go; the real run deletes exactly that many."""
    runner.registry.register(Greet)
    for who in ("a", "b"):
        runner.run(Greet, {"who": who})
    counted = json.loads(cli(backend.url, "prune", "--older-than", "2099-01-01",
                             "--dry-run", "--json").stdout)
    assert counted["would_delete"] == 2 and counted["deleted"] == 0
    assert len(runner.list()) == 2
    pruned = json.loads(cli(backend.url, "prune", "--older-than", "2099-01-01",
                            "--json").stdout)
    assert pruned["deleted"] == 2 and runner.list() == []


def test_retry_names_the_command_that_runs_it(backend: Backend, runner: JobRunner) -> None:
    """retry says which command picks the execution up."""
    runner.registry.register(Fails)
    execution = runner.run(Fails)
    result = cli(backend.url, "retry", str(execution.id))
    assert result.exit_code == 0 and "jobrunner worker" in result.stdout


def test_gitignore_covers_celery_beat_files() -> None:
    """celerybeat-schedule files (written by the Celery how-to) are ignored."""
    assert "celerybeat-schedule" in (ROOT / ".gitignore").read_text()


def test_a_job_defined_in_a_script_warns_and_explains(tmp_path: Path) -> None:
    """python welcome.py with the job in it: a warning at submit, and advice at retry."""
    script = tmp_path / "welcome.py"
    script.write_text(textwrap.dedent("""
        from jobrunner import JobRunner, PhasedJob

        class SendWelcomeEmail(PhasedJob):
            def execute(self, args):
                raise ConnectionError("smtp down")

        with JobRunner("sqlite:///jobs.db") as runner:
            runner.create_schema()
            print(runner.run(SendWelcomeEmail).id)
    """))
    env = {k: v for k, v in os.environ.items() if k != "JOBRUNNER_DATABASE_URL"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "__main__:SendWelcomeEmail" in done.stderr and "module of its own" in done.stderr
    execution_id = done.stdout.strip().splitlines()[-1]
    retry = subprocess.run(
        [sys.executable, "-m", "jobrunner", "--database-url", "sqlite:///jobs.db", "retry",
         execution_id], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert retry.returncode == 1
    assert "--app" in retry.stderr and "module of its own" in retry.stderr
