"""What JobRunner and AsyncJobRunner share that does no I/O: job lookup, submission
rows, the decisions after a failure, messages. The twins only sequence I/O."""

from __future__ import annotations

import builtins
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _hooks
from ._attempt import AttemptState, new_row, utcnow
from ._exceptions import (
    ConfigurationError,
    ExecutionNotFound,
    InvalidArgs,
    InvalidTransition,
    JobNotFound,
)
from ._flow import Flow, Settings, drive
from ._inflight import InFlight, Running
from ._job import PhasedJob
from ._lifecycle import RETRYABLE_BY_HAND, WAITING
from ._records import Execution
from ._registry import JobRef, Registry, default_registry, main_module_message
from ._schema import TERMINAL_STATUSES, ExecutionStatus
from ._worker import AsyncWorker, SyncWorker, WorkOptions

logger = logging.getLogger("jobrunner")

#: Args larger than this (as JSON) are refused at submit unless a runner says otherwise.
DEFAULT_MAX_ARGS_BYTES = 1_000_000

IdLike = uuid.UUID | str
StatusFilter = ExecutionStatus | str | Iterable[ExecutionStatus | str] | None


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _as_id(value: IdLike) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ExecutionNotFound(f"{value!r} is not an execution id (expected a UUID)") from None


def _statuses(status: StatusFilter) -> list[str] | None:
    if status is None:
        return None
    items = [status] if isinstance(status, str) else list(status)
    try:
        return [ExecutionStatus(s).value for s in items]
    except ValueError as exc:
        known = ", ".join(s.value for s in ExecutionStatus)
        raise ConfigurationError(f"{exc}; statuses are: {known}") from None


def _since(since: datetime | timedelta | None) -> datetime | None:
    return utcnow() - since if isinstance(since, timedelta) else since


MAX_PRUNE_BATCH = 10_000


def _prune_plan(
    older_than: datetime | timedelta, status: StatusFilter, batch_size: int
) -> tuple[datetime, list[str]]:
    """Check prune()'s arguments; return the cutoff and the finished statuses to delete."""
    if isinstance(older_than, timedelta) and older_than < timedelta(0):
        raise ConfigurationError(f"older_than must not be negative, got {older_than}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ConfigurationError(f"batch_size must be an int, got {batch_size!r}")
    if not 1 <= batch_size <= MAX_PRUNE_BATCH:
        raise ConfigurationError(f"batch_size must be 1..{MAX_PRUNE_BATCH}, got {batch_size}")
    finished = sorted(s.value for s in TERMINAL_STATUSES)
    statuses = _statuses(status)
    live = [s for s in statuses or () if s not in finished]
    if live:
        raise ConfigurationError(
            f"prune deletes finished executions only, not {', '.join(live)}; "
            f"finished statuses are: {', '.join(finished)}"
        )
    before = _since(older_than)
    assert before is not None
    return before, finished if statuses is None else statuses


class _RunnerBase:
    """What both runners share that does no I/O."""

    _runner_name = "runner"
    _heartbeat_interval: float

    def __init__(
        self,
        *,
        registry: Registry | None,
        worker_id: str | None,
        inline_retry_max_wait: float,
        on_retry_scheduled: Callable[[Execution], None] | None = None,
        slow_phase_threshold: float | None = 10.0,
        heartbeat_interval: float = 10.0,
        lease_duration: float | None = None,
        max_threads: int = 32,
        max_args_bytes: int | None = DEFAULT_MAX_ARGS_BYTES,
        instruments: Iterable[_hooks.Instrument] | None = None,
    ) -> None:
        self._instruments = _hooks.resolve(instruments)
        self.registry = registry if registry is not None else default_registry
        self._slow_phase_ms = None if slow_phase_threshold is None else slow_phase_threshold * 1000
        self.on_retry_scheduled = on_retry_scheduled
        self.worker_id = worker_id or _worker_id()
        if inline_retry_max_wait < 0:
            raise ConfigurationError("inline_retry_max_wait must be >= 0 seconds")
        self.inline_retry_max_wait = inline_retry_max_wait
        self._heartbeat_interval = _interval(heartbeat_interval)
        self.lease_duration = _lease(lease_duration, self._heartbeat_interval)
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ConfigurationError(f"max_threads must be a positive int, got {max_threads!r}")
        self._max_threads = max_threads
        if max_args_bytes is not None and (
            isinstance(max_args_bytes, bool) or not isinstance(max_args_bytes, int)
        ):
            raise ConfigurationError(
                f"max_args_bytes must be an int or None, got {max_args_bytes!r}"
            )
        self.max_args_bytes = max_args_bytes
        self._inflight = InFlight()
        self._wakers: set[Callable[[], None]] = set()
        self._worker: SyncWorker | AsyncWorker | None = None

    def _submission(
        self,
        job: JobRef,
        args: Any,
        *,
        idempotency_key: str | None,
        triggered_by: str,
        external_id: str | None,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
    ) -> tuple[type[PhasedJob], dict[str, Any]]:
        job_cls = self.registry.resolve(job)
        _warn_if_unimportable(job_cls)
        args_value, args_json = job_cls.validate_args(args)
        self._check_size(job_cls, args_json)
        row = new_row(
            job_cls,
            args_json,
            execution_id=uuid.uuid4(),
            now=utcnow(),
            triggered_by=triggered_by,
            idempotency_key=_key(idempotency_key),
            external_id=external_id,
            concurrency_key=job_cls.concurrency_key_for(args_value),
            queue=_queue(queue),
            priority=_priority(priority),
            due_at=_due_at(run_at, delay),
        )
        if self._instruments:
            _hooks.submitted(self._instruments, row, inline=False)
        return job_cls, row

    def _submissions(
        self,
        job: JobRef,
        *,
        triggered_by: str,
        queue: str | None,
        priority: int | None,
        run_at: datetime | None,
        delay: float | timedelta | None,
    ) -> _Submissions:
        """How ``submit_many`` turns each args into a row: one plan, one clock reading."""
        job_cls = self.registry.resolve(job)
        _warn_if_unimportable(job_cls)
        return _Submissions(
            self,
            job_cls,
            triggered_by=triggered_by,
            queue=_queue(queue),
            priority=_priority(priority),
            due_at=_due_at(run_at, delay),
            now=utcnow(),
        )

    def _check_size(self, job_cls: type[PhasedJob], args_json: Any) -> None:
        """Args above ``max_args_bytes`` (as JSON) are refused before anything is stored."""
        limit = self.max_args_bytes
        if limit is None:
            return
        size = len(json.dumps(args_json, separators=(",", ":"), ensure_ascii=False).encode())
        if size > limit:
            raise InvalidArgs(
                f"args for job {job_cls.name!r} are {size:,} bytes as JSON, above the "
                f"runner's max_args_bytes of {limit:,}; pass a reference to the data (an "
                "id, a path, a URL) instead of the data itself, or raise max_args_bytes"
            )

    def stop_work(self, *, now: bool = False) -> None:
        """Ask a running ``work()`` loop to stop (safe from any thread, or a signal handler).

        It claims nothing new and lets what runs finish within its grace period; with
        ``now``, it stops what runs at once (as a second SIGTERM does).
        """
        worker = self._worker
        if worker is not None:
            worker.stop(now)

    def _work_options(self, *, reap_interval: float | None, **options: Any) -> WorkOptions:
        """``work()``'s settings, checked; reaping every heartbeat interval by default."""
        return WorkOptions(reap_interval=reap_interval or self._heartbeat_interval, **options)

    def _submitted(self) -> None:
        """New work was committed: wake this process's own idle workers at once."""
        for wake in list(self._wakers):
            wake()

    def _settings(self, *, worker: bool = False) -> Settings:
        """What the flow decides with; a worker never sleeps a retry inline (it has a
        slot to give back), it leaves the execution ``retrying`` for its claim loop."""
        return Settings(
            inline_retry_max_wait=-1.0 if worker else self.inline_retry_max_wait,
            on_retry_scheduled=self.on_retry_scheduled,
        )

    def _flow(self, state: AttemptState, running: Running, *, worker: bool) -> Flow:
        """The flow that runs ``state``'s execution, watched by the instruments if any."""
        flow = drive(state, running, self._settings(worker=worker))
        if not self._instruments:
            return flow
        return _hooks.observed(flow, _hooks.Watch(self._instruments, state))

    def _no_load_jobs(self) -> builtins.list[str]:
        """Jobs whose claim starts them in execute (nothing is written before it)."""
        return [job.name for job in self.registry if not job.spec.runs("load")]

    def _inline(
        self, job_cls: type[PhasedJob], args: Any, *, triggered_by: str, external_id: str | None
    ) -> AttemptState:
        args_value, args_json = job_cls.validate_args(args)
        self._check_size(job_cls, args_json)
        state = AttemptState.inline(
            job_cls,
            args_json,
            worker=self.worker_id,
            lease_s=self.lease_duration,
            triggered_by=triggered_by,
            external_id=external_id,
        )
        state.args_value = args_value
        state.slow_phase_ms = self._slow_phase_ms
        if self._instruments and state.insert_row is not None:
            _hooks.submitted(self._instruments, state.insert_row, inline=True)
        return state

    def _run_target(self, job: JobRef, idempotency_key: str | None) -> tuple[type[PhasedJob], bool]:
        """The job class for ``run``, and whether its row must be submitted first.

        With an idempotency key or a concurrency limit the row has to exist (race-safe)
        before the execution may claim a slot; otherwise ``run`` inserts it already
        running, saving a transaction.
        """
        job_cls = self.registry.resolve(job)
        self._check_runnable(job_cls)
        _warn_if_unimportable(job_cls)
        return job_cls, idempotency_key is not None or job_cls.max_concurrency is not None

    def _concurrency(
        self, job_cls: type[PhasedJob], execution: Execution
    ) -> tuple[str, str, int] | None:
        if job_cls.max_concurrency is None or execution.concurrency_key is None:
            return None
        return job_cls.name, execution.concurrency_key, job_cls.max_concurrency

    def _limits(self) -> dict[str, int]:
        return {
            job.name: job.max_concurrency
            for job in self.registry
            if job.max_concurrency is not None and self._can_run(job)
        }

    def _check_runnable(self, job_cls: type[PhasedJob]) -> None:
        """Refuse jobs this runner cannot run (JobRunner: async phases)."""

    def _runnable_jobs(self) -> builtins.list[str]:
        return [job.name for job in self.registry if self._can_run(job)]

    def _can_run(self, job_cls: type[PhasedJob]) -> bool:
        return True

    def _hinted(self, job: JobRef | None) -> type[PhasedJob] | None:
        """The hinted job class when run_execution may claim without reading the row:
        runnable here, and without a concurrency limit (which needs the row's key)."""
        if job is None:
            return None
        # A class is code; a name may come from a message: looked up, never imported.
        job_cls = self.registry.lookup(job) if isinstance(job, str) else self.registry.resolve(job)
        if job_cls is None:
            return None  # the row names the job
        self._check_runnable(job_cls)
        return job_cls if job_cls.max_concurrency is None else None

    def _claimed_one(self, hinted: type[PhasedJob], row: dict[str, Any]) -> AttemptState:
        """The state of a row claimed on a hint; the row, not the hint, names the job."""
        job_cls = hinted
        if row["job"] != hinted.name:
            job_cls = self.registry.resolve_row(row["job"], row["handler"])
            self._check_runnable(job_cls)
        return self._state(job_cls, row)

    def _state(self, job_cls: type[PhasedJob], row: dict[str, Any]) -> AttemptState:
        state = AttemptState.claimed(
            job_cls, row, worker=self.worker_id, lease_s=self.lease_duration
        )
        state.slow_phase_ms = self._slow_phase_ms
        return state

    def _claimed(self, row: dict[str, Any]) -> AttemptState:
        """The state of a row the worker claimed (only jobs it can run are claimed)."""
        return self._state(self.registry.resolve_row(row["job"], row["handler"]), row)

    def _claimable(self, execution: Execution) -> type[PhasedJob] | None:
        """The job class to run ``execution`` with, or None if it is not waiting to run."""
        if execution.status.value not in WAITING or execution.cancel_requested:
            logger.info(
                "execution %s is %s; not running it",
                execution.id,
                execution.status,
                extra=execution.log_fields(),
            )
            return None
        job_cls = self.registry.resolve_row(execution.job, execution.handler)
        self._check_runnable(job_cls)
        return job_cls

    def _log_reaped(self, reaped: builtins.list[Execution]) -> None:
        for execution in reaped:
            logger.warning(
                "reaped execution %s of %s: %s; now %s",
                execution.id,
                execution.job,
                execution.error_message,
                execution.status,
                extra=execution.log_fields(),
            )
        if self._instruments:
            _hooks.reaped(self._instruments, reaped)

    def _retry_budget(self, execution: Execution) -> int:
        """A fresh budget: the job's policy's attempts from here (one if the job is not
        importable in this process, e.g. the CLI without ``--app``)."""
        try:
            job_cls = self.registry.resolve_row(execution.job, execution.handler)
        except JobNotFound:
            if execution.job.startswith("__main__:"):
                raise  # no worker could ever run it: say why and how to fix it
            return execution.attempt + 1
        return execution.attempt + job_cls.retry.max_attempts

    def _cancel_result(
        self, execution_id: uuid.UUID, execution: Execution | None, current: Execution | None
    ) -> Execution:
        if execution is not None:
            running = self._inflight.get(execution_id)
            if running is not None and execution.status is ExecutionStatus.RUNNING:
                running.signal("cancel")  # running here: no need to wait for a heartbeat
            return execution
        if current is None:
            raise ExecutionNotFound(f"no execution with id {execution_id}")
        raise InvalidTransition(
            f"execution {execution_id} is {current.status}; only pending, retrying or "
            "running executions can be cancelled"
        )

    def _retry_result(
        self, execution_id: uuid.UUID, execution: Execution | None, current: Execution
    ) -> Execution:
        if execution is None:
            raise InvalidTransition(
                f"execution {execution_id} is {current.status}; only "
                f"{', '.join(RETRYABLE_BY_HAND)} executions can be retried"
            )
        return execution


_warned: set[str] = set()


def _warn_if_unimportable(job_cls: type[PhasedJob]) -> None:
    """Once per job: it is known only as ``__main__:...``, which no other process finds.

    A job with a stable ``name`` of its own is left alone: a worker that imports the
    module defining it finds it by that name.
    """
    if job_cls.name.startswith("__main__:") and job_cls.handler not in _warned:
        _warned.add(job_cls.handler)
        logger.warning(
            "%s; executions of it can be run and retried only by this process",
            main_module_message(job_cls.handler),
            extra={"job": job_cls.name},
        )


def _interval(seconds: float) -> float:
    if seconds <= 0:
        raise ConfigurationError("heartbeat_interval must be a positive number of seconds")
    return seconds


def _lease(lease_duration: float | None, heartbeat_interval: float) -> float:
    """The lease a claim takes: three heartbeats by default, never fewer than two."""
    if lease_duration is None:
        return 3 * heartbeat_interval
    if isinstance(lease_duration, bool) or not isinstance(lease_duration, int | float):
        raise ConfigurationError(f"lease_duration must be seconds, got {lease_duration!r}")
    if lease_duration < 2 * heartbeat_interval:
        raise ConfigurationError(
            f"lease_duration ({lease_duration:g}s) must be at least two heartbeat intervals "
            f"({2 * heartbeat_interval:g}s): a lease shorter than what its heartbeat renews "
            "would let a healthy worker be reaped"
        )
    return float(lease_duration)


def _key(idempotency_key: str | None) -> str | None:
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str) or not idempotency_key or len(idempotency_key) > 255
    ):
        raise ConfigurationError(
            f"idempotency_key must be a non-empty string of at most 255 characters, "
            f"got {idempotency_key!r}"
        )
    return idempotency_key


def _due_at(run_at: datetime | None, delay: float | timedelta | None) -> datetime | float:
    """When a submitted execution is due: a moment, or seconds from the database's now."""
    if run_at is not None and delay is not None:
        raise ConfigurationError("pass run_at or delay, not both")
    if run_at is not None:
        if not isinstance(run_at, datetime) or run_at.tzinfo is None:
            raise ConfigurationError(
                f"run_at must be an aware datetime (e.g. datetime.now(UTC) + ...), got {run_at!r}"
            )
        return run_at
    seconds = _seconds(delay, "delay")
    return 0.0 if seconds is None else seconds


def _seconds(value: float | timedelta | None, name: str) -> float | None:
    """Seconds from a number or a timedelta (None stays None); never negative."""
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ConfigurationError(f"{name} must be seconds >= 0 or a timedelta, got {value!r}")
    return float(seconds)


def _queue(queue: str | None) -> str | None:
    if queue is not None and (not isinstance(queue, str) or not queue.strip() or len(queue) > 100):
        raise ConfigurationError(
            f"queue must be a non-empty name of at most 100 chars, got {queue!r}"
        )
    return queue


def _priority(priority: int | None) -> int | None:
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise ConfigurationError(f"priority must be an int (higher runs first), got {priority!r}")
    return priority


def _full_url(engine: Engine | AsyncEngine) -> str:
    """The engine's URL with its password, to build a companion engine from."""
    return str(engine.url.render_as_string(hide_password=False))


def _missing(execution_id: uuid.UUID) -> NoReturn:
    raise ExecutionNotFound(f"no execution with id {execution_id}")


class _Submissions:
    """``submit_many``'s rows, one args at a time: validated, sized, numbered.

    Both runners build every row before anything is stored (one invalid args stores
    nothing); the async one does it in slices between which the event loop runs.
    """

    __slots__ = ("_due_at", "_job_cls", "_now", "_priority", "_queue", "_runner", "_triggered_by")

    def __init__(
        self,
        runner: _RunnerBase,
        job_cls: type[PhasedJob],
        *,
        triggered_by: str,
        queue: str | None,
        priority: int | None,
        due_at: datetime | float,
        now: datetime,
    ) -> None:
        self._runner, self._job_cls, self._triggered_by = runner, job_cls, triggered_by
        self._queue, self._priority, self._due_at, self._now = queue, priority, due_at, now

    def row(self, index: int, args: Any) -> dict[str, Any]:
        """The row for ``args``, the ``index``-th of the call (named in its error)."""
        job_cls = self._job_cls
        try:
            args_value, args_json = job_cls.validate_args(args)
            self._runner._check_size(job_cls, args_json)
        except InvalidArgs as exc:
            raise InvalidArgs(f"args[{index}]: {exc}") from exc
        return new_row(
            job_cls,
            args_json,
            execution_id=uuid.uuid4(),
            now=self._now,
            triggered_by=self._triggered_by,
            idempotency_key=None,
            concurrency_key=job_cls.concurrency_key_for(args_value),
            queue=self._queue,
            priority=self._priority,
            due_at=self._due_at,
        )

    def built(self, rows: list[dict[str, Any]]) -> None:
        """Every row is built: tell the instruments (each a PRODUCER span)."""
        if self._runner._instruments:
            for row in rows:
                _hooks.submitted(self._runner._instruments, row, inline=False)
