"""Alembic migrations: they build exactly the models' schema on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import jobrunner
from jobrunner import ConfigurationError, JobRunner, Registry
from jobrunner._migrate import (
    VERSION_TABLE,
    alembic_config,
    head_revision,
    migration_sql,
    schema_differences,
)

from ._services import scratch_database
from .jobs import Greet

JOBRUNNER_TABLES = {"jobrunner_executions", "jobrunner_attempts"}
MIGRATIONS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "howto" / "migrations.md"


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with scratch_database(request.getfixturevalue("pg_server")) as url:
        yield url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def _differences(url: str) -> list[object]:
    """What autogenerate would change to make the database match ``jobrunner.metadata``."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return schema_differences(conn)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _version(url: str) -> list[str]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
    finally:
        engine.dispose()


def test_migrate_builds_the_models_schema_exactly(empty_url: str) -> None:
    """After migrate, Alembic autogenerate finds no difference from jobrunner.metadata."""
    steps: list[tuple[str, str]] = []
    applied = jobrunner.migrate(empty_url, on_step=lambda rev, doc: steps.append((rev, doc)))
    assert (
        applied
        == ["jobrunner_0001", "jobrunner_0002", "jobrunner_0003", "jobrunner_0004"]
        == [rev for rev, _ in steps]
    )
    assert applied[-1] == head_revision()
    assert _tables(empty_url) >= {*JOBRUNNER_TABLES, VERSION_TABLE}
    assert _differences(empty_url) == []
    assert _version(empty_url) == [head_revision()]


def test_migrating_twice_is_a_noop(empty_url: str) -> None:
    """A second migrate applies nothing and keeps the rows already stored."""
    jobrunner.migrate(empty_url)
    with JobRunner(empty_url, registry=Registry()) as runner:
        execution = runner.run(Greet, {"who": "twice"})
    assert jobrunner.migrate(empty_url) == []
    with JobRunner(empty_url, registry=Registry()) as runner:
        assert runner.get(execution.id).succeeded
    assert _version(empty_url) == [head_revision()]


def test_tables_from_create_schema_are_adopted(empty_url: str) -> None:
    """Tables made by create_schema() are stamped, not created again, then migrate is a no-op."""
    with JobRunner(empty_url, registry=Registry()) as runner:
        runner.create_schema()
        execution = runner.run(Greet, {"who": "adopted"})
    assert jobrunner.migrate(empty_url) == [head_revision()]
    assert _version(empty_url) == [head_revision()]
    assert jobrunner.migrate(empty_url) == []
    with JobRunner(empty_url, registry=Registry()) as runner:
        assert runner.get(execution.id).succeeded


def test_foreign_tables_with_our_name_are_refused(empty_url: str) -> None:
    """Tables named like ours but shaped differently stop migrate with a clear error."""
    engine = _engine(empty_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE jobrunner_executions (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(ConfigurationError, match="differ from this version's schema"):
        jobrunner.migrate(empty_url)
    assert VERSION_TABLE not in _tables(empty_url)


def test_the_applications_own_alembic_history_is_untouched(empty_url: str) -> None:
    """jobrunner records itself in its own version table, never in alembic_version."""
    engine = _engine(empty_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('app_head_1234')"))
    jobrunner.migrate(empty_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
            ("app_head_1234",)
        ]
    engine.dispose()
    assert _version(empty_url) == [head_revision()]


def test_migrate_accepts_an_engine_and_downgrades_to_nothing(empty_url: str) -> None:
    """migrate(engine) works, and the revision's downgrade drops every jobrunner table."""
    engine = _engine(empty_url)
    try:
        assert jobrunner.migrate(engine)[-1] == head_revision()
        config = alembic_config()
        with engine.connect() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
            conn.commit()
    finally:
        engine.dispose()
    assert not _tables(empty_url) & JOBRUNNER_TABLES


def _app_alembic(tmp_path: Path) -> Config:
    """An application's Alembic whose history includes jobrunner's (one history)."""
    app_dir = tmp_path / "app_migrations"
    (app_dir / "versions").mkdir(parents=True)
    (app_dir / "env.py").write_text(
        textwrap.dedent(
            """
            from alembic import context

            connection = context.config.attributes["connection"]
            context.configure(connection=connection, target_metadata=None)
            with context.begin_transaction():
                context.run_migrations()
            """
        )
    )
    (app_dir / "versions" / "app_0001_notes.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from alembic import op

            revision = "app_0001"
            down_revision = None
            branch_labels = ("app",)
            depends_on = None

            def upgrade():
                op.create_table("app_notes", sa.Column("id", sa.Integer, primary_key=True))

            def downgrade():
                op.drop_table("app_notes")
            """
        )
    )
    config = Config()
    config.set_main_option("script_location", str(app_dir))
    config.set_main_option("path_separator", "space")
    config.set_main_option(
        "version_locations", f"{app_dir / 'versions'} jobrunner:migrations/versions"
    )
    return config


def _app_upgrade(config: Config, url: str, target: str) -> None:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, target)
            conn.commit()
    finally:
        engine.dispose()


def test_embedding_in_the_applications_alembic_via_version_locations(
    empty_url: str, tmp_path: Path
) -> None:
    """The documented multi-base setup: the app's Alembic upgrades 'heads' and gets our tables."""
    _app_upgrade(_app_alembic(tmp_path), empty_url, "heads")
    assert _tables(empty_url) >= {"app_notes", *JOBRUNNER_TABLES, "alembic_version"}
    assert _differences(empty_url) == []


def test_one_history_has_one_record_of_jobrunners_revision(
    empty_url: str, tmp_path: Path
) -> None:
    """One-history mode, through a second jobrunner revision: check reads the app's table,
    migrate never starts a second record, and the app's next upgrade applies the rest."""
    from jobrunner.cli import app as cli

    config = _app_alembic(tmp_path)
    _app_upgrade(config, empty_url, "app@head")
    _app_upgrade(config, empty_url, "jobrunner@jobrunner_0003")  # an older jobrunner release
    [database] = _database_check(cli, empty_url)
    assert not database["ok"]
    assert "schema at revision jobrunner_0003 in alembic_version" in database["detail"]
    assert "alembic upgrade heads" in database["detail"]
    with pytest.raises(ConfigurationError, match="alembic upgrade heads"):
        jobrunner.migrate(empty_url)
    assert VERSION_TABLE not in _tables(empty_url)  # no second record was started

    _app_upgrade(config, empty_url, "heads")  # the app applies jobrunner's next revision
    assert _differences(empty_url) == []
    assert jobrunner.migrate(empty_url) == []  # up to date: deploy scripts still pass
    assert VERSION_TABLE not in _tables(empty_url)
    [database] = _database_check(cli, empty_url)
    assert database["ok"], database
    assert f"schema at revision {head_revision()}" in database["detail"]
    assert "create_schema" not in database["detail"]


def _database_check(cli: Any, url: str) -> list[dict[str, Any]]:
    """``jobrunner check --json``'s database check (the jobs checked depend on the run)."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli, ["--database-url", url, "check", "--json"])
    checks = json.loads(result.stdout)["checks"]
    return [c for c in checks if str(c["name"]).startswith("database")]


def test_offline_sql_for_review() -> None:
    """migrate --sql's text creates both tables and the version table, without connecting."""
    sql = migration_sql("postgresql+psycopg://nobody@127.0.0.1:1/nowhere")
    for table in (*JOBRUNNER_TABLES, VERSION_TABLE):
        assert f"CREATE TABLE {table}" in sql
    assert "JSONB" in sql


def test_the_migrations_page_python_blocks_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ```python blocks of docs/howto/migrations.md run as written."""
    blocks = re.findall(r"^```python\n(.*?)^```", MIGRATIONS_PAGE.read_text(), re.S | re.M)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(MIGRATIONS_PAGE), "exec"), {})
    assert head_revision() in capsys.readouterr().out
    assert _version(f"sqlite:///{tmp_path / 'jobrunner.db'}") == [head_revision()]


def _fill_like_0_1(url: str) -> dict[str, str]:
    """Rows as jobrunner 0.1 wrote them, in every status it left behind; id by role."""
    import uuid as uuid_mod
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC).replace(tzinfo=None)
    roles = {
        "celery_pending": ("pending", None, 0, 1, False),
        "due_pending": ("pending", now - timedelta(seconds=5), 0, 1, False),
        "stuck_cancel": ("retrying", now - timedelta(seconds=5), 1, 3, True),
        "abandoned_left": ("abandoned", None, 1, 3, False),
        "abandoned_last": ("abandoned", None, 1, 1, False),
        "running": ("running", None, 1, 1, False),
        "done": ("succeeded", None, 1, 1, False),
    }
    ids = {role: str(uuid_mod.uuid4()) for role in roles}
    engine = _engine(url)
    with engine.begin() as conn:
        for role, (status, due, attempt, max_attempts, cancel) in roles.items():
            conn.execute(
                sa.text(
                    "INSERT INTO jobrunner_executions (id, job, handler, args, status, attempt, "
                    "max_attempts, triggered_by, lease_token, cancel_requested, created_at, "
                    "heartbeat_at, next_retry_at, checkpointed) VALUES (:id, 'tests.greet', "
                    "'tests.jobs:Greet', :args, :status, :attempt, :max, 'api', :attempt, "
                    ":cancel, :created, :beat, :due, :done)"
                ),
                {
                    "id": ids[role] if url.startswith("postgres") else ids[role].replace("-", ""),
                    "args": json.dumps({"who": role}),
                    "status": status,
                    "attempt": attempt,
                    "max": max_attempts,
                    "cancel": cancel,
                    "created": now - timedelta(minutes=1),
                    "beat": now if status == "running" else None,
                    "due": due,
                    "done": status == "succeeded",
                },
            )
    engine.dispose()
    return ids


def test_upgrading_a_database_0_1_created_and_filled(empty_url: str) -> None:
    """0.1's schema and rows, upgraded: every row lands where v2 can move it."""
    from .jobs import Greet

    assert jobrunner.migrate(empty_url, revision="jobrunner_0001") == ["jobrunner_0001"]
    ids = _fill_like_0_1(empty_url)
    assert jobrunner.migrate(empty_url) == ["jobrunner_0002", "jobrunner_0003", "jobrunner_0004"]
    assert _differences(empty_url) == []
    registry = Registry()
    registry.register(Greet)
    with JobRunner(empty_url, registry=registry) as runner:
        got = {role: runner.get(eid) for role, eid in ids.items()}
        assert got["celery_pending"].due_at is not None  # visible to workers at last
        assert got["stuck_cancel"].status.value == "cancelled"
        assert got["abandoned_left"].status.value == "retrying"
        assert got["abandoned_last"].status.value == "failed"
        assert got["running"].lease_expires_at is not None
        assert got["done"].queue == "default" and got["done"].priority == 0
        ran = {e.id for e in runner.run_due()}
        assert {str(i) for i in ran} == {
            ids["celery_pending"],
            ids["due_pending"],
            ids["abandoned_left"],
        }


def test_tables_0_1_s_create_schema_made_are_adopted_and_upgraded(empty_url: str) -> None:
    """0.1's create_schema() tables (no version row) are stamped at 0001, then upgraded."""
    jobrunner.migrate(empty_url, revision="jobrunner_0001")
    engine = _engine(empty_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))
    engine.dispose()
    assert jobrunner.migrate(empty_url) == [
        "jobrunner_0001",
        "jobrunner_0002",
        "jobrunner_0003",
        "jobrunner_0004",
    ]
    assert _differences(empty_url) == []


def test_upgrading_a_database_0003_created_and_filled(empty_url: str) -> None:
    """The previous landing's schema (0003) with its rows: 0004 keeps them all runnable,
    and adds the queues, the audit and trace context."""
    import uuid as uuid_mod
    from datetime import UTC, datetime, timedelta

    assert jobrunner.migrate(empty_url, revision="jobrunner_0003")[-1] == "jobrunner_0003"
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = {
        "due": ("pending", now - timedelta(seconds=5), None),
        "celery": ("pending", now - timedelta(seconds=5), "celery"),
        "failed": ("failed", None, None),
    }
    ids = {role: uuid_mod.uuid4() for role in rows}
    engine = _engine(empty_url)
    with engine.begin() as conn:
        for role, (status, due, dispatch) in rows.items():
            eid = ids[role]
            conn.execute(
                sa.text(
                    "INSERT INTO jobrunner_executions (id, job, handler, args, status, queue, "
                    "priority, attempt, max_attempts, triggered_by, lease_token, "
                    "cancel_requested, created_at, due_at, dispatch, checkpointed, "
                    "idempotency_key) VALUES (:id, 'tests.greet', 'tests.jobs:Greet', :args, "
                    ":status, 'default', 0, :attempt, 1, 'api', 0, false, :created, :due, "
                    ":dispatch, false, :key)"
                ),
                {
                    "id": str(eid) if empty_url.startswith("postgres") else eid.hex,
                    "args": json.dumps({"who": role}),
                    "status": status,
                    "attempt": 1 if status == "failed" else 0,
                    "created": now - timedelta(minutes=1),
                    "due": due,
                    "dispatch": dispatch,
                    "key": role,
                },
            )
    engine.dispose()

    assert jobrunner.migrate(empty_url) == ["jobrunner_0004"]
    assert _differences(empty_url) == []
    registry = Registry()
    registry.register(Greet)
    with JobRunner(empty_url, registry=registry) as runner:
        assert runner.get(ids["due"]).trace_context is None
        assert [e.id for e in runner.run_due()] == [ids["due"]]  # the broker's row is left
        assert runner.get(ids["celery"]).status.value == "pending"
        runner.retry(ids["failed"], actor="upgrade-test")
        assert [a.action for a in runner.audit(ids["failed"])] == ["retry"]
        assert runner.pause_queue("default")
        assert runner.run_due() == []
        assert [e.job for e in runner.list(job="tests.greet", status="failed")] == []


def test_a_sqlite_upgrade_is_seen_whole_or_not_at_all(tmp_path: Path) -> None:
    """Another replica never reads a half-upgraded SQLite database (issue 19, defect 6).

    CI saw two replicas migrate one new file at once and both apply the same revision
    ("duplicate column name"): one had committed some revisions when the other read the
    version and started from there. The upgrade now runs in one transaction holding the
    write lock, so a reader between two revisions sees the database as it was before,
    and ``on_step`` reports revisions only once they are committed.
    """
    import sqlite3
    import threading

    from jobrunner._engine import make_sync_engine

    path = tmp_path / "replicas.db"
    engine = make_sync_engine(f"sqlite:///{path}")
    between, release = threading.Event(), threading.Event()
    reported: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def pause_between_revisions(*args: Any) -> None:
        # the second revision records itself with an UPDATE of the version row
        if args[2].startswith(f"UPDATE {VERSION_TABLE}") and not between.is_set():
            between.set()
            release.wait(60)

    def migrate() -> None:
        jobrunner.migrate(engine, on_step=lambda rev, _: reported.append(rev))

    first = threading.Thread(target=migrate)
    first.start()
    try:
        assert between.wait(60), "the migration never reached its second revision"
        with contextlib.closing(sqlite3.connect(path)) as other:
            seen = other.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        reported_midway = list(reported)
    finally:
        release.set()
        first.join(60)
    engine.dispose()
    assert not first.is_alive()
    assert seen == [], f"a half-upgraded database was visible to another connection: {seen}"
    assert reported_midway == [], "revisions were reported applied before they committed"
    assert _version(f"sqlite:///{path}") == [head_revision()]
    assert reported[-1] == head_revision()
