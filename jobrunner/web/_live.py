"""Live updates: one watcher per app, fanned out to every open page as server-sent events.

On PostgreSQL the watcher LISTENs on the channel every submit NOTIFYs
(``jobrunner_insert``), so a new execution is announced the moment it commits; starts
and finishes send no NOTIFY, so it also compares a cheap change mark (three index
probes) every ``poll_interval``. On SQLite it compares the mark only. The watcher runs
while at least one page listens. Pages refresh their live parts with htmx on each
event; a client hears of changes at most once per ``min_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from .. import _queries as core
from . import _queries as q
from ._store import Store

logger = logging.getLogger("jobrunner.web")

#: A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0


class Changes:
    """A version number that goes up when executions change, and who waits for it."""

    def __init__(self, store: Store, *, poll_interval: float, min_interval: float) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.min_interval = min_interval
        self.version = 0
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listeners = 0

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def subscribe(self) -> AsyncIterator[int | None]:
        """0 once the watcher watches (anything committed after it is announced), then
        each new version as it comes (None: nothing for a while, a keepalive)."""
        self._listeners += 1
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._watch(), name="jobrunner-web-changes")
        try:
            await self._ready.wait()
            seen = self.version
            yield 0
            while True:
                if self.version == seen:
                    try:
                        await asyncio.wait_for(self._changed.wait(), KEEPALIVE_S)
                    except TimeoutError:
                        yield None
                        continue
                seen = self.version
                yield seen
                await asyncio.sleep(self.min_interval)  # coalesce bursts per client
        finally:
            self._listeners -= 1
            if self._listeners == 0:
                await self.stop()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        listener = await self._listen() if self.store.dialect == "postgresql" else None
        try:
            mark = await self._mark()
            self._ready.set()
            while True:
                notified = await self._wait(listener)
                new = await self._mark()
                if notified or (new is not None and new != mark):
                    mark = new if new is not None else mark
                    self._bump()
        finally:
            if listener is not None:
                await listener.close()

    async def _mark(self) -> tuple[Any, ...] | None:
        try:
            return await self.store.read(q.change_mark)
        except Exception as exc:
            logger.warning("dashboard: reading the change mark failed: %s", exc)
            return None

    async def _wait(self, listener: Any) -> bool:
        """Until a NOTIFY (True) or ``poll_interval`` passed (False)."""
        if listener is None:
            await asyncio.sleep(self.poll_interval)
            return False
        try:
            async for _ in listener.notifies(timeout=self.poll_interval, stop_after=1):
                return True
        except Exception as exc:
            logger.warning("dashboard: LISTEN failed (polling goes on): %s", exc)
            await asyncio.sleep(self.poll_interval)
        return False

    async def _listen(self) -> Any:
        """A psycopg connection LISTENing on the submit channel; None if it cannot."""
        try:
            import psycopg

            url = self.store.engine.url.set(drivername="postgresql")
            conn = await psycopg.AsyncConnection.connect(
                url.render_as_string(hide_password=False), autocommit=True
            )
            await conn.execute(f"LISTEN {core.NOTIFY_CHANNEL}")
            return conn
        except Exception as exc:
            logger.warning("dashboard: cannot LISTEN (polling instead): %s", exc)
            return None
