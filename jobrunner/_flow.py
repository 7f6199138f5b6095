"""How one execution is run, attempt after attempt, written once for both runners.

:func:`drive` is a generator that does no I/O: it *yields* requests (claim, load,
execute, checkpoint, record, end the attempt, sleep, fetch the row) and is sent their
results, or thrown their errors. ``JobRunner`` performs the requests with sync calls,
``AsyncJobRunner`` with awaits; neither repeats a decision (the h11 / wsproto pattern).

The promises it keeps, in the order they are checked:

* a finished ``execute`` is checkpointed before a cancel or a lost lease is honoured,
  and a late result (a sync execute that outlived its timeout, or the caller cancelled
  while its thread ran) is checkpointed too: execute never runs again for it;
* a requested cancel wins over every other ending (and the database applies it again
  if it arrives after this decision);
* a lost lease writes nothing;
* a process stopped from outside (``KeyboardInterrupt``, ``CancelledError`` of the
  caller, worker shutdown) leaves the execution ``retrying`` without counting the
  attempt, then re-raises.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator
from typing import Any

from ._attempt import AttemptState
from ._errors_db import WrongEventLoop
from ._exceptions import ExecutionCancelled, JobTimedOut, LeaseLost
from ._inflight import Running
from ._lifecycle import Failure, Outcome, after_failure, attempt_status, outcome_status
from ._records import Execution
from ._schema import ExecutionStatus

logger = logging.getLogger("jobrunner")

RETRYING = ExecutionStatus.RETRYING


# -- requests: what the flow asks its runner to do ----------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """Claim the execution for its next attempt; answer the claimed row or None.

    Only an inline retry claims inside the flow, after sleeping the backoff itself, so
    it may claim ``early_s`` before the database's clock says the retry is due.
    """

    early_s: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Load:
    """Run the load phase; answer what execute receives."""


@dataclasses.dataclass(frozen=True, slots=True)
class Execute:
    """Run the execute phase on ``loaded``; answer an :class:`Executed`."""

    loaded: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """Store ``result`` (JSON); answer ``cancel_requested`` (LeaseLost if refused).

    ``finish``: the attempt has nothing left to run (no record phase, execute ended
    cleanly), so the same write may end it succeeded, unless a cancel is requested;
    the answer is then the succeeded execution.
    """

    result: Any
    finish: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """Run the record phase and finish; answer the succeeded execution (``finished``,
    when the checkpoint ended the attempt already)."""

    finished: Execution | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class End:
    """Write how the attempt ended; answer the execution, or None if the lease is lost."""

    outcome: Outcome
    status: ExecutionStatus
    wait: float
    attempt_status: ExecutionStatus


@dataclasses.dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` before the next attempt (a short inline retry)."""

    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch:
    """Read the execution as it is now; answer it."""


Request = Claim | Load | Execute | Checkpoint | Record | End | Sleep | Fetch

_NOTHING: Any = object()


class Abandoned(BaseException):
    """A worker shutting down for good stopped waiting for an attempt's thread.

    Nothing is written (the thread may still be running execute): the lease expires
    when the process is gone, and the reaper takes the execution back.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class Executed:
    """What execute produced: its JSON result (if it returned), and an error to raise
    after checkpointing it (its timeout passed, or the caller cancelled meanwhile)."""

    result: Any = _NOTHING
    error: BaseException | None = None

    @property
    def returned(self) -> bool:
        """Whether execute returned a result (that must be checkpointed)."""
        return self.result is not _NOTHING


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The runner settings the flow decides with."""

    inline_retry_max_wait: float
    on_retry_scheduled: Callable[[Execution], None] | None = None


Flow = Generator[Request, Any, Execution]


def drive(state: AttemptState, running: Running, settings: Settings) -> Flow:
    """Run ``state``'s execution to its end in this process; returns the execution."""
    while True:
        if state.needs_claim:
            row = yield Claim()
            if row is None:  # cancelled, or taken by another worker, while it waited
                execution: Execution = yield Fetch()
                return execution
            state.adopt_claim(row)
            running.reset()
        try:
            execution = yield from _attempt(state, running)
        except BaseException as exc:
            if isinstance(exc, WrongEventLoop | Abandoned):
                raise  # the caller's bug, or a thread left behind: nothing may be written
            state.capture(exc)
            outcome = after_failure(_failure(state, running, exc))
            ended = yield from _end(state, outcome, settings)
            if not isinstance(exc, Exception):
                raise  # stopped from outside: written down, now let it stop us
            if ended is None:  # another retry of this run follows
                continue
            return ended
        _log_success(state, execution)
        return execution


def _attempt(state: AttemptState, running: Running) -> Flow:
    running.check()  # a cancel may have come while it waited to start
    if state.resume_from == "load":
        loaded = yield Load()
        running.check()
        executed: Executed = yield Execute(loaded)
        answer: bool | Execution = False
        if executed.returned:
            last = executed.error is None and not state.job_cls.spec.runs("record")
            answer = yield Checkpoint(executed.result, finish=last)
        if isinstance(answer, Execution):  # written succeeded with its result: done
            finished: Execution = yield Record(answer)
            return finished
        if executed.error is not None:
            raise executed.error
        if answer:
            running.signal("cancel")
        running.check()
    execution: Execution = yield Record()
    return execution


def _failure(state: AttemptState, running: Running, exc: BaseException) -> Failure:
    lost = isinstance(exc, LeaseLost) or running.reason == "lost"
    return Failure(
        lease_lost=lost,
        cancelled=isinstance(exc, ExecutionCancelled) or running.reason == "cancel",
        interrupted=not isinstance(exc, Exception),
        timed_out=isinstance(exc, JobTimedOut),
        retryable=state.policy.is_retryable(exc),
        attempts_left=state.number < state.max_attempts,
    )


def _end(
    state: AttemptState, outcome: Outcome, settings: Settings
) -> Generator[Request, Any, Execution | None]:
    """Write the ending; None when an inline retry of this run follows (after a sleep)."""
    if outcome is Outcome.LEASE_LOST:
        _log_lost(state)
        fetched: Execution = yield Fetch()
        return fetched
    wait = state.policy.wait_after(state.number) if outcome is Outcome.RETRY else 0.0
    timed_out = isinstance(state.failure, JobTimedOut)
    status = attempt_status(outcome, timed_out=timed_out)
    ending = End(outcome, outcome_status(outcome), wait, status)
    execution: Execution | None = yield ending
    if execution is None:  # the lease went while the attempt was failing
        _log_lost(state)
        fetched = yield Fetch()
        return fetched
    inline = outcome is Outcome.RETRY and wait <= settings.inline_retry_max_wait
    if inline and execution.status is RETRYING:
        _log_retry(state, wait)
        state.prepare_retry()  # holds no lease now: the heartbeat leaves it alone
        yield Sleep(wait)
        return None
    if execution.status is RETRYING:
        _log_scheduled(execution)
        if settings.on_retry_scheduled is not None:
            settings.on_retry_scheduled(execution)
    else:
        _log_end(state, execution)
    return execution


# -- one log line per ending ---------------------------------------------------------------


def extra(state: AttemptState) -> dict[str, Any]:
    """The structured fields of every log line about an attempt."""
    return {
        "execution_id": str(state.execution_id),
        "job": state.job_cls.name,
        "attempt": state.number,
        "phase": state.phase,
    }


def _log_success(state: AttemptState, execution: Execution) -> None:
    logger.info(
        "execution %s of %s succeeded (attempt %d)",
        execution.id,
        execution.job,
        state.number,
        extra=extra(state),
    )


def _log_retry(state: AttemptState, wait: float) -> None:
    logger.info(
        "execution %s of %s: attempt %d failed (%s), retrying in %.2fs",
        state.execution_id,
        state.job_cls.name,
        state.number,
        state.error.type if state.error else "?",
        wait,
        extra=extra(state),
    )


def _log_scheduled(execution: Execution) -> None:
    logger.info(
        "execution %s of %s will retry at %s",
        execution.id,
        execution.job,
        execution.due_at,
        extra=execution.log_fields(),
    )


def _log_end(state: AttemptState, execution: Execution) -> None:
    logger.warning(
        "execution %s of %s ended %s in %s: %s: %s",
        execution.id,
        execution.job,
        execution.status,
        execution.phase,
        execution.error_type,
        execution.error_message,
        extra=extra(state),
    )


def _log_lost(state: AttemptState) -> None:
    logger.warning(
        "execution %s of %s: attempt %d lost its lease in %s (reaped, or taken over); "
        "it stopped without writing",
        state.execution_id,
        state.job_cls.name,
        state.number,
        state.phase,
        extra=extra(state),
    )
