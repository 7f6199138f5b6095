"""The framework's per-execution statements, run on the driver's cursor.

Every execution makes the same few writes (the inline insert, the phase move, the
checkpoint, the end of the attempt). Through ``Connection.execute`` each pays for
SQLAlchemy's execution pipeline (an execution context, parameter construction, a cursor
result, row objects), about as much Python as the round trip itself. Here each statement
is compiled once per dialect and key set, exactly as Core would compile it, and run on
the pooled DBAPI connection's cursor, with the same bind and result processors (UUIDs,
JSON, the UTC datetimes): what reaches the database is byte for byte Core's statement,
prepared by the driver (asyncpg's statement cache, psycopg's automatic preparation).

What Core would do around a statement is kept: driver errors are wrapped in SQLAlchemy's
``DBAPIError`` classes (so :mod:`jobrunner._errors_db` translates them as before), and a
connection the driver reports as disconnected is invalidated, not returned to the pool.
What is skipped: ``before_cursor_execute`` and similar engine events do not see these
statements (jobrunner's own spans and metrics cover them).

:class:`Checkout` is a pooled connection without a ``Connection`` around it, for a
statement that runs alone in autocommit (PostgreSQL): no ``Connection`` object, no
transaction bookkeeping, just checkout, statement, checkin.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement


class Conn(Protocol):
    """What running a prepared statement needs: a ``Connection`` or a :class:`Checkout`."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def connection(self) -> PoolProxiedConnection: ...


class Checkout:
    """One pooled connection of an autocommit engine (every connection of it is in
    autocommit from its creation), checked out for statements that run alone."""

    __slots__ = ("connection", "dialect")

    def __init__(self, engine: Engine) -> None:
        self.dialect = dialect = engine.dialect
        try:
            self.connection: PoolProxiedConnection = engine.raw_connection()
        except dialect.loaded_dbapi.Error as exc:  # wrapped as Engine.connect() would
            gone = dialect.is_disconnect(cast(Any, exc), None, None)
            raise sa_exc.DBAPIError.instance(
                None, None, exc, dialect.loaded_dbapi.Error, gone, dialect=dialect
            ) from exc

    def __enter__(self) -> Checkout:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None and self.connection.is_valid:
                # A no-op on an autocommit connection (nothing began); should one that
                # is not reach here, its write is committed, not rolled back at checkin.
                self.connection.commit()
        finally:
            self.connection.close()  # back to the pool (invalidated ones are discarded)


_Processor = Callable[[Any], Any] | None


@dataclasses.dataclass(slots=True)
class _Plan:
    """A statement compiled for one dialect and key set, with its processors."""

    statement: ClauseElement  # held so its id() stays unique while the plan is cached
    sql: str
    positional: bool
    #: Per parameter, in the order the driver takes them: (key, processor, constant).
    params: tuple[tuple[str, _Processor, Any], ...]
    names: tuple[str, ...]
    #: Result column keys (empty: the statement returns no rows), their types, and the
    #: processors for them (found at the first execution: some depend on the type code
    #: the driver reports, as in Core's cursor result).
    columns: tuple[str, ...]
    types: tuple[Any, ...]
    results: tuple[_Processor, ...] | None = None

    def bind(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        out = []
        for key, process, constant in self.params:
            value = values[key] if constant is _MISSING else constant
            out.append(value if process is None else process(value))
        return out if self.positional else dict(zip(self.names, out, strict=True))

    def rows(
        self, dialect: Dialect, cursor: Any, raw: Sequence[Sequence[Any]]
    ) -> list[dict[str, Any]]:
        results = self.results
        if results is None:
            codes = [column[1] for column in cursor.description or ()]
            if len(codes) != len(self.types):
                codes = [None] * len(self.types)
            results = self.results = tuple(
                type_._cached_result_processor(dialect, code)
                for type_, code in zip(self.types, codes, strict=True)
            )
        return [
            {
                key: value if process is None else process(value)
                for key, process, value in zip(self.columns, results, row, strict=True)
            }
            for row in raw
        ]


_MISSING = object()
_plans: weakref.WeakKeyDictionary[Dialect, dict[tuple[int, tuple[str, ...]], _Plan]] = (
    weakref.WeakKeyDictionary()
)


def _plan(dialect: Dialect, statement: ClauseElement, keys: tuple[str, ...]) -> _Plan:
    by_statement = _plans.get(dialect)
    if by_statement is None:
        by_statement = _plans.setdefault(dialect, {})
    plan = by_statement.get((id(statement), keys))
    if plan is None:
        plan = by_statement[(id(statement), keys)] = _compile(dialect, statement, keys)
    return plan


def _compile(dialect: Dialect, statement: ClauseElement, keys: tuple[str, ...]) -> _Plan:
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    assert isinstance(compiled, SQLCompiler)
    if compiled.insert_prefetch or compiled.update_prefetch:
        raise ValueError("a prepared statement cannot compute Python-side column defaults")
    processors = compiled._bind_processors
    if compiled.positional:
        names: Sequence[str] = compiled.positiontup or ()
    else:
        names = list(dict.fromkeys(compiled.bind_names.values()))
    by_name = {compiled.bind_names[bind]: bind for bind in compiled.binds.values()}
    params = []
    for name in names:
        bind = by_name[name]
        constant = (
            _MISSING
            if name in keys or bind.required or bind.callable is not None
            else bind.effective_value
        )
        processor = processors.get(name)
        params.append((name, processor if callable(processor) else None, constant))
    entries = compiled._result_columns
    return _Plan(
        statement=statement,
        sql=compiled.string,
        positional=bool(compiled.positional),
        params=tuple(params),
        names=tuple(names),
        columns=tuple(entry.keyname for entry in entries),
        types=tuple(entry.type for entry in entries),
    )


def execute(
    conn: Conn, statement: ClauseElement, values: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Run ``statement`` with ``values`` on ``conn``'s driver; its rows as dicts.

    ``values``' keys are what Core would get as parameters: bind names, and column names
    that extend an INSERT's or UPDATE's column list (compiled once per key set).
    """
    dialect = conn.dialect
    plan = _plan(dialect, statement, tuple(values))
    fairy = conn.connection
    args = plan.bind(values)
    dbapi = fairy.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    try:
        cursor.execute(plan.sql, args)
        if not plan.columns:
            return []
        return plan.rows(dialect, cursor, cursor.fetchall())
    except dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, dialect, plan, args, exc, cursor) from exc
    finally:
        cursor.close()


def first(conn: Conn, statement: ClauseElement, values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The first row :func:`execute` returns, or None."""
    rows = execute(conn, statement, values)
    return rows[0] if rows else None


def _wrapped(
    conn: Conn, dialect: Dialect, plan: _Plan, args: Any, exc: Exception, cursor: Any
) -> sa_exc.StatementError:
    """The error Core would raise for ``exc``, the connection invalidated if it is gone."""
    gone = dialect.is_disconnect(cast(Any, exc), conn.connection.dbapi_connection, cursor)
    if gone:
        if isinstance(conn, Connection):
            conn.invalidate(exc)
        else:
            conn.connection.invalidate(exc)
    return sa_exc.DBAPIError.instance(
        plan.sql,
        args,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=gone,
        dialect=dialect,
    )
