"""Alembic migrations for jobrunner's tables: upgrade, adopt, report where a database is.

The revisions live in ``jobrunner/migrations`` and record themselves in their own version
table, ``jobrunner_alembic_version``, so they never meet the application's own Alembic
history in the same database. Alembic is imported only when a migration runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import URL

from ._engine import database_url, display_url, drop_if_empty, make_sync_engine, parse_url
from ._errors_db import framework_sql
from ._exceptions import ConfigurationError
from ._queries import SCHEMA_LOCK
from ._schema import UTCDateTime, metadata

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

logger = logging.getLogger(__name__)

#: The table holding jobrunner's applied revision (apart from the application's own).
VERSION_TABLE = "jobrunner_alembic_version"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
TABLE_PREFIX = "jobrunner_"

# Session-level PostgreSQL advisory lock ("jobr"): concurrent migrates wait their turn.
_LOCK_KEY = SCHEMA_LOCK

#: ``on_step(revision, description)``: called after each revision is applied.
StepCallback = Callable[[str, str], None]
Target = str | URL | Engine | Connection | None


# -- hooks shared by env.py and the checks ------------------------------------------------


def include_name(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
    """Alembic ``include_name`` hook: jobrunner's tables only, never the application's."""
    return type_ != "table" or (name or "").startswith(TABLE_PREFIX)


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Render jobrunner's own column types as plain SQLAlchemy types in new revisions."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


#: Indexes whose sort order SQLite's reflection drops (``priority DESC``): autogenerate
#: would see a difference that is not there, so they are left out of comparisons there.
_UNREFLECTABLE_ON_SQLITE = frozenset({"ix_jobrunner_executions_due"})


def _include_object(dialect_name: str) -> Callable[..., bool]:
    def include_object(
        obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
    ) -> bool:
        return not (
            dialect_name == "sqlite" and type_ == "index" and name in _UNREFLECTABLE_ON_SQLITE
        )

    return include_object


def context_options(dialect_name: str) -> dict[str, Any]:
    """Keyword arguments for ``context.configure`` that every jobrunner migration uses."""
    return {
        "target_metadata": metadata,
        "version_table": VERSION_TABLE,
        "include_name": include_name,
        "include_object": _include_object(dialect_name),
        "render_item": render_item,
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
        "transaction_per_migration": True,
    }


def alembic_config() -> Config:
    """An Alembic ``Config`` for jobrunner's revisions (for ``alembic.command`` calls)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """The newest revision jobrunner ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "jobrunner ships at least one revision"
    return head


# -- the public entry point ---------------------------------------------------------------


def migrate(
    target: Target = None, *, revision: str = "head", on_step: StepCallback | None = None
) -> list[str]:
    """Upgrade jobrunner's tables to ``revision`` (default: the newest). Idempotent.

    ``target`` is a database URL (default: ``JOBRUNNER_DATABASE_URL``, else the embedded
    ``sqlite:///jobrunner.db``), an ``Engine``, or a ``Connection`` (then the migration
    runs in the caller's transaction, which the caller commits). Tables created earlier
    by ``create_schema()`` are adopted: if they match the newest schema they are stamped,
    not created again. Returns the revisions applied, oldest first (empty when already up
    to date); ``on_step(revision, description)`` is called after each one (on SQLite,
    where the whole upgrade is one transaction, after it commits).
    """
    url = _display(target)
    with framework_sql(url), _alembic_errors(), _connection(target) as (conn, owned):
        return _upgrade(conn, revision, on_step, owned=owned)


def migration_sql(
    target: str | URL | None = None, *, revision: str = "head", start: str | None = None
) -> str:
    """The SQL an upgrade to ``revision`` runs, for review (offline mode).

    ``start`` is the revision the database is at: None to ask the database (empty when it
    is already current), ``"base"`` for the whole schema from nothing.
    """
    from alembic import command

    url = parse_url(database_url(target), is_async=False)
    if start is None:
        start = _revision_of(url)
        if start == head_revision() and revision in ("head", start):
            return f"-- {display_url(url)} is at {start}, the newest revision: nothing to apply\n"
    buffer = io.StringIO()
    config = alembic_config()
    config.output_buffer = buffer
    config.attributes["url"] = url
    span = revision if start in (None, "base") else f"{start}:{revision}"
    with _alembic_errors():
        command.upgrade(config, span, sql=True)
    return buffer.getvalue()


def _revision_of(url: URL) -> str | None:
    """The database's jobrunner revision, or None when it has none (or is unreachable)."""
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return current_revision(conn)
    except Exception:  # no database yet, or not reachable: the SQL from nothing is wanted
        return None
    finally:
        engine.dispose()
        drop_if_empty(engine)


#: The application's own Alembic version table, where jobrunner's revision is recorded
#: when the app's history includes jobrunner's ("one history" mode).
APP_VERSION_TABLE = "alembic_version"


@dataclasses.dataclass(frozen=True)
class Revision:
    """Where a database's jobrunner schema is, and which version table says so."""

    revision: str | None
    table: str | None

    @property
    def shared(self) -> bool:
        """True in one-history mode: the application's Alembic records our revision."""
        return self.table == APP_VERSION_TABLE


def revision_of(conn: Connection) -> Revision:
    """The jobrunner revision of ``conn``'s database, from whichever table records it.

    ``jobrunner migrate`` records it in :data:`VERSION_TABLE`; an application that put
    jobrunner's revisions in its own history has it in ``alembic_version``, beside its
    own revisions (ids starting ``jobrunner_``). Never both: ``migrate`` refuses to
    start a second record.
    """
    heads = _migration_context(conn).get_current_heads()
    if heads:
        return Revision(heads[0], VERSION_TABLE)
    if inspect(conn).has_table(APP_VERSION_TABLE):
        rows = conn.execute(text(f"SELECT version_num FROM {APP_VERSION_TABLE}")).scalars()
        ours = sorted(r for r in rows if str(r).startswith("jobrunner_"))
        if ours:
            return Revision(ours[-1], APP_VERSION_TABLE)
    return Revision(None, None)


def current_revision(conn: Connection) -> str | None:
    """The jobrunner revision ``conn``'s database is at, or None if never migrated."""
    return revision_of(conn).revision


def schema_differences(conn: Connection) -> list[Any]:
    """What Alembic autogenerate would change to make the tables match this version."""
    from alembic.autogenerate import compare_metadata

    return list(compare_metadata(_migration_context(conn, compare=True), metadata))


# -- how it runs ------------------------------------------------------------------------------


def _upgrade(
    conn: Connection, revision: str, on_step: StepCallback | None, *, owned: bool
) -> list[str]:
    from alembic import command

    applied: list[tuple[str, str]] = []

    def record(*, step: Any, **_: Any) -> None:
        rev = step.up_revision_id if step.is_upgrade else step.down_revision_ids[0]
        description = step.up_revision.doc if step.up_revision is not None else ""
        if step.is_stamp:
            description = "existing tables adopted (stamped; they match this revision)"
        applied.append((rev, description))
        if not whole:
            _announce(rev, description, on_step)

    config = alembic_config()
    config.attributes.update(connection=conn, on_version_apply=record)
    with _serialised(conn, owned) as whole:
        found = revision_of(conn)
        if found.shared:
            if owned:
                conn.commit()
            return _shared_history(found, revision)
        adopt = _adoptable(conn)
        if owned and not whole:
            conn.commit()  # end the inspection's implicit transaction; Alembic runs its own
        if adopt is not None:
            command.stamp(config, adopt)
        command.upgrade(config, revision)
        if owned:
            conn.commit()
    if whole:  # one transaction: nothing was applied until it committed
        for rev, description in applied:
            _announce(rev, description, on_step)
    return [rev for rev, _ in applied]


def _announce(rev: str, description: str, on_step: StepCallback | None) -> None:
    logger.info("jobrunner migration %s applied: %s", rev, description)
    if on_step is not None:
        on_step(rev, description)


def _shared_history(found: Revision, revision: str) -> list[str]:
    """One-history mode: the application's Alembic owns our revisions; never a 2nd record."""
    if revision in ("head", head_revision()) and found.revision == head_revision():
        return []  # up to date: a deploy script that always migrates still passes
    raise ConfigurationError(
        f"this database records jobrunner's revision ({found.revision}) in your "
        f"application's {APP_VERSION_TABLE} table (one Alembic history), so your Alembic "
        "applies jobrunner's revisions: run `alembic upgrade heads` (or `alembic upgrade "
        "jobrunner@head`) instead of `jobrunner migrate`"
    )


#: Columns of ``jobrunner_executions`` as 0.1's ``create_schema()`` made them.
_V01_COLUMNS = frozenset(
    {
        "id", "job", "handler", "args", "status", "phase", "attempt", "max_attempts",
        "triggered_by", "external_id", "worker", "lease_token", "idempotency_key",
        "concurrency_key", "cancel_requested", "created_at", "started_at", "finished_at",
        "heartbeat_at", "next_retry_at", "load_ms", "execute_ms", "record_ms",
        "max_loop_lag_ms", "checkpointed", "result", "error_type", "error_message",
        "error_traceback",
    }
)  # fmt: skip


def _adoptable(conn: Connection) -> str | None:
    """The revision that tables made by ``create_schema()`` (no version row) are at.

    Tables matching this version's schema are stamped at head; tables 0.1 created
    are stamped at ``jobrunner_0001`` and then upgraded like any other.
    """
    found = inspect(conn)
    tables = {name for name in found.get_table_names() if name.startswith(TABLE_PREFIX)}
    if not tables - {VERSION_TABLE} or current_revision(conn) is not None:
        return None
    differences = schema_differences(conn)
    if not differences:
        return "head"
    if "jobrunner_executions" in tables:
        columns = {c["name"] for c in found.get_columns("jobrunner_executions")}
        if columns == _V01_COLUMNS:
            return "jobrunner_0001"
    raise ConfigurationError(
        f"jobrunner tables exist ({', '.join(sorted(tables))}) but were not created by "
        f"`jobrunner migrate` and differ from this version's schema "
        f"({len(differences)} difference(s), first: {differences[0]!r}); "
        "bring them up to date by hand or drop them, then migrate"
    )


def _migration_context(conn: Connection, *, compare: bool = False) -> MigrationContext:
    from alembic.runtime.migration import MigrationContext

    opts = context_options(conn.dialect.name) if compare else {"version_table": VERSION_TABLE}
    opts.pop("transaction_per_migration", None)
    return MigrationContext.configure(conn, opts=opts)


@contextlib.contextmanager
def _connection(target: Target) -> Iterator[tuple[Connection, bool]]:
    """The connection to migrate on, and whether this module opened it."""
    if isinstance(target, Connection):
        yield target, False
        return
    engine = target if isinstance(target, Engine) else make_sync_engine(database_url(target))
    try:
        with engine.connect() as conn:
            yield conn, True
    finally:
        if engine is not target:
            engine.dispose()


@contextlib.contextmanager
def _serialised(conn: Connection, owned: bool) -> Iterator[bool]:
    """One migrate at a time per database, from the version check to the last revision.

    PostgreSQL: a session advisory lock, held while Alembic commits each revision in its
    own transaction. SQLite: one ``BEGIN IMMEDIATE`` transaction (the write lock) around
    the whole upgrade, so a second replica reads the version only after the first has
    committed every revision, instead of both reading the old version and both applying
    the next ``ADD COLUMN`` ("duplicate column name"). Alembic sees a transaction already
    open and runs every revision inside it; SQLite's DDL is transactional, so the upgrade
    is all or nothing. Yields True when that one transaction spans the upgrade.

    Only on a connection this module opened: a caller's connection is in the caller's
    transaction, which we must not commit.
    """
    if not owned:
        yield False
        return
    if conn.dialect.name == "sqlite":
        conn.begin()  # BEGIN IMMEDIATE (see _engine._tune_sqlite): waits for the write lock
        if not conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # an engine of yours, not tuned by us
        try:
            yield True
        except BaseException:
            conn.rollback()
            raise
        return
    conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
    conn.commit()
    try:
        yield False
    finally:
        conn.rollback()
        conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
        conn.commit()


@contextlib.contextmanager
def _alembic_errors() -> Iterator[None]:
    """Alembic's own errors (unknown revision, ...) as jobrunner errors."""
    from alembic.util import CommandError

    try:
        yield
    except CommandError as exc:
        raise ConfigurationError(f"migration failed: {exc}") from exc


def _display(target: Target) -> str:
    if isinstance(target, Connection | Engine):
        return display_url(target.engine.url)
    return display_url(database_url(target))
