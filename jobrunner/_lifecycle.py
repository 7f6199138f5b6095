"""The execution lifecycle: one table of every status change, and the decisions around it.

Nothing here does I/O. :mod:`jobrunner._queries` takes the ``WHERE`` clause of every
status write from :data:`TRANSITIONS` (through :func:`sources` and :func:`target`), the
runners ask :func:`after_failure` what a failed attempt becomes, and the statuses page of
the docs is checked against :func:`markdown_table`. Cancel and retry meet here and
nowhere else.

Words used in the guards:

* *db_now* is the database's clock. Leases and due times are computed and compared by
  the database, so workers whose clocks disagree never reap or start each other early.
* An attempt *holds* an execution while the row is ``running`` and its ``lease_token``
  (the fencing token, bumped by every claim and every reap) is the one its claim
  returned. Every write an attempt makes checks that, so a worker that lost its lease
  (paused, partitioned, reaped) can never write again.
* The *lease* is ``lease_expires_at`` on the row: set by the claim to db_now plus the
  claiming worker's own lease length, extended by its heartbeats.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from ._schema import ExecutionStatus

PENDING = ExecutionStatus.PENDING
RUNNING = ExecutionStatus.RUNNING
RETRYING = ExecutionStatus.RETRYING
SUCCEEDED = ExecutionStatus.SUCCEEDED
FAILED = ExecutionStatus.FAILED
TIMED_OUT = ExecutionStatus.TIMED_OUT
CANCELLED = ExecutionStatus.CANCELLED
ABANDONED = ExecutionStatus.ABANDONED


class Event(enum.StrEnum):
    """Something that happens to an execution."""

    SUBMIT = "submit"
    RUN_INLINE = "run_inline"
    CLAIM = "claim"
    PHASE_STARTED = "phase_started"
    HEARTBEAT = "heartbeat"
    CHECKPOINT = "checkpoint"
    FINISH = "finish"
    RETRY_SCHEDULED = "retry_scheduled"
    FAIL = "fail"
    TIME_OUT = "time_out"
    INTERRUPTED = "interrupted"
    STOPPED_CANCELLED = "stopped_cancelled"
    CANCEL = "cancel"
    CANCEL_REQUESTED = "cancel_requested"
    LEASE_EXPIRED = "lease_expired"
    REAPED = "reaped"
    RETRIED_BY_HAND = "retried_by_hand"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Transition:
    """One row of the table: from these statuses, on this event, to that status."""

    sources: tuple[ExecutionStatus, ...]
    event: Event
    target: ExecutionStatus
    guard: str
    #: The write is made by the attempt holding the lease (checked by fencing token).
    fenced: bool = False


_WAITING = (PENDING, RETRYING)
_ENDED_BADLY = (FAILED, TIMED_OUT, CANCELLED)

#: Every status change an execution can make. Order is the order of the docs' table.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        sources=(),
        event=Event.SUBMIT,
        target=PENDING,
        guard=(
            "due_at = db_now, run_at or db_now + delay; the job's idempotency key, if "
            "any, unused (or released: older than unique_for)"
        ),
    ),
    Transition(
        sources=(),
        event=Event.RUN_INLINE,
        target=RUNNING,
        guard="inline run(): the row is inserted already held, committed with load",
        fenced=True,
    ),
    Transition(
        sources=_WAITING,
        event=Event.CLAIM,
        target=RUNNING,
        guard=(
            "due_at <= db_now, not cancel requested, under the concurrency key's limit, "
            "a slot free to run it now (a worker's batch: not a broker's, dispatch is "
            "null); attempt + 1, token + 1, lease_expires_at = db_now + the claimer's lease"
        ),
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.PHASE_STARTED,
        target=RUNNING,
        guard="holds the lease; phase set and lease extended, with load's own writes",
        fenced=True,
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.HEARTBEAT,
        target=RUNNING,
        guard="holds the lease; lease_expires_at = db_now + lease; answers cancel_requested",
        fenced=True,
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.CHECKPOINT,
        target=RUNNING,
        guard="holds the lease; execute's result stored, even when a cancel is requested",
        fenced=True,
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.FINISH,
        target=SUCCEEDED,
        guard=(
            "holds the lease; record's writes commit in the same transaction (a job "
            "without record: the checkpoint's own write, unless a cancel is requested)"
        ),
        fenced=True,
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.RETRY_SCHEDULED,
        target=RETRYING,
        guard=(
            "holds the lease; a retryable error, attempts left, no cancel requested; "
            "due_at = db_now + backoff"
        ),
        fenced=True,
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.FAIL,
        target=FAILED,
        guard="holds the lease; not retryable, or no attempts left; no cancel requested",
        fenced=True,
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.TIME_OUT,
        target=TIMED_OUT,
        guard="holds the lease; a phase passed its timeout and is not retried",
        fenced=True,
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.INTERRUPTED,
        target=RETRYING,
        guard=(
            "holds the lease; the process was stopped (shutdown, KeyboardInterrupt, the "
            "caller cancelled run()); due now, and the attempt does not count"
        ),
        fenced=True,
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.STOPPED_CANCELLED,
        target=CANCELLED,
        guard=(
            "holds the lease; a cancel was requested, whatever ended the attempt (a "
            "finished execute is checkpointed first)"
        ),
        fenced=True,
    ),
    Transition(
        sources=_WAITING,
        event=Event.CANCEL,
        target=CANCELLED,
        guard="cancel() of an execution that is not running",
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.CANCEL_REQUESTED,
        target=RUNNING,
        guard=(
            "cancel() of a running execution: sets cancel_requested; its holder stops at "
            "its next step (heartbeat, phase boundary, checkpoint)"
        ),
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.LEASE_EXPIRED,
        target=RETRYING,
        guard=(
            "reap(): lease_expires_at < db_now, attempts left, no cancel requested; "
            "token + 1, due now, an abandoned attempt in the ledger"
        ),
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.REAPED,
        target=FAILED,
        guard="reap(): lease_expires_at < db_now and no attempts left",
    ),
    Transition(
        sources=(RUNNING,),
        event=Event.STOPPED_CANCELLED,
        target=CANCELLED,
        guard="reap(): lease_expires_at < db_now and a cancel was requested",
    ),
    Transition(
        sources=_ENDED_BADLY,
        event=Event.RETRIED_BY_HAND,
        target=PENDING,
        guard=(
            "retry(): a fresh budget of attempts, due now; resumes at record if "
            "execute was checkpointed"
        ),
    ),
)


def sources(event: Event) -> tuple[str, ...]:
    """The statuses ``event`` may start from (as stored), in table order."""
    found: list[str] = []
    for transition in TRANSITIONS:
        if transition.event is event:
            found.extend(s.value for s in transition.sources if s.value not in found)
    if not found:
        raise KeyError(f"{event} has no source status in the transition table")
    return tuple(found)


def target(event: Event) -> str:
    """The status ``event`` leads to (one per event, except where reap decides)."""
    targets = {t.target.value for t in TRANSITIONS if t.event is event}
    if len(targets) != 1:
        raise KeyError(f"{event} leads to {sorted(targets)}; pick the transition explicitly")
    return targets.pop()


#: Statuses only :meth:`retry` changes (and prune deletes).
TERMINAL: frozenset[ExecutionStatus] = frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED})

#: Statuses a claim may start from.
WAITING: tuple[str, ...] = sources(Event.CLAIM)

#: Statuses retry() may start from.
RETRYABLE_BY_HAND: tuple[str, ...] = sources(Event.RETRIED_BY_HAND)


# -- decisions -----------------------------------------------------------------------------


class Outcome(enum.StrEnum):
    """How a failed attempt ends, before the database adds what it alone knows."""

    RETRY = "retry"
    FAIL = "fail"
    TIME_OUT = "time_out"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    LEASE_LOST = "lease_lost"


#: The event each outcome writes (LEASE_LOST writes nothing).
OUTCOME_EVENT: dict[Outcome, Event] = {
    Outcome.RETRY: Event.RETRY_SCHEDULED,
    Outcome.FAIL: Event.FAIL,
    Outcome.TIME_OUT: Event.TIME_OUT,
    Outcome.CANCELLED: Event.STOPPED_CANCELLED,
    Outcome.INTERRUPTED: Event.INTERRUPTED,
}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    """What is known about a failed attempt when its runner decides what follows."""

    lease_lost: bool
    cancelled: bool
    interrupted: bool
    timed_out: bool
    retryable: bool
    attempts_left: bool


def after_failure(failure: Failure) -> Outcome:
    """The outcome of a failed attempt.

    A lost lease writes nothing. A requested cancel wins over everything else (and the
    database applies it again if the request arrives after this decision: the failure
    write turns ``retrying``, ``failed`` and ``timed_out`` into ``cancelled`` when
    ``cancel_requested`` is set, see :func:`jobrunner._queries.fail`).
    """
    if failure.lease_lost:
        return Outcome.LEASE_LOST
    if failure.cancelled:
        return Outcome.CANCELLED
    if failure.interrupted:
        return Outcome.INTERRUPTED
    if failure.retryable and failure.attempts_left:
        return Outcome.RETRY
    if failure.timed_out:
        return Outcome.TIME_OUT
    return Outcome.FAIL


def outcome_status(outcome: Outcome) -> ExecutionStatus:
    """The status an outcome writes when no cancel is requested meanwhile."""
    return ExecutionStatus(target_of(OUTCOME_EVENT[outcome]))


def attempt_status(outcome: Outcome, *, timed_out: bool) -> ExecutionStatus:
    """The status of the attempt's own ledger row (the execution's may differ: retrying)."""
    if outcome is Outcome.INTERRUPTED:
        return ABANDONED
    if outcome is Outcome.CANCELLED:
        return CANCELLED
    return TIMED_OUT if timed_out else FAILED


def target_of(event: Event) -> str:
    """Like :func:`target`, for the fenced transition of ``event`` (attempt-made writes)."""
    targets = {t.target.value for t in TRANSITIONS if t.event is event and t.fenced}
    if len(targets) != 1:
        raise KeyError(f"{event} has no single fenced transition")
    return targets.pop()


def markdown_table(transitions: Iterable[Transition] = TRANSITIONS) -> str:
    """The table as Markdown, for the docs' statuses page (a test keeps them equal)."""
    lines = ["| from | event | to | guard and writes |", "|---|---|---|---|"]
    for t in transitions:
        origin = ", ".join(f"`{s.value}`" for s in t.sources) or "—"
        lines.append(f"| {origin} | {t.event.value} | `{t.target.value}` | {t.guard} |")
    return "\n".join(lines)
