"""The instrumentation seam: what tracing, metrics (or your own code) hear about executions.

An :class:`Instrument` hears about submits, reaps and event-loop lag, and opens one
:class:`AttemptObserver` per attempt, which hears about its phases, a retry it scheduled,
a lost lease and how it ended. The runners never call instruments themselves: they run
the flow of :mod:`jobrunner._flow` through :func:`observed`, which watches the requests
go by (a phase request starts a phase, its answer ends it; an ``End`` or a finished
``Record`` ends the attempt) and tells the observers. The flow stays free of I/O and of
instrumentation alike.

Without instruments nothing here runs: a runner passes its flow through untouched, so
the default costs one ``if`` per execution. ``jobrunner.contrib.otel`` and
``jobrunner.contrib.prometheus`` are instruments; they import their libraries, this
module imports neither.

Calls come from the thread (sync) or task (async) that runs the execution, in its
context: an observer that sets a context variable in ``phase_started`` (OpenTelemetry's
current span) is current for the phase's own code, including a sync ``execute`` in the
runner's thread pool (each call runs in a copy of the submitting context).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._flow import Abandoned, Checkpoint, End, Execute, Fetch, Flow, Load, Record, Request
from ._lifecycle import Outcome
from ._schema import ExecutionStatus

if TYPE_CHECKING:
    from ._attempt import AttemptState, ErrorInfo
    from ._records import Execution

logger = logging.getLogger("jobrunner.hooks")

#: What the watch does with each kind of request: a phase name starts and ends that
#: phase; a checkpoint and an end belong to an attempt too (the first request of any of
#: them opens it); a fetch mid-attempt means the lease was lost. Claim and Sleep (not
#: here) come between attempts: the watch is not called for them.
_CHECKPOINT = "checkpoint"
_END = "end"
_FETCH = "fetch"
_KINDS: dict[type[Any], str] = {
    Load: "load",
    Execute: "execute",
    Record: "record",
    Checkpoint: _CHECKPOINT,
    End: _END,
    Fetch: _FETCH,
}
#: Where the phases time themselves (``AttemptState.timings``).
_TIMING = {"load": "load_ms", "execute": "execute_ms", "record": "record_ms"}

#: The outcomes an attempt may end with (the ``outcome`` label of the metrics).
OUTCOMES = (
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "retried",
    "interrupted",
    "lease_lost",
    "abandoned",
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AttemptView:
    """What an instrument is told about an attempt when it starts."""

    execution_id: str
    job: str
    queue: str
    attempt: int
    worker: str
    #: W3C trace context stored with the execution at submit (``traceparent``...), if any.
    trace_context: dict[str, str] | None
    #: When the execution became due (None for an inline run: it never waited).
    due_at: datetime | None
    #: When this attempt was claimed (this process's clock).
    claimed_at: datetime
    #: Resumed at record from a checkpoint (execute is not run again).
    resumed: bool
    #: The phases the job defines itself (its own code runs there); in the others only
    #: jobrunner's writes happen.
    own_phases: frozenset[str] = frozenset()


class AttemptObserver:
    """Hears one attempt: override what you need; every method is a no-op here."""

    def phase_started(self, phase: str) -> None:
        """``load``, ``execute`` or ``record`` starts (in the context its code runs in)."""

    def phase_ended(self, phase: str, seconds: float, error: BaseException | None) -> None:
        """The phase ended after ``seconds``; ``error`` is what it raised, if anything."""

    def retry_scheduled(self, wait: float, due_at: datetime | None) -> None:
        """The attempt failed and the execution will be tried again after ``wait`` s."""

    def lease_lost(self) -> None:
        """Another worker took the execution over (or it was reaped): nothing was written."""

    def attempt_ended(
        self, outcome: str, execution: Execution | None, error: ErrorInfo | None
    ) -> None:
        """The attempt is over: ``outcome`` is one of :data:`OUTCOMES`."""


class Instrument:
    """Hears about executions: override what you need; every method is a no-op here.

    Pass instances to a runner (``JobRunner(url, instruments=[...])``) or install them
    for every runner made afterwards in this process with :func:`install`. A method
    that raises is logged and otherwise ignored: instruments never fail a job.
    """

    def submitted(self, row: dict[str, Any], *, inline: bool) -> None:
        """A new execution is about to be stored (``row`` may be given a
        ``trace_context``). ``inline``: :meth:`JobRunner.run` runs it at once."""

    def attempt_started(self, attempt: AttemptView) -> AttemptObserver | None:
        """An attempt starts (just claimed): return an observer for it, or None."""
        return None

    def reaped(self, executions: Sequence[Execution]) -> None:
        """The reaper recovered these executions (their leases had expired)."""

    def loop_lag(self, lag_ms: float) -> None:
        """One sample of the event loop's lag (AsyncJobRunner's loop monitor)."""


_installed: list[Instrument] = []


def install(instrument: Instrument) -> None:
    """Add ``instrument`` to every runner created after this call, in this process."""
    if instrument not in _installed:
        _installed.append(instrument)


def uninstall(instrument: Instrument) -> None:
    """Undo :func:`install` (runners created meanwhile keep it)."""
    if instrument in _installed:
        _installed.remove(instrument)


def resolve(instruments: Iterable[Instrument] | None) -> tuple[Instrument, ...]:
    """A runner's instruments: the ones it was given, else the installed ones, plus
    OpenTelemetry when the application configured a tracer provider (never imported
    here: only looked up if the application imported it already)."""
    if instruments is not None:
        return tuple(instruments)
    chosen = list(_installed)
    if "opentelemetry.trace" in sys.modules and not any(
        getattr(i, "traces", False) for i in chosen
    ):
        from .contrib import otel

        if otel.provider_configured():
            chosen.append(otel.OpenTelemetry())
    return tuple(chosen)


def _failed(where: str, instrument: object, exc: Exception) -> None:
    logger.warning(
        "instrument %s failed in %s (%s: %s); the execution goes on",
        type(instrument).__name__,
        where,
        type(exc).__name__,
        exc,
        exc_info=logger.isEnabledFor(logging.DEBUG),
    )


def submitted(instruments: tuple[Instrument, ...], row: dict[str, Any], *, inline: bool) -> None:
    """Tell each instrument about a new execution row."""
    for instrument in instruments:
        try:
            instrument.submitted(row, inline=inline)
        except Exception as exc:
            _failed("submitted", instrument, exc)


def reaped(instruments: tuple[Instrument, ...], executions: Sequence[Execution]) -> None:
    """Tell each instrument what the reaper recovered."""
    if not executions:
        return
    for instrument in instruments:
        try:
            instrument.reaped(executions)
        except Exception as exc:
            _failed("reaped", instrument, exc)


class Watch:
    """Turns the requests of one execution's flow into observer calls.

    Per request it does a dictionary lookup and, inside an attempt, calls the observers
    directly: it runs for every request of every execution, so it is kept to what the
    observers need (measured by callgrind, see docs/benchmarks.md "observability").
    """

    __slots__ = ("_instruments", "_observers", "_reversed", "_started", "_state")

    def __init__(self, instruments: tuple[Instrument, ...], state: AttemptState) -> None:
        self._instruments = instruments
        self._state = state
        # The open attempt's observers (None between attempts), and the same in reverse:
        # observers that attached a context in phase_started detach it in phase_ended,
        # so the last one opened is the first one closed.
        self._observers: list[AttemptObserver] | None = None
        self._reversed: list[AttemptObserver] = []
        self._started = 0.0

    def before(self, request: Request, kind: str) -> None:
        """A request of ``kind`` (see ``_KINDS``) is about to be performed."""
        if self._observers is None:
            if kind is _FETCH:  # reading the row back between attempts
                return
            self._open()
        if kind is _FETCH:
            # Mid-attempt, the flow reads the row back only after losing its lease.
            self._lost()
        elif kind is not _CHECKPOINT and kind is not _END:
            self._started = time.perf_counter()
            for observer in self._observers or ():
                try:
                    observer.phase_started(kind)
                except Exception as exc:
                    _failed("phase_started", observer, exc)

    def after(self, request: Request, kind: str, answer: Any, error: BaseException | None) -> None:
        """A phase or an end (``kind``) was performed: ``answer`` is its result, ``error``
        what it raised."""
        if self._observers is None:
            return
        if kind is _END:
            if error is None and isinstance(request, End):
                self._ended(request, answer)
            return
        took = self._state.timings.get(_TIMING[kind])
        seconds = took / 1000 if took is not None else time.perf_counter() - self._started
        for observer in self._reversed:
            try:
                observer.phase_ended(kind, seconds, error)
            except Exception as exc:
                _failed("phase_ended", observer, exc)
        if kind == "record" and error is None:
            self._end("succeeded", answer)

    def done(self, execution: Execution) -> None:
        """The flow returned (every attempt already ended)."""
        if self._observers is not None:
            self._end(execution.status.value, execution)

    def close(self, exc: BaseException) -> None:
        """The flow raised out of the runner: end what is open."""
        if self._observers is not None:
            self._end("abandoned" if isinstance(exc, Abandoned) else "interrupted", None)

    def _open(self) -> None:
        state = self._state
        view = AttemptView(
            execution_id=str(state.execution_id),
            job=state.job_cls.name,
            queue=state.queue,
            attempt=state.number,
            worker=state.lease.worker,
            trace_context=state.trace_context,
            due_at=state.due_at,
            claimed_at=state.started_at,
            resumed=state.resume_from == "record",
            own_phases=state.job_cls.spec.overridden,
        )
        observers: list[AttemptObserver] = []
        for instrument in self._instruments:
            try:
                observer = instrument.attempt_started(view)
            except Exception as exc:
                _failed("attempt_started", instrument, exc)
                continue
            if observer is not None:
                observers.append(observer)
        self._observers = observers
        self._reversed = observers[::-1]

    def _ended(self, end: End, execution: Execution | None) -> None:
        if execution is None:
            self._lost()
            return
        outcome = _outcome(end, execution)
        if outcome == "retried":
            for observer in self._observers or ():
                try:
                    observer.retry_scheduled(end.wait, execution.due_at)
                except Exception as exc:
                    _failed("retry_scheduled", observer, exc)
        self._end(outcome, execution)

    def _lost(self) -> None:
        for observer in self._observers or ():
            try:
                observer.lease_lost()
            except Exception as exc:
                _failed("lease_lost", observer, exc)
        self._end("lease_lost", None)

    def _end(self, outcome: str, execution: Execution | None) -> None:
        error = self._state.error
        for observer in self._reversed:
            try:
                observer.attempt_ended(outcome, execution, error)
            except Exception as exc:
                _failed("attempt_ended", observer, exc)
        self._observers = None
        self._reversed = []


def _outcome(end: End, execution: Execution) -> str:
    """How an attempt ended, by what the database wrote (a cancel may have won)."""
    if end.outcome is Outcome.INTERRUPTED:
        return "interrupted"
    if execution.status is ExecutionStatus.RETRYING:
        return "retried"
    return execution.status.value


def observed(flow: Flow, watch: Watch) -> Flow:
    """``flow``, with ``watch`` told about every request, answer and error.

    The watch is called only where it may have something to do: before any request of
    an attempt, after a phase or an end (a checkpoint's answer, a fetch's, tell it
    nothing).
    """
    kinds = _KINDS
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = flow.throw(error) if error is not None else flow.send(answer)
        except StopIteration as stop:
            execution: Execution = stop.value
            watch.done(execution)
            return execution
        except BaseException as exc:
            watch.close(exc)
            raise
        kind = kinds.get(type(request))
        if kind is not None:
            watch.before(request, kind)
        try:
            answer, error = (yield request), None
        except BaseException as exc:
            answer, error = None, exc
        if kind is not None and kind is not _CHECKPOINT and kind is not _FETCH:
            watch.after(request, kind, answer, error)
