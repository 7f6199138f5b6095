"""Helpers shared by tests: a user table phases write to, and counters."""

from __future__ import annotations

import asyncio
import threading
import time

import sqlalchemy as sa

user_metadata = sa.MetaData()
notes = sa.Table(
    "test_notes",
    user_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("text", sa.String(200), nullable=False),
)


def make_notes_table(url: str) -> None:
    """Create (empty) the user table the test jobs write to."""
    engine = sa.create_engine(sa.make_url(url).set(
        drivername="postgresql+psycopg" if url.startswith("postgres") else "sqlite"))
    with engine.begin() as conn:
        user_metadata.drop_all(conn)
        user_metadata.create_all(conn)
    engine.dispose()


def note_texts(url: str) -> list[str]:
    """Everything in the user table, in insertion order."""
    engine = sa.create_engine(sa.make_url(url).set(
        drivername="postgresql+psycopg" if url.startswith("postgres") else "sqlite"))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(notes.c.text).order_by(notes.c.id)).scalars().all()
    engine.dispose()
    return list(rows)


class Counter:
    """A thread-safe counter of side effects."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def bump(self, by: int = 1) -> int:
        with self._lock:
            self.value += by
            return self.value


class LoopTicks:
    """When the event loop got to run: a task that wakes every few milliseconds.

    Used to prove that blocking work ran *off* the loop without a wall-clock bound: a
    blocked loop cannot tick at all during the blocking call, however fast or slow the
    machine, while a free one ticks many times (even a loaded machine gives the loop
    thread a slice every few milliseconds of a half-second call).
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopTicks:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._stop is not None and self._task is not None
        self._stop.set()
        await self._task

    async def _run(self) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            self.times.append(time.perf_counter())
            await asyncio.sleep(0.005)

    def assert_ticked_during(self, spans: list[tuple[float, float]]) -> None:
        """Every (start, end) span of blocking work saw the loop tick inside it."""
        assert spans, "no blocking work was recorded"
        for start, end in spans:
            inside = [t for t in self.times if start < t < end]
            assert inside, (
                f"the loop did not run once during a blocking call of "
                f"{(end - start) * 1000:.0f} ms: the call blocked the event loop"
            )
