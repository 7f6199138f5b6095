"""Jobs the Celery tests run: importable by handler path in the worker and the tests."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from jobrunner import PhasedJob, RetryPolicy

from .support import notes


def _note(session: Any, text: str) -> None:
    session.execute(sa.insert(notes).values(text=text))


def _loops_here() -> list[str]:
    from .celery_app import loops_here  # the worker's loop counter

    return loops_here()


class AsyncProbe(PhasedJob):
    """Async in every phase, using the phase sessions and its own: reports its loop."""

    name = "tests.celery.async_probe"

    class Args(BaseModel):
        n: int

    async def load(self, session: Any, args: Args) -> int:
        await session.execute(sa.text("select 1"))
        return args.n

    async def execute(self, n: int) -> dict[str, Any]:
        async with self.session() as session:
            await session.execute(sa.text("select 1"))
        await asyncio.sleep(0)
        return {
            "n": n,
            "pid": os.getpid(),
            "loop": id(asyncio.get_running_loop()),
            "thread": threading.current_thread().name,
            "loops": _loops_here(),
        }

    async def record(self, session: Any, result: dict[str, Any]) -> None:
        await session.execute(sa.text("select 1"))


class SyncProbe(PhasedJob):
    """Sync in every phase: reports whether any event loop is around."""

    name = "tests.celery.sync_probe"

    class Args(BaseModel):
        n: int

    def load(self, session: Any, args: Args) -> int:
        session.execute(sa.text("select 1"))
        return args.n

    def execute(self, n: int) -> dict[str, Any]:
        try:
            policy_loop = asyncio.get_event_loop_policy()._local._loop  # type: ignore[attr-defined]
        except AttributeError:
            policy_loop = None
        return {
            "n": n,
            "pid": os.getpid(),
            "running_loop": asyncio._get_running_loop() is not None,
            "policy_loop": policy_loop is not None,
            "thread": threading.current_thread().name,
            "loops": _loops_here(),
        }


class SlowNote(PhasedJob):
    """Writes one note per execute, slowly enough to be caught running."""

    name = "tests.celery.slow_note"

    class Args(BaseModel):
        seconds: float

    def execute(self, args: Args) -> str:
        time.sleep(args.seconds)
        with self.session() as session:
            _note(session, f"slow:{self.execution_id}")
        return "done"


def _flaky_policy() -> RetryPolicy:
    return RetryPolicy(
        max_attempts=3, wait_initial=0.2, multiplier=1, jitter=0, retry_on=(ConnectionError,)
    )


class Flaky(PhasedJob):
    """Fails its first two attempts with a transient error; notes the Celery task of each."""

    name = "tests.celery.flaky"
    retry = _flaky_policy()

    def execute(self, args: Any) -> int:
        from celery import current_task

        with self.session() as session:
            _note(session, f"flaky:{self.execution_id}:{self.attempt}:{current_task.request.id}")
        if self.attempt < 3:
            raise ConnectionError(f"attempt {self.attempt} fails")
        return self.attempt


class AsyncFlaky(PhasedJob):
    """Async twin of Flaky."""

    name = "tests.celery.async_flaky"
    retry = _flaky_policy()

    async def execute(self, args: Any) -> int:
        if self.attempt < 3:
            raise ConnectionError(f"attempt {self.attempt} fails")
        return self.attempt


class Tick(PhasedJob):
    """What beat runs."""

    name = "tests.celery.tick"

    class Args(BaseModel):
        n: int

    def execute(self, args: Args) -> int:
        return args.n


class Counted(PhasedJob):
    """Counts each execute in the notes table (committed at once): 'executed:<id>'."""

    name = "tests.celery.counted"

    class Args(BaseModel):
        n: int

    def execute(self, args: Args) -> int:
        with self.session() as session:
            _note(session, f"executed:{self.execution_id}")
        return args.n


class Exclusive(PhasedJob):
    """One at a time: notes how many of its executions were running when it started."""

    name = "tests.celery.exclusive"
    max_concurrency = 1

    class Args(BaseModel):
        n: int

    def execute(self, args: Args) -> int:
        with self.session() as session:
            running = session.execute(sa.text(
                "select count(*) from jobrunner_executions "
                "where job = 'tests.celery.exclusive' and status = 'running'")).scalar_one()
            _note(session, f"exclusive:{self.execution_id}:{running}")
        time.sleep(0.2)
        return args.n
