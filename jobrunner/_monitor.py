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
import weakref
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


#: How long a caught block is remembered for the monitor (seconds): longer than any
#: sample can span, short enough that the list stays small.
_CAUGHT_FOR = 60.0
_MAX_CAUGHT = 256

# Phase steps that held the loop past the threshold, per loop, as (ended, held_ms): the
# monitor subtracts them from the lag it measures, and blames the rest on other code.
# Weak keys and plain numbers: a closed loop (asyncio.run per fire, per test) and its
# executions' args are never kept alive by this (issue 19, defect 3).
_caught: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[tuple[float, float]]] = (
    weakref.WeakKeyDictionary()
)


def _note_caught(held_ms: float) -> None:
    """Remember that a phase step just held the running loop for ``held_ms``."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    now = time.perf_counter()
    caught = _caught.setdefault(loop, [])
    caught.append((now, held_ms))
    if len(caught) > _MAX_CAUGHT or caught[0][0] < now - _CAUGHT_FOR:
        caught[:] = [c for c in caught[-_MAX_CAUGHT:] if c[0] >= now - _CAUGHT_FOR]


def _caught_within(loop: asyncio.AbstractEventLoop, since: float) -> float:
    """Milliseconds phase steps were caught holding ``loop`` since ``since``."""
    return sum(held for ended, held in _caught.get(loop, ()) if ended >= since)


class _Steps:
    """Await ``coro`` step by step, telling ``on_step`` how long each step held the loop.

    ``on_step(held_ms, finished)`` may return an exception: it is thrown into the
    coroutine at once (or raised, if the coroutine already finished).
    """

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        on_step: Callable[[float, bool], BaseException | None],
        timing: tuple[PhaseInfo, LoopHealth] | None = None,
    ) -> None:
        self._coro = coro
        self._on_step = on_step
        self._timing = timing

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, on_step = self._coro, self._on_step
        send: Any = None
        error: BaseException | None = None
        while True:
            started = time.perf_counter()
            token = _timing.set(self._timing) if self._timing is not None else None
            try:
                yielded = coro.throw(error) if error is not None else coro.send(send)
            except StopIteration as stop:
                if (late := on_step((time.perf_counter() - started) * 1000, True)) is not None:
                    raise late from None
                return stop.value
            finally:
                if token is not None:
                    _timing.reset(token)
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
        info.state.note_lag(held_ms)  # what this execution's own code held the loop
        _note_caught(held_ms)
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
    """Await ``coro`` while timing each of its steps against ``health``.

    Tasks the phase starts (``create_task``, ``gather``, a ``TaskGroup``) are timed too,
    and blamed on the same execution: see :func:`time_child_tasks`.
    """
    return _Steps(coro, _PhaseSteps(info, health), (info, health))


#: The phase (and its thresholds) whose steps run now: tasks created here are its own.
_timing: contextvars.ContextVar[tuple[PhaseInfo, LoopHealth] | None] = contextvars.ContextVar(
    "jobrunner_step_timing", default=None
)
_factories: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def time_child_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Time the steps of tasks that phases start on ``loop``, blaming their phase.

    Installs a task factory (once per loop, in front of any factory already there) that
    wraps a new task's coroutine in the step timer when it is created inside a timed
    phase; every other task is created exactly as before.
    """
    if loop in _factories:
        return
    _factories.add(loop)
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        timing = _timing.get()
        if timing is not None and asyncio.iscoroutine(coro):
            coro = _child(coro, *timing)
        if previous is not None:
            return previous(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)


async def _child(coro: Coroutine[Any, Any, T], info: PhaseInfo, health: LoopHealth) -> T:
    result: T = await _Steps(coro, _PhaseSteps(info, health), (info, health))
    return result


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
        # The part of the stall that phase steps were caught holding is already named
        # (and charged to their executions); what is left, other code did.
        window = time.perf_counter() - lag_ms / 1000 - self.interval
        unexplained = lag_ms - _caught_within(loop, window)
        if unexplained < self.threshold_ms:
            return
        logger.warning(
            "event loop lagged %.0f ms, %.0f ms of it not in any jobrunner phase step: "
            "other code on this loop blocked it (%s)",
            lag_ms,
            unexplained,
            _FIX,
            extra={"loop_lag_ms": lag_ms, "unexplained_ms": unexplained},
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
