"""One async face over either runner: the dashboard's handlers await everything.

A :class:`JobRunner`'s verbs and the dashboard's own queries run in Starlette's thread
pool (they block); an :class:`AsyncJobRunner`'s verbs are awaited on the loop and the
queries go through ``AsyncConnection.run_sync``, so the SQL is written once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.concurrency import run_in_threadpool

from .._runner import AsyncJobRunner, JobRunner

T = TypeVar("T")


class Store:
    """The runner the dashboard shows, and whether it owns (and so closes) it."""

    def __init__(self, runner: JobRunner | AsyncJobRunner, *, owned: bool) -> None:
        self.runner = runner
        self.owned = owned

    @property
    def dialect(self) -> str:
        return str(self.runner.engine.dialect.name)

    @property
    def engine(self) -> Engine | AsyncEngine:
        return self.runner.engine

    async def call(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        """``runner.<verb>(*args, **kwargs)``, awaited or off the loop."""
        method = getattr(self.runner, verb)
        if isinstance(self.runner, AsyncJobRunner):
            return await method(*args, **kwargs)
        return await run_in_threadpool(method, *args, **kwargs)

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(conn, *args, **kwargs)`` in one read-only transaction."""
        engine = self.runner.engine
        call = functools.partial(_in_read_tx, fn, args, kwargs)
        if isinstance(engine, AsyncEngine):
            async with engine.connect() as conn:
                return await conn.run_sync(call)
        return await run_in_threadpool(_read_sync, engine, call)

    async def aclose(self) -> None:
        if not self.owned:
            return
        if isinstance(self.runner, AsyncJobRunner):
            await self.runner.aclose()
        else:
            await run_in_threadpool(self.runner.close)


def _read_sync(engine: Engine, call: Callable[[Connection], T]) -> T:
    with engine.connect() as conn:
        return call(conn)


def _in_read_tx(
    fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], conn: Connection
) -> T:
    """Read in a transaction that SQLite begins DEFERRED (it never takes the write lock)."""
    conn = conn.execution_options(jobrunner_read_only=True)
    with conn.begin():
        return fn(conn, *args, **kwargs)
