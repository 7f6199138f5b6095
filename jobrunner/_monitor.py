"""Event-loop health: which phase is running, who blocks the loop, and by how much.

Two instruments, both cheap:

* the step timer (:func:`timed_steps`) wraps each async phase; it times every step a
  coroutine runs between two ``await`` points, so a blocking call is attributed exactly
  to its execution and phase (and can fail it in strict mode);
* :class:`LoopMonitor` samples the loop's responsiveness (a sleep that wakes up late
  means the loop was busy) and reports lag however it was caused, including by code
  that is not a job at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._exceptions import ConfigurationError, LoopBlocked

if TYPE_CHECKING:
    from ._attempt import AttemptState

logger = logging.getLogger("jobrunner.loop")

P = ParamSpec("P")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class PhaseInfo:
    """The execution, job and phase a piece of code runs on behalf of."""

    execution_id: str
    job: str
    phase: str
    state: AttemptState


#: Set while a phase runs; read by the loop monitor and by log records.
current_phase: contextvars.ContextVar[PhaseInfo | None] = contextvars.ContextVar(
    "jobrunner_current_phase", default=None
)

_FIX = (
    "a blocking call (time.sleep, sync SQL, HTTP or file I/O) ran on the event loop. "
    "Move it off the loop with `await self.to_thread(fn, ...)`, or make the phase a plain "
    "`def` so the runner runs it in a worker thread."
)


@dataclasses.dataclass(frozen=True, slots=True)
class LoopHealth:
    """How a runner's loop is doing: the thresholds the step timer and monitor apply."""

    threshold_ms: float = 100.0
    strict: bool = False


@dataclasses.dataclass(slots=True)
class _Blocker:
    info: PhaseInfo
    ended: float
    held_ms: float


# The last phase step that held the loop too long, per loop: the monitor names it.
_last_blocker: dict[asyncio.AbstractEventLoop, _Blocker] = {}


class _Steps:
    """Await ``coro`` step by step, telling ``on_step`` how long each step held the loop.

    ``on_step(held_ms, finished)`` may return an exception: it is thrown into the
    coroutine at once (or raised, if the coroutine already finished).
    """

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        on_step: Callable[[float, bool], BaseException | None],
    ) -> None:
        self._coro = coro
        self._on_step = on_step

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, on_step = self._coro, self._on_step
        send: Any = None
        error: BaseException | None = None
        while True:
            started = time.perf_counter()
            try:
                yielded = coro.throw(error) if error is not None else coro.send(send)
            except StopIteration as stop:
                if (late := on_step((time.perf_counter() - started) * 1000, True)) is not None:
                    raise late from None
                return stop.value
            error = on_step((time.perf_counter() - started) * 1000, False)
            if error is not None:
                send = None  # strict: fail the phase where it is instead of resuming it
                continue
            try:
                send, error = (yield yielded), None
            except BaseException as exc:
                send, error = None, exc


class _PhaseSteps:
    """The step check of a job phase: attribute, log, and in strict mode fail."""

    def __init__(self, info: PhaseInfo, health: LoopHealth) -> None:
        self._info = info
        self._health = health

    def __call__(self, held_ms: float, finished: bool) -> LoopBlocked | None:
        if held_ms < self._health.threshold_ms:
            return None
        info = self._info
        info.state.note_lag(held_ms)
        with contextlib.suppress(RuntimeError):
            _last_blocker[asyncio.get_running_loop()] = _Blocker(info, time.perf_counter(), held_ms)
        logger.warning(
            "%s of job %s (execution %s) held the event loop for %.0f ms",
            info.phase,
            info.job,
            info.execution_id,
            held_ms,
            extra={
                "execution_id": info.execution_id,
                "job": info.job,
                "attempt": info.state.number,
                "phase": info.phase,
                "loop_held_ms": held_ms,
            },
        )
        if not self._health.strict:
            return None
        return LoopBlocked(
            f"{info.phase} of job {info.job!r} held the event loop for {held_ms:.0f} ms "
            f"(strict_loop allows {self._health.threshold_ms:.0f} ms): {_FIX}"
        )


def timed_steps(coro: Coroutine[Any, Any, T], info: PhaseInfo, health: LoopHealth) -> Awaitable[T]:
    """Await ``coro`` while timing each of its steps against ``health``."""
    return _Steps(coro, _PhaseSteps(info, health))


class _BlockingLog:
    """What :func:`monitor_blocking` returns: a decorator and a context manager."""

    def __init__(self, threshold_ms: float, name: str | None) -> None:
        self.threshold_ms = threshold_ms
        self.name = name

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        label = self.name or str(getattr(fn, "__qualname__", repr(fn)))

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            def on_step(held_ms: float, finished: bool) -> None:
                _log_held(label, held_ms, self.threshold_ms)

            result: T = await _Steps(fn(*args, **kwargs), on_step)
            return result

        return wrapper

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        _log_held(
            self.name or "block", (time.perf_counter() - self._started) * 1000, self.threshold_ms
        )


def _log_held(label: str, held_ms: float, threshold_ms: float) -> None:
    if held_ms >= threshold_ms:
        logger.warning(
            "%s held the event loop for %.0f ms (threshold %.0f ms)",
            label,
            held_ms,
            threshold_ms,
            extra={"loop_held_ms": held_ms},
        )


def monitor_blocking(threshold_ms: float = 50.0, *, name: str | None = None) -> _BlockingLog:
    """Log when your code holds the event loop longer than ``threshold_ms``.

    As a decorator on an ``async def``, every step between two ``await`` points is timed,
    so only time spent *on* the loop counts (awaiting a slow server does not)::

        @monitor_blocking(threshold_ms=20)
        async def handler(): ...

    As a context manager around synchronous code on the loop (a parser, a sync client
    call you suspect)::

        with monitor_blocking(20, name="parse report"):
            parse(blob)
    """
    return _BlockingLog(threshold_ms, name)


class LoopMonitor:
    """Samples an event loop's lag: a ``sleep(interval)`` that wakes up late means the
    loop was busy for the difference.

    Lag over ``threshold_ms`` is logged once per stall, naming the job phase that held
    the loop when the step timer caught it, and every listener (the runner) hears each
    sample, so executions record the worst lag seen while they ran. At the default 50 ms
    interval the monitor wakes 20 times a second (see the benchmarks for its cost).
    """

    def __init__(self, *, interval: float = 0.05, threshold_ms: float = 100.0) -> None:
        if interval <= 0 or threshold_ms <= 0:
            raise ConfigurationError("LoopMonitor interval and threshold_ms must be positive")
        self.interval = interval
        self.threshold_ms = threshold_ms
        self.samples = 0
        self.max_lag_ms = 0.0
        self._listeners: list[Callable[[float], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._idle: Callable[[], bool] | None = None

    def add_listener(self, listener: Callable[[float], None]) -> None:
        """Call ``listener(lag_ms)`` after every sample."""
        self._listeners.append(listener)

    @property
    def running(self) -> bool:
        """Whether the sampling task is alive."""
        return self._task is not None and not self._task.done()

    def start(self, *, stop_when: Callable[[], bool] | None = None) -> None:
        """Start sampling the running loop (no-op if running); stop once ``stop_when()``."""
        if self.running:
            return
        self._idle = stop_when
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="jobrunner-loop-monitor"
        )

    async def stop(self) -> None:
        """Stop sampling."""
        task, self._task = self._task, None
        await cancel_task(task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._idle is None or not self._idle():
            before = loop.time()
            await asyncio.sleep(self.interval)
            self._sample(loop, (loop.time() - before - self.interval) * 1000)

    def _sample(self, loop: asyncio.AbstractEventLoop, lag_ms: float) -> None:
        lag_ms = max(lag_ms, 0.0)
        self.samples += 1
        self.max_lag_ms = max(self.max_lag_ms, lag_ms)
        for listener in self._listeners:
            listener(lag_ms)
        if lag_ms < self.threshold_ms:
            return
        blocker = _last_blocker.pop(loop, None)
        if (
            blocker is not None
            and time.perf_counter() - blocker.ended < lag_ms / 1000 + self.interval
        ):
            return  # the step timer already named the phase that did it
        logger.warning(
            "event loop lagged %.0f ms; no jobrunner phase step was caught holding it, so "
            "other code on this loop blocked it (%s)",
            lag_ms,
            _FIX,
            extra={"loop_lag_ms": lag_ms},
        )


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task of ours and wait until it has stopped."""
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def phase_context(state: AttemptState, phase: str) -> Iterator[PhaseInfo]:
    """Mark ``phase`` as current for ``state`` (timing, contextvar, slow-phase log)."""
    state.enter(phase)  # type: ignore[arg-type]
    info = PhaseInfo(str(state.execution_id), state.job_cls.name, phase, state)
    token = current_phase.set(info)
    try:
        yield info
    finally:
        state.leave()
        current_phase.reset(token)
        took = state.timings.get(f"{phase}_ms")
        slow = state.slow_phase_ms
        if took is not None and slow is not None and took >= slow:
            logging.getLogger("jobrunner").warning(
                "%s of job %s (execution %s) took %.0f ms",
                phase,
                info.job,
                info.execution_id,
                took,
                extra={
                    "execution_id": info.execution_id,
                    "job": info.job,
                    "attempt": state.number,
                    "phase": phase,
                    "duration_ms": took,
                },
            )
