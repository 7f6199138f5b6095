"""Translate driver errors from the framework's own statements into clear errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import exc as sa_exc

from ._exceptions import ConfigurationError, DatabaseUnavailable, SchemaMissing


class WrongEventLoop(ConfigurationError):
    """An AsyncJobRunner used from a loop other than its own: a bug in the caller, raised
    to it, never recorded as the job's failure."""


#: Storage failures (SQLite's messages, PostgreSQL's) and what to do about them.
_STORAGE = (
    ("database or disk is full", "the disk (or the SQLite page limit) is full; free space"),
    ("no space left on device", "the disk is full; free space on the database's volume"),
    ("could not extend file", "the server's disk is full; free space on its data volume"),
    ("disk i/o error", "the disk reported an I/O error; check the volume and its health"),
    (
        "readonly database",
        "the database file (or its folder, where SQLite keeps its -wal and -shm files) is "
        "read-only for this user; fix its permissions",
    ),
    (
        "unable to open database file",
        "SQLite cannot open the file; check that its folder exists and is writable",
    ),
)

_MISSING_TABLE = ("no such table", "does not exist", "undefinedtable")
_WRONG_LOOP = ("attached to a different loop", "another operation is in progress")


def translate(exc: BaseException, url: str) -> Exception | None:
    """A jobrunner error for ``exc`` raised by framework SQL, or None to leave it."""
    text = str(exc).lower()
    if any(marker in text for marker in _WRONG_LOOP):
        return WrongEventLoop(
            "this AsyncJobRunner's async engine belongs to the event loop it first ran on, "
            "and was used from another loop (asyncpg: 'attached to a different loop' / "
            "'another operation is in progress'). Create one AsyncJobRunner per event loop "
            "(e.g. per worker process, inside that process's loop) and aclose() it there."
        )
    if not isinstance(exc, sa_exc.DBAPIError | sa_exc.InterfaceError):
        return None
    if "jobrunner_" in text and any(marker in text for marker in _MISSING_TABLE):
        return SchemaMissing(
            f"the jobrunner tables do not exist in {url}; run `jobrunner migrate` "
            "(or call runner.create_schema() for a quick start)"
        )
    if "database is locked" in text:
        return DatabaseUnavailable(
            f"the SQLite database {url} is locked by another writer: this write waited "
            "the busy timeout (30 s unless busy_timeout= says otherwise) and gave up, or "
            "its snapshot went stale under a concurrent write. Another process may hold a "
            "long write transaction (a stuck worker, a migration, a shell with an open "
            "transaction): find it, or raise busy_timeout; with many writers, use PostgreSQL."
        )
    for marker, advice in _STORAGE:
        if marker in text:
            return DatabaseUnavailable(
                f"the database at {url} could not write: {advice}. This statement's "
                "transaction was rolled back: nothing of it was stored."
            )
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) or getattr(
        exc, "connection_invalidated", False
    ):
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else ""
        return DatabaseUnavailable(
            f"cannot use the database at {url}: {reason}. Check that the server is "
            "running and that the URL (or JOBRUNNER_DATABASE_URL) is right."
        )
    return None


@contextlib.contextmanager
def framework_sql(url: str) -> Iterator[None]:
    """Re-raise driver errors from jobrunner's own statements as jobrunner errors."""
    try:
        yield
    except Exception as exc:
        clear = translate(exc, url)
        if clear is None:
            raise
        raise clear from exc
