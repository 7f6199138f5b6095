"""Engines for the execution store: URL normalisation, drivers, SQLite tuning."""

from __future__ import annotations

import contextlib
import os
import re
import select
import sqlite3
import time
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from ._exceptions import ConfigurationError

#: Connections a jobrunner PostgreSQL engine keeps open unless ``pool_size`` is given.
DEFAULT_POOL_SIZE = 10

#: The embedded default used by the CLI and the demo.
DEFAULT_URL = "sqlite:///jobrunner.db"

_SYNC_DRIVERS = {"sqlite": "pysqlite", "postgresql": "psycopg"}
_ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
_ASYNC_ONLY = {"aiosqlite", "asyncpg"}
_SYNC_ONLY = {"pysqlite", "psycopg2", "pg8000"}
_INSTALL_HINT = {
    "psycopg": "pip install 'jobrunner[postgres]'",
    "asyncpg": "pip install 'jobrunner[postgres]'",
    "aiosqlite": "pip install aiosqlite",
}


#: Environment variable naming the execution store when no URL is given.
URL_ENV = "JOBRUNNER_DATABASE_URL"

# user:password@ in anything that looks like a URL or a DSN, parsed or not.
_CREDENTIALS = re.compile(
    r"(?P<user>(?:://|^|(?<=[\s'\"=]))[^\s:/@'\"]*):(?P<secret>[^\s@'\"/][^\s@'\"]*)@"
)
_DSN_PASSWORD = re.compile(r"(?P<key>password\s*=\s*)(?P<secret>'[^']*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every password in it (``user:secret@``, ``password=``) as ``***``."""
    text = _CREDENTIALS.sub(r"\g<user>:***@", text)
    return _DSN_PASSWORD.sub(r"\g<key>***", text)


def database_url(url: str | URL | None) -> str | URL:
    """The URL given, else ``JOBRUNNER_DATABASE_URL``, else the embedded SQLite file.

    An empty URL is an error, given or in the environment: ``--database-url "$UNSET"``
    must not quietly write to a local file instead of the database meant.
    """
    if url is not None:
        if not str(url).strip():
            raise ConfigurationError(
                "the database URL is empty; give one like 'postgresql://user@host/dbname' "
                f"or 'sqlite:///jobrunner.db' (or leave it out to use {URL_ENV}, else "
                f"{DEFAULT_URL})"
            )
        return url
    env = os.environ.get(URL_ENV)
    if env is not None:
        if not env.strip():
            raise ConfigurationError(
                f"{URL_ENV} is set but empty; set it to a URL like "
                f"'postgresql://user@host/dbname', or unset it to use {DEFAULT_URL}"
            )
        return env
    return DEFAULT_URL


#: Schemes hosting providers hand out that SQLAlchemy does not know by that name.
_SCHEME_ALIASES = {"postgres": "postgresql"}


def parse_url(url: str | URL, *, is_async: bool) -> URL:
    """Parse ``url`` and pick a driver suited to a sync or async runner.

    Errors never show a password: an unparsable URL is described by its shape only.
    """
    if isinstance(url, str):
        scheme, sep, rest = url.partition("://")
        base, plus, driver_name = scheme.partition("+")
        if sep and base in _SCHEME_ALIASES:
            url = f"{_SCHEME_ALIASES[base]}{plus}{driver_name}{sep}{rest}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(
            f"could not parse database URL {redact(str(url))!r}: a URL needs a scheme, "
            "e.g. 'sqlite:///jobrunner.db' or 'postgresql://user@host:5432/dbname'"
        ) from None
    except ValueError as exc:  # e.g. a port that is not a number
        raise ConfigurationError(
            f"invalid database URL {redact(str(url))!r}: {redact(str(exc))}; expected e.g. "
            "'postgresql://user@host:5432/dbname'"
        ) from None
    _check_port(parsed)
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend not in _SYNC_DRIVERS:
        raise ConfigurationError(
            f"unsupported database {backend!r} in {parsed.render_as_string(hide_password=True)}; "
            "jobrunner supports sqlite and postgresql"
        )
    explicit = "+" in parsed.drivername
    if is_async and (not explicit or driver in _SYNC_ONLY):
        parsed = parsed.set(drivername=f"{backend}+{_ASYNC_DRIVERS[backend]}")
    elif not is_async and (not explicit or driver in _ASYNC_ONLY):
        parsed = parsed.set(drivername=f"{backend}+{_SYNC_DRIVERS[backend]}")
    return parsed


def is_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite database (no file to share between engines)."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _engine_kwargs(url: URL, options: dict[str, Any], *, is_async: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False}
        if is_memory_sqlite(url) and "poolclass" not in options:
            # One connection holds the whole in-memory database; callers queue for it.
            pool = AsyncAdaptedQueuePool if is_async else QueuePool
            kwargs.update(poolclass=pool, pool_size=1, max_overflow=0)
    elif "poolclass" not in options:
        # SQLAlchemy's default of 5 is too small for a worker: connections over pool_size
        # are "overflow", closed on return and reopened on the next checkout, which at 8
        # concurrent executions costs more than the work (see docs/benchmarks.md).
        kwargs["pool_size"] = DEFAULT_POOL_SIZE
    kwargs.update(options)
    return kwargs


def _wrap_driver_error(url: URL, exc: Exception) -> ConfigurationError:
    driver = url.get_driver_name()
    hint = _INSTALL_HINT.get(driver, f"install the {driver} driver")
    return ConfigurationError(f"the database driver {driver!r} is not installed: {hint}")


def make_sync_engine(url: str | URL, *, busy_timeout: float = 30.0, **options: Any) -> Engine:
    """A sync engine for ``url`` (psycopg / sqlite3), SQLite tuned for concurrency."""
    parsed = parse_url(url, is_async=False)
    try:
        engine = create_engine(parsed, **_engine_kwargs(parsed, options, is_async=False))
    except (ImportError, NoSuchModuleError) as exc:
        raise _wrap_driver_error(parsed, exc) from exc
    if parsed.get_backend_name() == "sqlite":
        _tune_sqlite(engine, busy_timeout, memory=is_memory_sqlite(parsed))
        _note_new_file(engine, parsed)
    elif "pool_pre_ping" not in options:
        replace_stale_connections(engine)
    return engine


def replace_stale_connections(engine: Engine) -> None:
    """Replace a pooled PostgreSQL connection the server has closed, as it is checked out.

    A restart, a failover, ``pg_terminate_backend`` or an idle timeout close the server's
    side of every pooled connection; the first statement on one would fail. SQLAlchemy's
    ``pool_pre_ping`` sends a round trip per checkout to find out (three per execution
    here); this asks the connection instead, for free: asyncpg notices the server closing
    its socket as it happens (``is_closed()``), and an idle psycopg connection whose
    socket has something to read was sent a goodbye (or a notice): only then is it
    pinged, and replaced if the ping fails. A connection whose server vanished without a
    word (a network partition) is not caught here, nor by a ping: its first statement
    fails and the execution's lease and retry policy take over. ``pool_pre_ping=True``
    restores SQLAlchemy's round trip per checkout.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if not _maybe_closed(dbapi_connection):
            return
        try:
            alive = dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError(f"pooled connection closed by the server: {exc}") from exc
        if not alive:
            raise DisconnectionError("pooled connection closed by the server")


def _maybe_closed(dbapi_connection: Any) -> bool:
    """Whether a pooled connection may have been closed by the server (no I/O)."""
    asyncpg_connection = getattr(dbapi_connection, "_connection", None)
    if asyncpg_connection is not None and hasattr(asyncpg_connection, "is_closed"):
        if asyncpg_connection.is_closed():
            return True
        # The loop may not have read the server's goodbye yet: is it waiting there?
        transport = getattr(asyncpg_connection, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        return sock is None or _readable(sock.fileno())
    if getattr(dbapi_connection, "closed", False) or getattr(dbapi_connection, "broken", False):
        return True
    pgconn = getattr(dbapi_connection, "pgconn", None)
    if pgconn is None:
        return True  # a driver we cannot look into: ping it
    return _readable(pgconn.socket)


def _readable(fileno: int) -> bool:
    """Whether an idle connection's socket has something to read (or is gone)."""
    try:
        readable, _, _ = select.select([fileno], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


#: SQLite files an engine of ours will create (did not exist when it was made).
_new_files: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def _note_new_file(engine: Engine, url: URL) -> None:
    """Remember a SQLite file this engine is about to create (see :func:`drop_if_empty`)."""
    if not is_memory_sqlite(url) and not Path(str(url.database)).exists():
        _new_files[engine] = str(url.database)


def drop_if_empty(engine: Engine) -> None:
    """Remove the SQLite file this engine created if nothing was ever stored in it.

    ``JobRunner("sqlite:///typo.db")`` that fails (no tables there) must not leave an
    empty database file behind to confuse the next command. Call after ``dispose()``.
    """
    path = _new_files.get(engine)
    if path is None or not Path(path).exists():
        return
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if tables == 0:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(path + suffix).unlink(missing_ok=True)


def make_async_engine(url: str | URL, *, busy_timeout: float = 30.0, **options: Any) -> AsyncEngine:
    """An async engine for ``url`` (asyncpg / aiosqlite), SQLite tuned for concurrency."""
    parsed = parse_url(url, is_async=True)
    try:
        engine = create_async_engine(parsed, **_engine_kwargs(parsed, options, is_async=True))
    except (ImportError, NoSuchModuleError) as exc:
        raise _wrap_driver_error(parsed, exc) from exc
    if parsed.get_backend_name() == "sqlite":
        _tune_sqlite(engine.sync_engine, busy_timeout, memory=is_memory_sqlite(parsed))
        _note_new_file(engine.sync_engine, parsed)
    elif "pool_pre_ping" not in options:
        replace_stale_connections(engine.sync_engine)
    return engine


def _tune_sqlite(engine: Engine, busy_timeout: float, *, memory: bool) -> None:
    """WAL, a busy timeout and BEGIN IMMEDIATE, so concurrent writers queue, never fail.

    sqlite3's default deferred transactions take the write lock only at their first
    write; two of them that both read first then deadlock and one fails at once with
    "database is locked", busy timeout or not. BEGIN IMMEDIATE takes the lock up front,
    so writers wait their turn (the recipe from SQLAlchemy's SQLite dialect docs).
    Transactions that only read (``jobrunner_read_only`` execution option) begin
    DEFERRED instead and never take the write lock at all.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if not memory:
            _set_wal(cursor, busy_timeout)
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Reads begin DEFERRED: in WAL mode they then never wait for the write lock, so a
        # slow read-only transaction (a CLI list, a dashboard page) blocks no writer.
        read_only = conn.get_execution_options().get("jobrunner_read_only", False)
        conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


def _check_port(url: URL) -> None:
    try:
        port = url.port
    except ValueError as exc:
        raise ConfigurationError(
            f"invalid port in database URL {display_url(url)}: {exc}"
        ) from None
    if port is not None and not 0 < port < 65536:
        raise ConfigurationError(
            f"invalid port {port} in database URL {display_url(url)}: ports are 1-65535"
        )


def _set_wal(cursor: Any, busy_timeout: float) -> None:
    """Switch to WAL, waiting up to ``busy_timeout`` for other connections to let it.

    Changing the journal mode needs a lock SQLite may refuse at once, busy handler or
    not ("database is locked" while another replica opens the same new file): try again
    with a short backoff instead of failing a process at start-up.
    """
    deadline = time.monotonic() + busy_timeout
    wait = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + wait > deadline:
                raise
        time.sleep(wait)
        wait = min(wait * 2, 0.2)


def display_url(url: str | URL) -> str:
    """The URL with its password hidden, for messages (even when it does not parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return redact(str(url))
