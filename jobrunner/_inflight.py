"""Attempts running in this process, and the heartbeat that keeps their leases.

One heartbeat per runner refreshes every in-flight lease in a single short transaction
each ``heartbeat_interval`` (no connection is held between beats). Its answer says which
executions were cancelled and which leases were lost; those attempts are signalled: sync
code sees ``self.cancelled()`` and stops at the next phase boundary, async attempts are
cancelled at their next ``await``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from . import _queries as q
from ._attempt import AttemptState
from ._exceptions import ExecutionCancelled, JobRunnerError, LeaseLost
from ._monitor import cancel_task

logger = logging.getLogger("jobrunner")

Reason = Literal["cancel", "lost"]


@dataclasses.dataclass(eq=False)
class Running:
    """One execution in flight here: how to tell it to stop, and why it was told.

    ``interrupt`` (async runners) cancels the task running the execution; it is used
    only while an async user step of load or execute runs (``state.interruptible``),
    never during a framework write, a sync phase's thread or record. Everything else
    sees the signal at its next step.
    """

    state: AttemptState
    cancel_event: threading.Event = dataclasses.field(default_factory=threading.Event)
    interrupt: Callable[[], object] | None = None
    reason: Reason | None = None
    #: An interrupt was sent to the task and not yet taken back.
    interrupted: bool = False
    #: The job instance of the current attempt, and that attempt's number.
    job: Any = None
    job_attempt: int = 0

    def signal(self, reason: Reason) -> None:
        """Ask the execution to stop; an interruptible async step is cancelled now."""
        if self.reason is not None:
            return
        self.reason = reason
        self.cancel_event.set()
        if self.interrupt is not None and self.state.interruptible:
            self.interrupted = True
            self.interrupt()

    def reset(self) -> None:
        """Forget signals about an earlier attempt (a new claim holds a new lease)."""
        self.reason = None
        self.interrupted = False
        self.cancel_event.clear()

    def error(self) -> JobRunnerError:
        """The error the attempt ends with after a signal."""
        state = self.state
        when = f"during {state.phase}" if state.phase else "before it started"
        if self.reason == "lost":
            return LeaseLost(
                f"execution {state.execution_id} of {state.job_cls.name!r}: attempt "
                f"{state.number} lost its lease {when} (reaped or taken over); "
                "it stopped without writing"
            )
        return ExecutionCancelled(
            f"execution {state.execution_id} of {state.job_cls.name!r} was cancelled {when}"
        )

    def check(self) -> None:
        """Raise at a phase boundary if the attempt was told to stop."""
        if self.reason is not None:
            raise self.error()


class InFlight:
    """The attempts this runner is running now, keyed by execution id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[uuid.UUID, Running] = {}

    def __len__(self) -> int:
        return len(self._items)

    @contextlib.contextmanager
    def track(self, running: Running) -> Iterator[Running]:
        """Register ``running`` for the duration of the attempt."""
        key = running.state.execution_id
        with self._lock:
            self._items[key] = running
        try:
            yield running
        finally:
            with self._lock:
                if self._items.get(key) is running:
                    del self._items[key]

    def get(self, execution_id: uuid.UUID) -> Running | None:
        """The in-flight attempt of ``execution_id``, if this runner has one."""
        return self._items.get(execution_id)

    def all(self) -> list[Running]:
        """Every execution in flight now."""
        with self._lock:
            return list(self._items.values())

    def idle(self) -> bool:
        """True when nothing is in flight."""
        return not self._items

    def leases(self) -> list[tuple[uuid.UUID, int, float]]:
        """(id, token, lease seconds) of every attempt whose lease is committed and held.

        An execution between attempts (an inline retry's wait) holds no lease.
        """
        with self._lock:
            items = list(self._items.values())
        return [
            (r.state.execution_id, r.state.lease.token, r.state.lease.seconds)
            for r in items
            if r.state.lease.how == "held" and not r.state.needs_claim
        ]

    def apply(
        self, asked: list[tuple[uuid.UUID, int, float]], answer: dict[uuid.UUID, bool]
    ) -> None:
        """Signal attempts whose execution was cancelled or whose lease is gone."""
        for execution_id, token, _ in asked:
            running = self._items.get(execution_id)
            if running is None or running.state.lease.token != token:
                continue  # finished, or moved on to a new attempt, since we asked
            if execution_id not in answer:
                running.signal("lost")
            elif answer[execution_id]:
                running.signal("cancel")


def _beat_failed(exc: Exception) -> None:
    logger.warning("heartbeat failed (%s: %s); will try again", type(exc).__name__, exc)


class SyncHeartbeat:
    """A daemon thread beating while attempts are in flight; it exits when idle."""

    def __init__(
        self,
        inflight: InFlight,
        tx: Callable[[], contextlib.AbstractContextManager[Connection]],
        interval: float,
    ) -> None:
        self._inflight = inflight
        self._tx = tx
        self.interval = interval
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def ensure_running(self) -> None:
        """Start the beating thread unless it runs already."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="jobrunner-heartbeat", daemon=True
                )
                self._thread.start()

    def beat(self) -> None:
        """Refresh every committed lease once and signal the attempts that must stop."""
        asked = self._inflight.leases()
        if not asked:
            return
        with self._tx() as conn:
            answer = q.heartbeat(conn, asked)
        self._inflight.apply(asked, answer)

    def stop(self) -> None:
        """Stop the thread (the runner is closing)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not len(self._inflight):
                with self._lock:
                    if not len(self._inflight):
                        self._thread = None
                        return
            try:
                self.beat()
            except Exception as exc:  # a blip must not kill the heartbeat
                _beat_failed(exc)


class AsyncHeartbeat:
    """A task on the runner's loop beating while attempts are in flight; exits when idle."""

    def __init__(
        self,
        inflight: InFlight,
        tx: Callable[[], contextlib.AbstractAsyncContextManager[AsyncConnection]],
        interval: float,
    ) -> None:
        self._inflight = inflight
        self._tx = tx
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        """Start the beating task on the running loop unless it runs already."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="jobrunner-heartbeat"
            )

    async def beat(self) -> None:
        """Refresh every committed lease once and signal the attempts that must stop."""
        asked = self._inflight.leases()
        if not asked:
            return
        async with self._tx() as conn:
            answer = await conn.run_sync(q.heartbeat, asked)
        self._inflight.apply(asked, answer)

    async def stop(self) -> None:
        """Cancel the task (the runner is closing)."""
        task, self._task = self._task, None
        await cancel_task(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not len(self._inflight):
                return
            try:
                await self.beat()
            except Exception as exc:  # a blip must not kill the heartbeat
                _beat_failed(exc)
