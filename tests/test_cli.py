"""The jobrunner command on SQLite and PostgreSQL, through typer's CliRunner and as installed."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from jobrunner import ExecutionNotFound, ExecutionStatus, JobRunner, PhasedJob, Registry
from jobrunner._engine import make_sync_engine
from jobrunner._migrate import head_revision
from jobrunner._schema import executions
from jobrunner.cli import app

from .conftest import Backend
from .jobs import AsyncGreet, Greet
from .test_migrations import empty_url

__all__ = ["empty_url"]  # the fixture, shared with test_migrations

ROOT = Path(__file__).resolve().parents[1]


class Boom(PhasedJob):
    """Always fails, with no retry: an execution with an error and a traceback."""

    name = "tests.cli.boom"

    def execute(self, loaded: Any) -> None:
        raise ValueError("boom [type=demo]")


def cli(url: str | None, *args: str) -> Result:
    """Run ``jobrunner [--database-url url] args...`` in-process."""
    prefix = ["--database-url", url] if url is not None else []
    return CliRunner().invoke(app, [*prefix, *args], env={"COLUMNS": "160"})


def ok_json(url: str | None, *args: str) -> Any:
    """Run a command with --json; it must succeed and print one JSON document."""
    result = cli(url, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def count(url: str) -> int:
    """How many executions the database holds."""
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(executions)).scalar_one()
            )
    finally:
        engine.dispose()


def set_times(url: str, execution_id: uuid.UUID, *, age: timedelta, duration_ms: float) -> None:
    """Move an execution back in time with a chosen start-to-finish duration."""
    created = datetime.now(UTC) - age
    engine = make_sync_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(executions)
            .where(executions.c.id == execution_id)
            .values(
                created_at=created,
                started_at=created,
                finished_at=created + timedelta(milliseconds=duration_ms),
            )
        )
    engine.dispose()


# -- reading --------------------------------------------------------------------------------


def test_list_filters_and_orders_newest_first(backend: Backend, runner: JobRunner) -> None:
    """list: newest first, --status/--job/--since/--limit filter, a table for people."""
    first = runner.run(Greet, {"who": "a"})
    failed = runner.run(Boom)
    set_times(backend.url, first.id, age=timedelta(hours=3), duration_ms=5)
    listed = ok_json(backend.url, "list")["executions"]
    assert [e["id"] for e in listed] == [str(failed.id), str(first.id)]
    assert listed[1]["status"] == "succeeded" and listed[1]["duration_ms"] == pytest.approx(5)
    assert [e["id"] for e in ok_json(backend.url, "list", "--status", "failed")["executions"]] == [
        str(failed.id)
    ]
    assert len(ok_json(backend.url, "list", "--job", "tests.greet")["executions"]) == 1
    assert len(ok_json(backend.url, "list", "--since", "1h")["executions"]) == 1
    assert len(ok_json(backend.url, "list", "--limit", "1")["executions"]) == 1
    table = cli(backend.url, "list")
    assert table.exit_code == 0
    assert str(failed.id)[:8] in table.stdout and "ValueError" in table.stdout


def test_show_prints_the_row_and_the_attempt_ledger(backend: Backend, runner: JobRunner) -> None:
    """show by 8-digit prefix: error, traceback and attempts; --json holds the same."""
    failed = runner.run(Boom)
    human = cli(backend.url, "show", str(failed.id)[:8])
    assert human.exit_code == 0, human.output
    assert "tests.cli.boom" in human.stdout and "boom [type=demo]" in human.stdout
    assert "Traceback" in human.stdout and "attempts" in human.stdout
    shown = ok_json(backend.url, "show", str(failed.id))
    assert shown["execution"]["error_type"] == "ValueError"
    assert [a["number"] for a in shown["attempts"]] == [1]


def test_attempts_lists_the_ledger(backend: Backend, runner: JobRunner) -> None:
    """attempts prints one row per attempt, oldest first."""
    done = runner.run(Greet, {"who": "ledger"})
    ledger = ok_json(backend.url, "attempts", str(done.id))
    assert ledger["execution_id"] == str(done.id)
    assert [(a["number"], a["status"]) for a in ledger["attempts"]] == [(1, "succeeded")]
    assert cli(backend.url, "attempts", str(done.id)[:8]).exit_code == 0


def test_stats_counts_and_percentiles(backend: Backend, runner: JobRunner) -> None:
    """stats: counts per job and status; p50/p95 interpolate like percentile_cont."""
    for duration in (10, 20, 30, 40):
        execution = runner.run(Greet, {"who": str(duration)})
        set_times(backend.url, execution.id, age=timedelta(minutes=5), duration_ms=duration)
    runner.run(Boom)
    old = runner.run(Greet, {"who": "old"})
    set_times(backend.url, old.id, age=timedelta(days=3), duration_ms=1)
    rows = ok_json(backend.url, "stats", "--since", "1d")["stats"]
    assert [(r["job"], r["status"], r["count"]) for r in rows] == [
        ("tests.cli.boom", "failed", 1),
        ("tests.greet", "succeeded", 4),
    ]
    assert rows[1]["p50_ms"] == pytest.approx(25, abs=1)
    assert rows[1]["p95_ms"] == pytest.approx(38.5, abs=1)
    everything = ok_json(backend.url, "stats", "--since", "all")["stats"]
    assert [r["count"] for r in everything] == [1, 5]
    assert "tests.greet" in cli(backend.url, "stats").stdout


def test_stats_python_api_matches_on_both_runners(backend: Backend, runner: JobRunner) -> None:
    """JobRunner.stats and AsyncJobRunner.stats return the same rows."""
    import asyncio

    from jobrunner import AsyncJobRunner

    runner.run(Greet, {"who": "x"})

    async def async_stats() -> list[Any]:
        async with AsyncJobRunner(backend.url, registry=Registry()) as arunner:
            return await arunner.stats(timedelta(hours=1))

    assert asyncio.run(async_stats()) == runner.stats(timedelta(hours=1))


def test_jobs_lists_registered_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs shows name, handler, phases, retry policy and the args schema."""
    monkeypatch.setattr("jobrunner.cli.default_registry", Registry([Greet, AsyncGreet]))
    listed = {job["name"]: job for job in ok_json(None, "jobs")["jobs"]}
    assert listed["tests.greet"]["handler"] == "tests.jobs:Greet"
    assert listed["tests.async_greet"]["async_phases"] == ["execute"]
    assert listed["tests.greet"]["retry"]["max_attempts"] == 1
    assert listed["tests.greet"]["args_schema"]["required"] == ["who"]
    assert "tests.async_greet" in cli(None, "jobs").stdout


# -- operating ------------------------------------------------------------------------------


def test_retry_then_cancel(backend: Backend, runner: JobRunner) -> None:
    """retry puts a failed execution back to pending; cancel cancels it; twice is an error."""
    failed = runner.run(Boom)
    retried = ok_json(backend.url, "retry", str(failed.id)[:8])["execution"]
    assert retried["status"] == "pending" and retried["triggered_by"] == "cli"
    cancelled = cli(backend.url, "cancel", str(failed.id))
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    assert runner.get(failed.id).status is ExecutionStatus.CANCELLED
    again = cli(backend.url, "cancel", str(failed.id))
    assert again.exit_code == 1
    assert again.stderr.splitlines() == [
        f"error: execution {failed.id} is cancelled; only pending, retrying or running "
        "executions can be cancelled"
    ]


def test_prune_deletes_old_finished_executions_in_batches(
    backend: Backend, runner: JobRunner
) -> None:
    """prune removes finished executions older than the cutoff, batch by batch, nothing else."""
    old = [runner.run(Greet, {"who": str(i)}) for i in range(5)]
    for execution in old:
        set_times(backend.url, execution.id, age=timedelta(days=40), duration_ms=1)
    recent = runner.run(Greet, {"who": "recent"})
    waiting = runner.submit(Greet, {"who": "waiting"})
    set_times(backend.url, waiting, age=timedelta(days=40), duration_ms=1)
    result = ok_json(backend.url, "prune", "--older-than", "30d", "--batch-size", "2")
    assert result["deleted"] == 5
    assert {e.id for e in runner.list()} == {recent.id, waiting}
    human = cli(backend.url, "prune", "--older-than", "30d", "--status", "failed")
    assert human.exit_code == 0 and "Pruned 0 execution(s)" in human.stdout


def test_prune_refuses_unfinished_statuses(backend: Backend, runner: JobRunner) -> None:
    """prune --status running is refused: only finished executions are ever deleted."""
    runner.submit(Greet, {"who": "kept"})
    result = cli(backend.url, "prune", "--older-than", "0s", "--status", "pending")
    assert result.exit_code == 1
    assert "prune deletes finished executions only" in result.stderr
    assert count(backend.url) == 1


def test_prune_python_api_on_the_async_runner(backend: Backend, runner: JobRunner) -> None:
    """AsyncJobRunner.prune deletes the same way and reports progress per batch."""
    import asyncio

    from jobrunner import AsyncJobRunner

    for i in range(3):
        done = runner.run(Greet, {"who": str(i)})
        set_times(backend.url, done.id, age=timedelta(days=2), duration_ms=1)
    seen: list[int] = []

    async def prune() -> int:
        async with AsyncJobRunner(backend.url, registry=Registry()) as arunner:
            return await arunner.prune(timedelta(days=1), batch_size=2, progress=seen.append)

    assert asyncio.run(prune()) == 3
    assert seen == [2, 3]
    assert count(backend.url) == 0


def test_reap_recovers_executions_whose_worker_died(backend: Backend, runner: JobRunner) -> None:
    """reap fails a running execution with a stale heartbeat (no attempts left), once."""
    stuck = runner.submit(Greet, {"who": "stuck"})
    engine = make_sync_engine(backend.url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(executions)
            .where(executions.c.id == stuck)
            .values(
                status="running",
                attempt=1,
                worker="dead-host:1",
                started_at=datetime.now(UTC) - timedelta(hours=1),
                heartbeat_at=datetime.now(UTC) - timedelta(hours=1),
                lease_expires_at=datetime.now(UTC) - timedelta(minutes=59),
            )
        )
    engine.dispose()
    [reaped] = ok_json(backend.url, "reap")["reaped"]
    assert reaped["id"] == str(stuck) and reaped["status"] == "failed"
    assert reaped["error_type"] == "jobrunner.WorkerLost"
    again = cli(backend.url, "reap")
    assert again.exit_code == 0 and "nothing to reap" in again.stdout


def test_run_sync_and_async_jobs_inline(backend: Backend) -> None:
    """run executes a job inline: sync on JobRunner, async phases on AsyncJobRunner."""
    ran = ok_json(backend.url, "run", "tests.greet", "--args", '{"who": "cli"}')["execution"]
    assert ran["status"] == "succeeded" and ran["result"] == "hello cli"
    assert ran["triggered_by"] == "cli"
    ran = ok_json(backend.url, "run", "tests.async_greet", "--args", '{"who": "loop"}')
    assert ran["execution"]["result"] == "hello loop"
    human = cli(backend.url, "run", "tests.jobs:Greet", "-a", '{"who": "path"}')
    assert human.exit_code == 0 and "succeeded" in human.stdout


def test_run_of_a_failing_job_exits_1(backend: Backend) -> None:
    """A run that does not succeed is recorded, shown, and exits 1 with one error line."""
    result = cli(backend.url, "run", "tests.cli.boom")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("warning: execution ") and "ValueError: boom [type=demo]" in line
    assert "failed" in result.stdout and count(backend.url) == 1


def test_check_passes_for_a_migrated_database_and_importable_jobs(
    empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check: schema at head and every job importable by its handler path -> exit 0."""
    monkeypatch.setattr("jobrunner.cli.default_registry", Registry([Greet, Boom]))
    assert cli(empty_url, "migrate").exit_code == 0
    report = ok_json(empty_url, "check")
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} >= {"job tests.greet", "job tests.cli.boom"}


def test_check_fails_on_unimportable_jobs_and_missing_schema(
    empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check: a job defined in a function, and a database never migrated -> exit 1."""

    class Local(PhasedJob, register=False):
        def execute(self, loaded: Any) -> None: ...

    monkeypatch.setattr("jobrunner.cli.default_registry", Registry([Greet, Local]))
    result = cli(empty_url, "check", "--json")
    assert result.exit_code == 1
    failed = [c["name"].split()[0:2] for c in json.loads(result.stdout)["checks"] if not c["ok"]]
    assert [name[0] for name in failed] == ["database", "job"]
    assert failed[1] == ["job", Local.name]
    human = cli(empty_url, "check")
    assert human.exit_code == 1 and "FAIL" in human.stdout


def test_migrate_is_idempotent_and_shows_progress(empty_url: str) -> None:
    """migrate applies the revisions with a line each, then has nothing to do."""
    first = cli(empty_url, "migrate")
    assert first.exit_code == 0, first.output
    assert f"applied {head_revision()}" in first.stderr
    assert "4 revision(s) applied" in first.stdout
    again = ok_json(empty_url, "migrate")
    assert again["applied"] == []
    assert "already up to date" in cli(empty_url, "migrate").stdout
    assert "nothing to apply" in cli(empty_url, "migrate", "--sql").stdout
    full = cli(empty_url, "migrate", "--sql", "--from", "base").stdout
    assert "CREATE TABLE jobrunner_executions" in full


def test_migrate_adopts_the_backend_tables(backend: Backend) -> None:
    """On tables made by create_all, migrate stamps (or finds them stamped) and exits 0."""
    result = ok_json(backend.url, "migrate")
    assert [step["revision"] for step in result["applied"]] in ([], [head_revision()])
    assert ok_json(backend.url, "migrate")["applied"] == []


def test_demo_prints_the_executions_table(backend: Backend) -> None:
    """demo runs its two jobs and prints both in a table; warnings are clean lines."""
    result = cli(backend.url, "demo")
    assert result.exit_code == 0, result.output
    assert "demo.render_invoice" in result.stdout and "demo.charge_card" in result.stdout
    assert "succeeded" in result.stdout and "failed" in result.stdout
    assert "warning: execution" in result.stderr and "Traceback" not in result.stderr


# -- bad input -------------------------------------------------------------------------------

UNKNOWN = "00000000-0000-4000-8000-000000000000"
BAD_INPUT = [
    pytest.param(["show", UNKNOWN], 1, f"no execution with id {UNKNOWN}", id="unknown-id"),
    pytest.param(["show", "abcdef12"], 1, "no execution id starts with", id="unknown-prefix"),
    pytest.param(["retry", "not-an-id"], 2, "is not an execution id", id="malformed-id"),
    pytest.param(["list", "--since", "1x"], 2, "invalid --since '1x'", id="bad-since"),
    pytest.param(["prune", "--older-than", "soon"], 2, "invalid --older-than", id="bad-older"),
    pytest.param(["list", "--status", "bogus"], 2, "invalid --status", id="bad-status"),
    pytest.param(
        ["run", "tests.greet", "--args", "{bad"], 2, "--args is not valid JSON", id="invalid-json"
    ),
    pytest.param(
        ["run", "tests.greet", "--args", "[1]"], 2, "must be a JSON object", id="args-not-object"
    ),
    pytest.param(
        ["run", "tests.greet", "--args", "{}"],
        1,
        "invalid args for job 'tests.greet'",
        id="args-invalid",
    ),
    pytest.param(["run", "tests.gret"], 1, "did you mean 'tests.greet'", id="unknown-job"),
    pytest.param(
        ["--app", "no_such_module_xyz", "jobs"], 1, "cannot import --app module", id="bad-app"
    ),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_writes_nothing(
    backend: Backend, args: list[str], code: int, message: str
) -> None:
    """Bad input: one clear line on stderr, the right exit code, no traceback, no row."""
    result = cli(backend.url, *args)
    assert result.exit_code == code, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line
    assert "Traceback" not in result.output and result.stdout == ""
    assert count(backend.url) == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param(
            "postgresql+psycopg://postgres@127.0.0.1:1/x",
            "cannot use the database",
            id="unreachable",
        ),
        pytest.param("not a url", "could not parse database URL", id="malformed"),
        pytest.param("mysql://localhost/x", "unsupported database 'mysql'", id="unsupported"),
    ],
)
def test_bad_database_url_is_one_line(url: str, message: str) -> None:
    """An unreachable, malformed or unsupported database URL: one line, exit 1."""
    for args in (["list"], ["migrate"], ["run", "tests.greet", "--args", '{"who": "x"}']):
        result = cli(url, *args)
        assert result.exit_code == 1, result.output
        [line] = result.stderr.splitlines()
        assert line.startswith("error: ") and message in line, line


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    """Reading a SQLite file that does not exist says so and leaves no empty file behind."""
    path = tmp_path / "nothing-here.db"
    result = cli(f"sqlite:///{path}", "list")
    assert result.exit_code == 1
    assert "run `jobrunner migrate`" in result.stderr
    assert not path.exists()


def test_debug_lets_the_traceback_through(backend: Backend) -> None:
    """With --debug the original exception propagates (typer prints its traceback)."""
    result = CliRunner().invoke(app, ["--debug", "--database-url", backend.url, "show", UNKNOWN])
    assert result.exit_code == 1
    assert isinstance(result.exception, ExecutionNotFound)


# -- the installed console script ------------------------------------------------------------


def test_installed_console_script(tmp_path: Path) -> None:
    """The `jobrunner` script on PATH migrates a new database and runs a job from --app."""
    script = Path(sys.executable).with_name("jobrunner")
    env = {"JOBRUNNER_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    migrated = run("migrate")
    assert migrated.returncode == 0, migrated.stderr
    ran = run("--app", "tests.jobs", "run", "tests.greet", "--args", '{"who": "shell"}', "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["execution"]["result"] == "hello shell"
    bad = run("show", UNKNOWN)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: no execution with id {UNKNOWN}"
    ]
