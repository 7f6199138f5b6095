"""The worker: run executions as they come due, as many at once as there are slots.

One loop per worker, the same for both runners (the pacing decisions are plain code in
:class:`Pacer`; :class:`SyncWorker` and :class:`AsyncWorker` only wait and start):

1. reap expired leases every ``reap_interval`` (one reaper per database at a time);
2. claim as many due executions as there are free slots (never more: nothing is
   ``running`` that waits for a slot), highest priority first, and start each at once;
3. wait for a slot to free, a ``NOTIFY`` from a committed submit (PostgreSQL), a
   submit from this process, or the poll interval (jittered);
4. on stop (``stop_work()``, SIGTERM/SIGINT): claim nothing new, let what runs finish
   within the grace period. What still runs after it: async executions are cancelled
   (they end ``retrying`` without their attempt counting); sync threads cannot be
   stopped, so they are asked to (``self.cancelled()``) and left to the reaper if the
   process exits under them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import _queries as q
from ._exceptions import ConfigurationError, DatabaseUnavailable, JobRunnerError
from ._flow import Abandoned, extra
from ._threads import DaemonPool

if TYPE_CHECKING:
    from ._async_runner import AsyncJobRunner
    from ._attempt import AttemptState
    from ._records import Execution
    from ._sync_runner import JobRunner

logger = logging.getLogger("jobrunner.worker")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkOptions:
    """How a worker loop runs (see :meth:`JobRunner.work`)."""

    concurrency: int = 8
    queues: Sequence[str] | None = None
    until_idle: bool = False
    poll_interval: float = 1.0
    grace_period: float = 30.0
    #: None: never reap (run_due does not).
    reap_interval: float | None = 10.0
    handle_signals: bool = False
    #: Stop after starting this many executions (run_due's limit).
    max_executions: int | None = None
    #: Wake on PostgreSQL NOTIFY.
    listen: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise ConfigurationError(f"concurrency must be an int, got {self.concurrency!r}")
        if self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {self.concurrency}")
        for name in ("poll_interval", "grace_period"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must be >= 0 seconds")
        if self.poll_interval == 0:
            raise ConfigurationError("poll_interval must be > 0 seconds")
        if self.reap_interval is not None and self.reap_interval <= 0:
            raise ConfigurationError("reap_interval must be > 0 seconds")
        if self.max_executions is not None and self.max_executions < 1:
            raise ConfigurationError(f"limit must be at least 1, got {self.max_executions}")
        if isinstance(self.queues, str):
            object.__setattr__(self, "queues", (self.queues,))
        elif self.queues is not None:
            object.__setattr__(self, "queues", tuple(self.queues))
            if not self.queues:
                raise ConfigurationError("queues must name at least one queue (None: all)")

    @classmethod
    def for_run_due(
        cls, *, limit: int, concurrency: int, queues: Sequence[str] | None
    ) -> WorkOptions:
        """``run_due()``: what is due now, then return; no reaping, no listening."""
        return cls(
            concurrency=concurrency,
            queues=queues,
            until_idle=True,
            reap_interval=None,
            max_executions=limit,
            listen=False,
        )


class Pacer:
    """The worker's decisions, without I/O: how many to claim, when to reap, when done."""

    def __init__(self, options: WorkOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self._clock = clock
        self.started = 0
        self._next_reap = clock()
        self._outage_since: float | None = None
        self._failures = 0
        self._next_outage_log = 0.0

    def free(self, running: int) -> int:
        """How many executions to claim now: free slots, within the budget."""
        free = self.options.concurrency - running
        if self.options.max_executions is not None:
            free = min(free, self.options.max_executions - self.started)
        return max(0, free)

    def claimed(self, count: int) -> None:
        """``count`` executions were claimed and started."""
        self.started += count

    def done(self, running: int, claimed: int) -> bool:
        """Whether the loop ends now (until_idle, or the budget is spent)."""
        if running:
            return False
        budget = self.options.max_executions
        if budget is not None and self.started >= budget:
            return True
        return self.options.until_idle and claimed == 0

    def reap_due(self) -> bool:
        """Whether it is time to reap (and if so, when the next reap is)."""
        interval = self.options.reap_interval
        if interval is None or self._clock() < self._next_reap:
            return False
        self._next_reap = self._clock() + interval
        return True

    def failed(self) -> tuple[bool, float, float]:
        """A claim failed (the database is away): whether to log it, how long to wait, and
        how long the failures have lasted.

        Logged at the first failure of an outage, then once a minute; waits back off from
        ``poll_interval`` to :data:`MAX_OUTAGE_WAIT`, jittered so that many workers do not
        all reconnect at the same moment when the database comes back.
        """
        now = self._clock()
        if self._outage_since is None:
            self._outage_since = now
        self._failures += 1
        log = now >= self._next_outage_log
        if log:
            self._next_outage_log = now + OUTAGE_LOG_EVERY
        base = max(self.options.poll_interval, 0.01)
        seconds = min(base * 2 ** (self._failures - 1), max(base, MAX_OUTAGE_WAIT))
        return log, seconds * random.uniform(0.9, 1.1), now - self._outage_since

    def recovered(self) -> float | None:
        """A claim succeeded: how long the outage it ends lasted (None if there was none)."""
        if self._outage_since is None:
            return None
        lasted = self._clock() - self._outage_since
        self._outage_since, self._failures, self._next_outage_log = None, 0, 0.0
        return lasted

    def wait(self) -> float:
        """How long to sleep before polling again: jittered, and never past a reap."""
        seconds = self.options.poll_interval * random.uniform(0.9, 1.1)
        if self.options.reap_interval is not None:
            seconds = min(seconds, max(0.0, self._next_reap - self._clock()))
        return seconds


#: The longest a worker waits between tries while its database is unreachable.
MAX_OUTAGE_WAIT = 5.0
#: While the database stays unreachable, a worker says so this often (seconds).
OUTAGE_LOG_EVERY = 60.0


def _log_error(what: str, exc: BaseException) -> None:
    logger.warning("worker: %s failed (%s: %s); will try again", what, type(exc).__name__, exc)


def _database_failed(pacer: Pacer, what: str, exc: BaseException) -> float:
    """Log a failed claim (once per outage and minute); how long to wait."""
    log, seconds, lasted = pacer.failed()
    if log:
        since = f" for {lasted:.0f} s" if lasted >= 1 else ""
        state = (
            f"the database has been unreachable{since}"
            if isinstance(exc, DatabaseUnavailable)
            else f"failing{since}"
        )
        logger.warning(
            "worker: %s failed (%s: %s); %s, trying again with backoff (up to %.0f s "
            "between tries)",
            what,
            type(exc).__name__,
            exc,
            state,
            MAX_OUTAGE_WAIT,
        )
    return seconds


def _database_back(pacer: Pacer) -> None:
    lasted = pacer.recovered()
    if lasted is not None:
        logger.warning("worker: the database is reachable again after %.1f s", lasted)


@contextlib.contextmanager
def _signals(enabled: bool, stop: Callable[[bool], None]) -> Iterator[None]:
    """SIGTERM/SIGINT stop the worker gracefully; a second one stops it at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        seen.append(signum)
        logger.info(
            "worker: %s received; %s",
            signal.Signals(signum).name,
            "stopping now" if len(seen) > 1 else "finishing what runs, claiming nothing new",
        )
        stop(len(seen) > 1)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Loop:
    """What both worker loops keep: their settings, pacing, and how executions ended."""

    def __init__(self, options: WorkOptions) -> None:
        self.options = options
        self.pacer = Pacer(options)
        self._away = options.poll_interval  # the wait after a failed claim (backed off)
        self._hard = False
        self._results: list[Execution] = []
        self._fatal: BaseException | None = None

    def stop(self, now: bool = False) -> None:
        """Claim nothing new; finish what runs (``now``: without the grace period)."""
        raise NotImplementedError

    def _failed(self, state: AttemptState, exc: BaseException) -> None:
        """An execution's drive raised: logged, or (KeyboardInterrupt, SystemExit) the
        worker stops too and raises it when it has drained."""
        if isinstance(exc, DatabaseUnavailable):
            logger.warning(
                "worker: execution %s could not write to the database (%s); it stays running "
                "until its lease expires, then a reaper (any worker) moves it on as its retry "
                "policy says",
                state.execution_id,
                exc,
                extra=extra(state),
            )
            return
        if isinstance(exc, Exception):
            logger.exception(
                "worker: execution %s stopped with an error",
                state.execution_id,
                exc_info=exc,
                extra=extra(state),
            )
            return
        self._fatal = self._fatal or exc
        self.stop(now=True)

    def _outcome(self) -> list[Execution]:
        if self._fatal is not None:
            raise self._fatal
        return self._results


# -- the sync worker ----------------------------------------------------------------------


class SyncWorker(_Loop):
    """The worker loop of a :class:`JobRunner`: slots are daemon threads."""

    def __init__(self, runner: JobRunner, options: WorkOptions) -> None:
        super().__init__(options)
        self.runner = runner
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._running = 0
        self._slots = DaemonPool(options.concurrency, name="jobrunner-slot")

    def stop(self, now: bool = False) -> None:
        """Claim nothing new; finish what runs (``now``: without the grace period)."""
        self._hard = self._hard or now
        self._stopping.set()
        self._wake.set()

    def run(self) -> list[Execution]:
        """Run the loop until stopped or done; the executions it ran, as they ended."""
        runner, options = self.runner, self.options
        runner._wakers.add(self._wake.set)
        listener = (
            _SyncListener(runner, self._wake.set, options.queues) if self._listens() else None
        )
        logger.info(
            "worker %s: %d slots, queues %s",
            runner.worker_id,
            options.concurrency,
            ", ".join(options.queues) if options.queues else "all",
        )
        try:
            with _signals(options.handle_signals, self.stop):
                try:
                    self._loop()
                except BaseException:
                    self.stop(now=True)  # e.g. KeyboardInterrupt without handle_signals
                    raise
                finally:
                    self._drain()
        finally:
            runner._wakers.discard(self._wake.set)
            if listener is not None:
                listener.close()
            self._slots.shutdown(wait=False)
        return self._outcome()

    def _listens(self) -> bool:
        return self.options.listen and self.runner.engine.dialect.name == "postgresql"

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            if self.pacer.reap_due():
                try:
                    self.runner.reap()
                except JobRunnerError as exc:
                    _log_error("reaping", exc)
            claimed = self._claim()
            if claimed is None:  # the database is away: try again after a backoff
                self._wake.wait(self._away)
                continue
            with self._lock:
                running = self._running
            if self.pacer.done(running, claimed):
                return
            self._wake.wait(self.pacer.wait())

    def _claim(self) -> int | None:
        with self._lock:
            free = self.pacer.free(self._running)
        if not free:
            return 0
        try:
            states = self.runner._claim_batch(free, self.options.queues)
        except JobRunnerError as exc:
            self._away = _database_failed(self.pacer, "claiming", exc)
            return None
        _database_back(self.pacer)
        for state in states:
            self._start(state)
        self.pacer.claimed(len(states))
        return len(states)

    def _start(self, state: AttemptState) -> None:
        with self._lock:
            self._running += 1
        self._slots.submit(self._run_one, state)

    def _run_one(self, state: AttemptState) -> None:
        try:
            self._results.append(self.runner._drive(state, worker=True))
        except BaseException as exc:
            self._failed(state, exc)
        finally:
            with self._lock:
                self._running -= 1
            self._wake.set()

    def _drain(self) -> None:
        deadline = time.monotonic() + (0 if self._hard else self.options.grace_period)
        while True:
            with self._lock:
                if not self._running:
                    return
            left = deadline - time.monotonic()
            if left <= 0 or self._hard:
                break
            self._wake.clear()
            self._wake.wait(min(left, 0.5))
        for running in self.runner._inflight.all():
            running.cancel_event.set()
        settle = time.monotonic() + _SETTLE  # cooperative code stops when asked: let it
        while self._running and time.monotonic() < settle:
            self._wake.clear()
            self._wake.wait(0.1)
        if not self._running:
            return
        logger.warning(
            "worker %s: %d execution(s) still running in threads after the grace period; "
            "they were asked to stop (self.cancelled()), and if this process exits first "
            "their leases expire and the reaper retries them",
            self.runner.worker_id,
            self._running,
        )


class _SyncListener:
    """LISTEN on a dedicated connection in a daemon thread; each NOTIFY wakes the loop."""

    def __init__(
        self, runner: JobRunner, wake: Callable[[], None], queues: Sequence[str] | None
    ) -> None:
        self._wake = wake
        self._queues = set(queues) if queues else None
        self._closed = threading.Event()
        engine = runner._autocommit_engine or runner.engine
        self._conn = engine.connect()
        self._conn.exec_driver_sql(f"LISTEN {q.NOTIFY_CHANNEL}")
        if self._conn.in_transaction():
            self._conn.commit()
        self._driver: Any = self._conn.connection.driver_connection
        self._thread = threading.Thread(target=self._listen, name="jobrunner-listen", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            while not self._closed.is_set():
                for notice in self._driver.notifies(timeout=0.5):
                    if self._queues is None or notice.payload in self._queues:
                        self._wake()
        except Exception as exc:  # the connection broke: polling still works
            if not self._closed.is_set():
                _log_error("listening for NOTIFY (polling goes on)", exc)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._conn.invalidate()  # it still LISTENs: never give it back to the pool
            self._conn.close()


# -- the async worker ---------------------------------------------------------------------


class AsyncWorker(_Loop):
    """The worker loop of an :class:`AsyncJobRunner`: slots are tasks on its loop."""

    def __init__(self, runner: AsyncJobRunner, options: WorkOptions) -> None:
        super().__init__(options)
        self.runner = runner
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    def stop(self, now: bool = False) -> None:
        """Claim nothing new; finish what runs (thread-safe)."""
        self._hard = self._hard or now
        self._stopping = True
        self.wake()

    def wake(self) -> None:
        """Wake the loop (thread-safe)."""
        self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> list[Execution]:
        """Run the loop until stopped or done; the executions it ran, as they ended."""
        runner, options = self.runner, self.options
        runner._phases.abandon.clear()
        runner._wakers.add(self.wake)
        listener = (
            await _AsyncListener.start(runner, self.wake, options.queues)
            if (options.listen and runner.engine.dialect.name == "postgresql")
            else None
        )
        logger.info(
            "worker %s: %d slots, queues %s",
            runner.worker_id,
            options.concurrency,
            ", ".join(options.queues) if options.queues else "all",
        )
        try:
            with _signals(options.handle_signals, self.stop):
                try:
                    await self._run_loop()
                except BaseException:  # the caller cancelled work(): stop what runs too
                    self.stop(now=True)
                    await asyncio.shield(self._drain())
                    raise
                await self._drain()
        finally:
            runner._wakers.discard(self.wake)
            if listener is not None:
                await listener.close()
        return self._outcome()

    async def _run_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if self.pacer.reap_due():
                try:
                    await self.runner.reap()
                except JobRunnerError as exc:
                    _log_error("reaping", exc)
            claimed = await self._claim()
            if claimed is None:  # the database is away: try again after a backoff
                await self._sleep(self._away)
                continue
            if self.pacer.done(len(self._tasks), claimed):
                return
            await self._sleep(self.pacer.wait())

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _claim(self) -> int | None:
        free = self.pacer.free(len(self._tasks))
        if not free:
            return 0
        try:
            states = await self.runner._claim_batch(free, self.options.queues)
        except JobRunnerError as exc:
            self._away = _database_failed(self.pacer, "claiming", exc)
            return None
        _database_back(self.pacer)
        for state in states:
            task = asyncio.ensure_future(self._run_one(state))
            self._tasks.add(task)
            task.add_done_callback(self._finished)
        self.pacer.claimed(len(states))
        return len(states)

    async def _run_one(self, state: AttemptState) -> None:
        try:
            self._results.append(await self.runner._drive(state, worker=True))
        except (asyncio.CancelledError, Abandoned):
            pass  # shutdown after the grace period: written, or left to the reaper
        except BaseException as exc:
            self._failed(state, exc)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _drain(self) -> None:
        """Let what runs finish within the grace period (at once on a hard stop)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.grace_period
        while self._tasks and not self._hard and loop.time() < deadline:
            self._wake.clear()
            woken = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait(
                {*self._tasks, woken},
                timeout=deadline - loop.time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            woken.cancel()
        if self._tasks:
            await self._stop_the_rest()

    async def _stop_the_rest(self) -> None:
        """Past the grace period: cancel async work, then let go of stuck threads."""
        logger.warning(
            "worker %s: %d execution(s) still running after the grace period; stopping "
            "them (async ones end retrying, their attempt not counted; sync threads "
            "cannot be stopped and are left to the reaper)",
            self.runner.worker_id,
            len(self._tasks),
        )
        for running in self.runner._inflight.all():
            running.cancel_event.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(set(self._tasks), timeout=_SETTLE)
        if self._tasks:  # waiting for threads that will not return in time
            self.runner._phases.abandon.set()
            await asyncio.wait(set(self._tasks), timeout=_SETTLE)


#: How long stopped executions get to write how they ended, after the grace period.
_SETTLE = 2.0


class _AsyncListener:
    """LISTEN on a dedicated asyncpg connection; each NOTIFY wakes the loop."""

    def __init__(self, conn: Any, driver: Any, wake: Callable[[], None], queues: Any) -> None:
        self._conn = conn
        self._driver = driver
        self._wake = wake
        self._queues = set(queues) if queues else None

    @classmethod
    async def start(
        cls, runner: AsyncJobRunner, wake: Callable[[], None], queues: Sequence[str] | None
    ) -> _AsyncListener | None:
        engine = runner._autocommit_engine or runner.engine
        try:
            conn = await engine.connect()
            raw = await conn.get_raw_connection()
            listener = cls(conn, raw.driver_connection, wake, queues)
            await listener._driver.add_listener(q.NOTIFY_CHANNEL, listener._on_notify)
        except Exception as exc:
            _log_error("listening for NOTIFY (polling goes on)", exc)
            return None
        return listener

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if self._queues is None or payload in self._queues:
            self._wake()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._driver.remove_listener(q.NOTIFY_CHANNEL, self._on_notify)
        with contextlib.suppress(Exception):
            await self._conn.invalidate()  # it still LISTENs: never give it back to the pool
            await self._conn.close()
