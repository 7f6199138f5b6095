"""Mistakes an operator makes with URLs and --app, each met by one clear line (issue 19)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import jobrunner
from jobrunner import ConfigurationError, JobRunner
from jobrunner._engine import display_url, parse_url, redact
from jobrunner.cli import app

SECRET = "S3cr3tPw"


def jr(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "160", **(env or {})})


@pytest.mark.parametrize(
    "url",
    [
        f"app:{SECRET}@db.internal/app",  # no scheme: does not parse
        f"postgresql://app:{SECRET}@db.internal:notaport/app",  # bad port
        f"postgresql://app:{SECRET}@db.internal:99999/app",  # port out of range
        f"mysql://app:{SECRET}@db.internal/app",  # unsupported backend
        f"postgresql://app:{SECRET}@127.0.0.1:1/app",  # nothing listens there
    ],
)
def test_no_output_ever_shows_a_password(url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for args in (["check", "--json"], ["check"], ["list"], ["migrate"]):
        result = jr("--database-url", url, *args)
        assert result.exit_code != 0, result.output
        assert SECRET not in result.output, (args, result.output)
        assert "***" in result.output or "db.internal" not in result.output
    assert SECRET not in caplog.text


def test_check_json_names_the_database_without_its_password() -> None:
    result = jr("--database-url", f"app:{SECRET}@db.internal/app", "check", "--json")
    document = json.loads(result.stdout)
    [database] = [c for c in document["checks"] if c["name"].startswith("database")]
    assert not database["ok"]
    assert database["name"] == "database app:***@db.internal/app"
    assert "needs a scheme" in database["detail"]


def test_redact_hides_credentials_in_urls_and_dsns() -> None:
    assert redact("postgresql+psycopg://u:p%40ss@h/db") == "postgresql+psycopg://u:***@h/db"
    assert redact("host=h password=x dbname=d") == "host=h password=*** dbname=d"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"  # nothing to hide
    assert display_url(f"x:{SECRET}@y") == "x:***@y"


def test_the_postgres_scheme_hosts_hand_out_is_understood() -> None:
    assert parse_url("postgres://u:p@h/db", is_async=False).drivername == "postgresql+psycopg"
    assert parse_url("postgres://u:p@h/db", is_async=True).drivername == "postgresql+asyncpg"
    assert parse_url("postgres+asyncpg://h/db", is_async=True).drivername == "postgresql+asyncpg"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://h:abc/db", "invalid database URL"),
        ("postgresql://h:0/db", "ports are 1-65535"),
        ("", "the database URL is empty"),
        ("   ", "the database URL is empty"),
    ],
)
def test_bad_urls_raise_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        JobRunner(url)


def test_an_explicit_url_wins_over_the_environment(tmp_path: Path) -> None:
    env_db, cli_db = tmp_path / "env.db", tmp_path / "cli.db"
    env = {"JOBRUNNER_DATABASE_URL": f"sqlite:///{env_db}"}
    result = jr("--database-url", f"sqlite:///{cli_db}", "demo", env=env)
    assert result.exit_code == 0, result.output
    assert cli_db.exists() and not env_db.exists()
    # demo's own option is explicit too, and beats both
    own = tmp_path / "own.db"
    assert jr("demo", "--database-url", f"sqlite:///{own}", env=env).exit_code == 0
    assert own.exists() and not env_db.exists()
    # and without any option, the environment is used
    assert jr("demo", env=env).exit_code == 0
    assert env_db.exists()


@pytest.mark.parametrize("where", ["option", "environment"])
def test_an_empty_url_is_an_error_not_the_local_file(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if where == "option":
        result = jr("--database-url", "", "migrate", env={"JOBRUNNER_DATABASE_URL": None})
        expected = "the database URL is empty"
    else:
        monkeypatch.setenv("JOBRUNNER_DATABASE_URL", "")
        result = jr("migrate")
        expected = "JOBRUNNER_DATABASE_URL is set but empty"
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert list(tmp_path.iterdir()) == []  # no jobrunner.db appeared
    if where == "environment":
        with pytest.raises(ConfigurationError, match=expected):
            jobrunner.migrate()


def test_a_failing_app_module_blocks_only_what_needs_the_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "brokenapp.py").write_text("import no_such_dependency_xyz\n")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = {"JOBRUNNER_APP": "brokenapp"}
    assert jr("--database-url", url, "migrate", env=env).exit_code == 0
    assert jr("--database-url", url, "migrate", "--help", env=env).exit_code == 0
    listed = jr("--database-url", url, "list", env=env)
    assert listed.exit_code == 0, listed.output
    assert "cannot import --app module 'brokenapp'" in listed.stderr
    assert "going on without its jobs" in listed.stderr
    for needs_jobs in (["jobs"], ["worker", "--until-idle"], ["run", "x"]):
        result = jr("--database-url", url, *needs_jobs, env=env)
        assert result.exit_code == 1, (needs_jobs, result.output)
        assert "cannot import --app module 'brokenapp'" in result.stderr
        assert "no_such_dependency_xyz" in result.stderr
    checked = jr("--database-url", url, "check", env=env)
    assert checked.exit_code == 1
    assert "FAIL jobs: cannot import --app module 'brokenapp'" in checked.stdout


def test_an_invariant_checker_on_in_memory_sqlite_says_to_pass_the_engine() -> None:
    from jobrunner.testing import InvariantChecker

    with pytest.raises(ConfigurationError, match=r"InvariantChecker\(runner.engine\)"):
        InvariantChecker("sqlite://")
    with JobRunner("sqlite://", registry=jobrunner.Registry()) as runner:
        runner.create_schema()
        runner.submit("tests.jobs:Greet", {"who": "memory"})
        checker = InvariantChecker(runner.engine)
        checker.assert_ok()
        checker.close()
        assert len(runner.list()) == 1  # the runner's engine is still usable
