"""Sessions handed to phases, and the ``self.session()`` scope for execute."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from ._exceptions import ConfigurationError, JobRunnerError, PhaseSessionClosed


class PhaseSession(Session):
    """The session of one phase. Once the phase commits it refuses to be used again.

    The guard sits in :meth:`get_bind`, which every statement and flush goes through, so
    using the load session inside execute fails with a message naming job and phase
    instead of silently opening a second transaction on a pooled connection.
    """

    _jobrunner_closed: tuple[str, str, str] | None = None

    def get_bind(self, *args: Any, **kwargs: Any) -> Any:
        if self._jobrunner_closed is not None:
            job, phase, execution_id = self._jobrunner_closed
            raise PhaseSessionClosed(
                f"the {phase} session of job {job!r} (execution {execution_id}) was "
                f"committed and closed when {phase} ended; it cannot be used afterwards. "
                "Return plain data from load (ORM objects come back detached), and open a "
                "fresh session inside execute with `with self.session() as session:` "
                "(or `async with` in async code)."
            )
        return super().get_bind(*args, **kwargs)

    _jobrunner_phase: tuple[str, str] | None = None

    def commit(self) -> None:
        """Refused: the phase commits once, together with the execution's status."""
        job, phase = self._jobrunner_phase or ("?", "?")
        raise JobRunnerError(
            f"session.commit() was called inside the {phase} phase of job {job!r}; the phase "
            "commits for you when it returns, together with the execution's status, so the "
            "two never disagree. Use session.flush() to send pending writes (e.g. to get "
            "generated ids), and do work that must commit on its own in execute with "
            "`with self.session() as session:`."
        )

    def open_for(self, job: str, phase: str) -> None:
        """Label the session with the job and phase it belongs to (for messages)."""
        self._jobrunner_phase = (job, phase)

    def seal(self, job: str, phase: str, execution_id: str) -> None:
        """Close the session and make any later use raise :class:`PhaseSessionClosed`."""
        self.close()
        self._jobrunner_closed = (job, phase, execution_id)


class SessionScope:
    """``with self.session()`` / ``async with self.session()``: one short transaction.

    Commits on a clean exit, rolls back on error, always closes. Sync code gets a
    :class:`~sqlalchemy.orm.Session`, async code an :class:`AsyncSession`.
    """

    def __init__(
        self,
        sync_factory: Callable[[], sessionmaker[Session]],
        async_factory: async_sessionmaker[AsyncSession] | None,
        runner_name: str,
    ) -> None:
        self._sync_factory = sync_factory
        self._async_factory = async_factory
        self._runner_name = runner_name
        self._sync_cm: Any = None
        self._async_cm: Any = None

    def __enter__(self) -> Session:
        if _loop_running():
            raise JobRunnerError(
                "`with self.session()` was used on a running event loop; a sync session "
                "would block it. Use `async with self.session() as session:` in async code."
            )
        self._sync_cm = self._sync_factory().begin()
        session: Session = self._sync_cm.__enter__()
        return session

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._sync_cm.__exit__(et, ev, tb)

    async def __aenter__(self) -> AsyncSession:
        if self._async_factory is None:
            raise JobRunnerError(
                f"{self._runner_name} is synchronous: `async with self.session()` needs "
                "AsyncJobRunner. In a sync phase use `with self.session() as session:`."
            )
        self._async_cm = self._async_factory.begin()
        session: AsyncSession = await self._async_cm.__aenter__()
        return session

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._async_cm.__aexit__(et, ev, tb)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def caller_connection(target: Session | Connection, engine: Engine) -> Connection:
    """The connection of a caller's session (or the caller's connection) for a submit in
    the caller's transaction; refused if it is not on the runner's database."""
    conn = target.connection() if isinstance(target, Session) else target
    if not isinstance(conn, Connection):
        raise ConfigurationError(
            f"session= takes a Session or a Connection (AsyncSession or AsyncConnection "
            f"with AsyncJobRunner), got {type(target).__name__}"
        )
    mine, theirs = engine.url, conn.engine.url
    same = (mine.get_backend_name(), mine.host, mine.port, mine.database) == (
        theirs.get_backend_name(),
        theirs.host,
        theirs.port,
        theirs.database,
    )
    if not same:
        raise ConfigurationError(
            f"session= is on {theirs.render_as_string(hide_password=True)}, but the runner "
            f"stores executions in {mine.render_as_string(hide_password=True)}; a submit "
            "can share a transaction only with a session on the same database"
        )
    if not conn.in_transaction():
        conn.begin()  # autobegin, as the caller's next statement would
    return conn


def on_commit(target: Any, callback: Callable[[], None]) -> bool:
    """Call ``callback`` once, after the caller's session commits (never on rollback).

    Only a ``Session`` says when its commit is done; a Core ``Connection``'s ``commit``
    event comes *before* the commit. Returns whether the callback was set up.
    """
    if not isinstance(target, Session):
        return False
    event.listen(target, "after_commit", lambda *_: callback(), once=True)
    return True
