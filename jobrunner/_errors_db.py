"""Translate driver errors from the framework's own statements into clear errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import exc as sa_exc

from ._exceptions import DatabaseUnavailable, SchemaMissing

_MISSING_TABLE = ("no such table", "does not exist", "undefinedtable")


def translate(exc: BaseException, url: str) -> Exception | None:
    """A jobrunner error for ``exc`` raised by framework SQL, or None to leave it."""
    if not isinstance(exc, sa_exc.DBAPIError | sa_exc.InterfaceError):
        return None
    text = str(exc).lower()
    if "jobrunner_" in text and any(marker in text for marker in _MISSING_TABLE):
        return SchemaMissing(
            f"the jobrunner tables do not exist in {url}; run `jobrunner migrate` "
            "(or call runner.create_schema() for a quick start)"
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
