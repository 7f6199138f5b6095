"""The database's clock, as SQL: leases and due times are computed where they are compared.

A worker's clock and a reaper's clock may disagree by seconds; the database's does not
disagree with itself. ``db_now()`` is the time of the current statement (PostgreSQL's
``statement_timestamp()``, not ``now()``, which stands still for a whole transaction);
``db_after(param)`` is that plus a bound number of seconds. On SQLite both render the
same text format SQLAlchemy stores (``YYYY-MM-DD HH:MM:SS.ffffff``), so they compare
correctly with stored timestamps.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, bindparam
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.functions import FunctionElement

from ._schema import UTCDateTime

# SQLite's %f gives milliseconds; three zeros make it SQLAlchemy's microsecond format.
_SQLITE_NOW = "(strftime('%Y-%m-%d %H:%M:%f', 'now'{}) || '000')"


class db_now(FunctionElement[Any]):
    """The database's time at this statement."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"


class db_after(FunctionElement[Any]):
    """The database's time at this statement plus ``seconds`` (a bound float)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_after"


def after(param: str) -> db_after:
    """``db_after`` of the float parameter named ``param``."""
    return db_after(bindparam(param, type_=Float))


def seconds(value: float) -> db_after:
    """``db_after`` of a literal number of seconds (bound, so statements still cache)."""
    return db_after(bindparam(None, float(value), type_=Float))


@compiles(db_now, "postgresql")
def _now_pg(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "statement_timestamp()"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return _SQLITE_NOW.format("")


@compiles(db_now)
def _now_default(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


def _offset(element: db_after, compiler: SQLCompiler, **kw: Any) -> str:
    (param,) = element.clauses
    assert isinstance(param, BindParameter)
    return str(compiler.process(param, **kw))


@compiles(db_after, "postgresql")
def _after_pg(element: db_after, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(statement_timestamp() + make_interval(secs => {_offset(element, compiler, **kw)}))"


@compiles(db_after, "sqlite")
def _after_sqlite(element: db_after, compiler: SQLCompiler, **kw: Any) -> str:
    modifier = f", printf('%+.6f seconds', {_offset(element, compiler, **kw)})"
    return _SQLITE_NOW.format(modifier)
