"""Celery integration: one generic task runs every jobrunner execution.

::

    from celery import Celery
    from jobrunner.contrib.celery import install

    app = Celery("myapp", broker="redis://localhost:6379/0")
    jobs = install(app, database_url="postgresql+psycopg://app@db/app")

    jobs.enqueue(SendReport, {"report_id": 7})        # in the web process
    # celery -A myapp worker                            # runs it

``enqueue`` commits the ``pending`` execution first and then sends
``jobrunner.run_execution(execution_id, job=...)``; the Celery task id is the execution's
``external_id``. In the worker the task runs a sync job with :class:`~jobrunner.JobRunner`
(no event loop anywhere) and an async job on the worker process's one event loop, which
lives in its own thread from process start to process shutdown and owns the process's
:class:`~jobrunner.AsyncJobRunner` and its engine. Retry waits longer than
``inline_retry_max_wait`` become Celery countdowns for the same execution.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime as dt
import logging
import os
import random
import threading
import uuid
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .. import _queries as q
from .._attempt import utcnow
from .._base import _seconds
from .._exceptions import ConfigurationError, DatabaseUnavailable, JobRunnerError
from .._job import PhasedJob
from .._records import Execution
from .._registry import JobRef, Registry, default_registry
from .._runner import AsyncJobRunner, JobRunner
from .._session import caller_connection, on_commit

__all__ = [
    "DISPATCH",
    "RECOMMENDED_SETTINGS",
    "RELAY_TASK_NAME",
    "TASK_NAME",
    "CeleryJobs",
    "EnqueueFailed",
    "install",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The one task every execution runs through.
TASK_NAME = "jobrunner.run_execution"
#: The relay's task, on the beat schedule: sends again what was never sent or started.
RELAY_TASK_NAME = "jobrunner.relay"

#: Applied by :func:`install` as defaults: anything the app configures wins.
RECOMMENDED_SETTINGS: dict[str, Any] = {
    # Ack after the run: a worker that dies mid-job leaves the message to be redelivered.
    "task_acks_late": True,
    # ...including when the pool process is killed (OOM, SIGKILL).
    "task_reject_on_worker_lost": True,
    # Don't hoard messages a busy process can't start (and that another could).
    "worker_prefetch_multiplier": 1,
}

_CLAIMABLE = ("pending", "retrying")

#: The ``dispatch`` of executions Celery runs (the relay looks for them).
DISPATCH = "celery"
#: Seconds (doubled at random) before a task whose job was at its limit comes back.
_LIMIT_BACKOFF = 1.0


@dataclasses.dataclass(frozen=True)
class _Message:
    """The Celery message of one execution."""

    execution_id: uuid.UUID
    task_id: str
    job_ref: str


def _wait_of(due: Any) -> float:
    """Seconds until a row's ``due_at`` (a moment, or seconds from now)."""
    if isinstance(due, dt.datetime):
        return max(0.0, (due - utcnow()).total_seconds())
    return float(due or 0.0)


_INSTALL_HINT = "pip install 'jobrunner[celery]'"

#: Retries whose wait ended this run, collected for sending after it (never on the loop).
_scheduled: contextvars.ContextVar[list[Execution] | None] = contextvars.ContextVar(
    "jobrunner_celery_scheduled", default=None
)


class EnqueueFailed(JobRunnerError, ConnectionError):
    """The execution was stored but its Celery message could not be sent.

    The row stays, marked unsent: :meth:`CeleryJobs.relay` sends it once the broker is
    back. ``execution_id`` is the stored execution.
    """

    def __init__(self, message: str, execution_id: uuid.UUID) -> None:
        super().__init__(message)
        self.execution_id = execution_id


def _celery() -> Any:
    try:
        import celery
    except ImportError as exc:
        raise ConfigurationError(f"jobrunner.contrib.celery needs Celery: {_INSTALL_HINT}") from exc
    return celery


# -- the worker process's event loop ------------------------------------------------------


class _ProcessLoop:
    """One event loop for this process, run forever by its own thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="jobrunner-loop", daemon=True)
        self._thread.start()
        self._ready.wait()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it (from any other thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Celery's soft time limit interrupted the wait
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, let its thread close it, and wait for that."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        logger.info("jobrunner: closed the event loop of worker process %d", self.pid)


_loop_lock = threading.Lock()
_process_loop: _ProcessLoop | None = None


def process_loop() -> _ProcessLoop:
    """This process's loop, started on first need (a loop inherited over fork is not ours)."""
    global _process_loop
    with _loop_lock:
        if _process_loop is None or _process_loop.pid != os.getpid():
            _process_loop = _ProcessLoop()
            logger.info("jobrunner: started the event loop of worker process %d", os.getpid())
        return _process_loop


def _stop_process_loop() -> None:
    global _process_loop
    with _loop_lock:
        current, _process_loop = _process_loop, None
    if current is not None and current.pid == os.getpid():
        current.stop()


# -- the handle -----------------------------------------------------------------------------


class CeleryJobs:
    """What :func:`install` returns: enqueue and schedule jobs; the worker side of the task.

    ``runner`` is this process's :class:`~jobrunner.JobRunner` (made on first use and
    made afresh in a forked child), for ``get``/``list``/``attempts`` and friends.
    """

    def __init__(
        self,
        app: Any,
        *,
        database_url: str | None,
        registry: Registry,
        runner_options: dict[str, Any],
        relay_interval: float = 10.0,
        visibility: float = 300.0,
        grace: float = 10.0,
    ) -> None:
        self.app = app
        self.database_url = database_url
        self.registry = registry
        #: The relay's period, and how far ahead it sends scheduled executions.
        self.relay_interval = relay_interval
        #: Seconds a sent execution may wait in the broker before the relay sends it again.
        self.visibility = visibility
        #: Seconds a never-sent execution is left to its own enqueue before the relay sends it.
        self.grace = grace
        self._user_hook: Callable[[Execution], None] | None = runner_options.pop(
            "on_retry_scheduled", None
        )
        self._options = runner_options
        self._lock = threading.Lock()
        self._sync: JobRunner | None = None
        self._sync_pid = 0
        self._async: AsyncJobRunner | None = None
        self._async_loop: _ProcessLoop | None = None
        self.task: Any = None

    # -- runners, one of each per process ----------------------------------------------------

    @property
    def runner(self) -> JobRunner:
        """This process's sync runner (never starts an event loop)."""
        with self._lock:
            if self._sync is None or self._sync_pid != os.getpid():
                if self._sync is not None:
                    # Inherited over fork: drop the parent's connections without closing them.
                    self._sync.engine.dispose(close=False)
                self._sync = JobRunner(
                    self.database_url,
                    registry=self.registry,
                    on_retry_scheduled=self._on_retry_scheduled,
                    **self._options,
                )
                self._sync_pid = os.getpid()
            return self._sync

    async def _async_runner(self) -> AsyncJobRunner:
        """This process's async runner, made on (and belonging to) the process loop."""
        loop = process_loop()
        if self._async is None or self._async_loop is not loop:
            self._async = AsyncJobRunner(
                self.database_url,
                registry=self.registry,
                on_retry_scheduled=self._on_retry_scheduled,
                **self._options,
            )
            self._async_loop = loop
        return self._async

    def close(self) -> None:
        """Close this process's runners (the worker does this at shutdown)."""
        loop, runner = self._async_loop, self._async
        self._async = self._async_loop = None
        if runner is not None and loop is not None and loop.pid == os.getpid():
            loop.run(runner.aclose())
        with self._lock:
            sync, self._sync = self._sync, None
        if sync is not None and self._sync_pid == os.getpid():
            sync.close()

    # -- enqueueing ----------------------------------------------------------------------------

    def enqueue(
        self,
        job: JobRef,
        args: Any = None,
        *,
        idempotency_key: str | None = None,
        unique_for: float | dt.timedelta | None = None,
        run_at: dt.datetime | None = None,
        delay: float | dt.timedelta | None = None,
        countdown: float | None = None,
        session: Any = None,
        triggered_by: str = "celery",
        **apply_async_options: Any,
    ) -> uuid.UUID:
        """Store a pending execution for Celery, then send its task; returns its id.

        The row is written first and carries ``dispatch = "celery"``: it is never
        invisible to recovery. If the message is never sent (the process dies, the broker
        is down) or never starts within the visibility window, :meth:`relay` sends it
        again. ``run_at``/``delay`` (``countdown`` is the same as ``delay``) schedule it;
        other ``apply_async`` options (``queue``, ``priority``, ...) go to Celery.

        ``session``: a ``Session`` or ``Connection`` of yours on the same database; the
        row is written in your transaction and the message sent only after you commit
        (never if you roll back). With an ``idempotency_key`` already used, the first
        execution's id is returned and nothing is sent. If the broker cannot be reached,
        :class:`EnqueueFailed` is raised: the row stays, and the relay sends it later.
        """
        runner = self.runner
        task_id = str(uuid.uuid4())
        job_cls, row = runner._submission(
            job,
            args,
            idempotency_key=idempotency_key,
            triggered_by=triggered_by,
            external_id=task_id,
            run_at=run_at,
            delay=delay if delay is not None else countdown,
        )
        row["dispatch"] = DISPATCH
        wait = _wait_of(row["due_at"])
        window = _seconds(unique_for, "unique_for")
        message = _Message(row["id"], task_id, _portable_ref(job_cls.name, job_cls.handler))
        if session is not None:
            conn = caller_connection(session, runner.engine)
            execution_id = q.submit_row(conn, row, unique_for=window)
            if execution_id == row["id"]:
                # Sent once the caller's Session commits, never before. A Connection cannot
                # tell when its commit is done: the relay sends those (after ``grace``).
                on_commit(session, lambda: self._send_quietly(message, wait, apply_async_options))
            return execution_id
        row["dispatched_at"] = 0.0  # sent right below; if not, marked unsent at once
        with runner._phases.tx(single=True) as conn:
            execution_id = q.submit_row(conn, row, unique_for=window)
        if execution_id != row["id"]:
            return execution_id  # submitted (and sent) before
        self._send(message, countdown=wait, **apply_async_options)
        return execution_id

    def _send(self, message: _Message, *, countdown: float | None, **options: Any) -> None:
        # The job rides along so the worker picks its runner without reading the row first.
        kwargs = {"job": message.job_ref}
        try:
            self.task.apply_async(
                (str(message.execution_id),),
                kwargs,
                task_id=message.task_id,
                countdown=countdown,
                **options,
            )
        except Exception as exc:
            with self.runner._phases.tx(single=True) as conn:
                q.mark_dispatched(conn, message.execution_id, sent=False)
            raise EnqueueFailed(
                f"execution {message.execution_id} is stored but its Celery message could "
                f"not be sent ({type(exc).__name__}: {exc}); the relay (jobs.relay(), on "
                "the beat schedule) sends it once the broker is back",
                message.execution_id,
            ) from exc

    def _send_quietly(self, message: _Message, wait: float, options: dict[str, Any]) -> None:
        """After the caller's commit: send, and record it; a failure is the relay's job."""
        try:
            self._send(message, countdown=wait, **options)
        except EnqueueFailed:
            logger.warning("jobrunner: %s; the relay will send it", message.execution_id)
            return
        with self.runner._phases.tx(single=True) as conn:
            q.mark_dispatched(conn, message.execution_id, sent=True)

    # -- the relay (outbox) ----------------------------------------------------------------------

    def relay(self, *, limit: int = 500) -> int:
        """Send what should be in Celery and is not: returns how many were sent.

        Executions whose message was never sent (the enqueuing process died between
        commit and publish, or the broker was down), or that did not start within
        ``visibility`` seconds of their message (lost, or acked away). Safe to call from
        every process: one relays at a time on PostgreSQL. Also reaps expired leases, so a
        Celery-only deployment needs no other process. :func:`install` puts it on the
        beat schedule every ``relay_interval`` seconds.
        """
        runner = self.runner
        runner.reap()
        with runner._phases.tx() as conn:
            rows = q.relay_due(
                conn,
                dispatch=DISPATCH,
                visibility_s=self.visibility,
                grace_s=self.grace,
                lookahead_s=self.relay_interval,
                limit=limit,
            )
        sent = 0
        for row in rows:
            task_id = str(uuid.uuid4())
            with runner._phases.tx(single=True) as conn:
                q.set_external_id(conn, row["id"], task_id)
            wait = max(0.0, (row["due_at"] - row["db_now"]).total_seconds())
            message = _Message(row["id"], task_id, _portable_ref(row["job"], row["handler"]))
            try:
                self._send(message, countdown=wait)
            except EnqueueFailed as exc:
                logger.warning("jobrunner relay: %s", exc)
                break  # the broker is down: the rest waits for the next relay
            sent += 1
        if sent:
            logger.info("jobrunner relay: sent %d execution(s) again", sent)
        return sent

    # -- periodic jobs -----------------------------------------------------------------------

    def add_periodic(
        self,
        job: JobRef,
        args: Any = None,
        *,
        schedule: Any,
        name: str | None = None,
        **apply_async_options: Any,
    ) -> str:
        """Add a ``beat_schedule`` entry that runs ``job`` with ``args``; returns its name.

        The job and its arguments are checked now, not at the first tick. ``schedule`` is
        seconds, a ``timedelta``, or a Celery schedule (``crontab(...)``, ``solar(...)``).
        Each tick creates one execution (``triggered_by="celery-beat"``) in the worker
        that receives it; a redelivered tick message does not create a second one.
        """
        job_cls = self.registry.resolve(job)
        _, args_json = job_cls.validate_args(args)
        entry_name = name or f"jobrunner:{job_cls.name}"
        entries = dict(self.app.conf.beat_schedule or {})
        if entry_name in entries:
            raise ConfigurationError(
                f"beat_schedule already has an entry named {entry_name!r}; pass name=..."
            )
        entries[entry_name] = {
            "task": TASK_NAME,
            "schedule": _check_schedule(schedule, entry_name),
            "kwargs": {"job": _portable_ref(job_cls.name, job_cls.handler), "args": args_json},
            "options": apply_async_options,
        }
        self.app.conf.beat_schedule = entries
        return entry_name

    # -- the worker side -----------------------------------------------------------------------

    def run_execution(
        self,
        execution_id: str | uuid.UUID | None = None,
        *,
        job: str | None = None,
        args: Any = None,
        task_id: str | None = None,
        reply: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """What the task does: run one execution here, or create one (beat) and run it.

        ``job`` names the execution's job (messages from :meth:`enqueue` carry it), so
        the runner is picked without reading the row; without it the row is read first.
        A finished execution, or one another worker is running, is left alone.
        """
        if execution_id is None:
            execution_id = self._submit_tick(job, args, task_id)
        eid = uuid.UUID(str(execution_id))
        job_cls = hinted = self._hinted(job)
        if job_cls is None:
            current = self.runner.get(eid)
            if current.status.value not in _CLAIMABLE or current.cancel_requested:
                return _ignored(current)  # finished, or taken: a redelivery changes nothing
            job_cls = self._resolve_row(current)
        execution, scheduled = self._run(job_cls, eid, hinted)
        for waiting in scheduled:
            self._reschedule(waiting, reply or {})
        rescheduled = {waiting.id for waiting in scheduled}
        waits = execution.status.value in _CLAIMABLE and not execution.cancel_requested
        if waits and execution.id not in rescheduled:
            # Not claimable now (its job at its concurrency limit, or a retry not yet
            # due): a countdown brings it back, instead of acking it away.
            self._reschedule(execution, reply or {}, at_least=_LIMIT_BACKOFF)
        return {"execution_id": str(execution.id), "status": execution.status.value}

    def _hinted(self, job: str | None) -> type[PhasedJob] | None:
        if job is None:
            return None
        return self.registry.lookup(job)  # a message's word: never imported; the row says

    def _resolve_row(self, current: Execution) -> type[PhasedJob]:
        # A worker without the job: the message fails; the row stays waiting, and the
        # relay sends it again after the visibility window (to a worker that has it).
        return self.registry.resolve_row(current.job, current.handler)

    def _submit_tick(self, job: str | None, args: Any, task_id: str | None) -> uuid.UUID:
        if job is None:
            raise ConfigurationError(f"{TASK_NAME} needs an execution id, or job= for beat")
        return self.runner.submit(
            self.registry.resolve_row(job, job),  # a message's word: imported only if allowed
            args,
            idempotency_key=f"celery:{task_id}" if task_id else None,
            triggered_by="celery-beat",
            external_id=task_id,
        )

    def _run(
        self, job_cls: type[PhasedJob], execution_id: uuid.UUID, hinted: type[PhasedJob] | None
    ) -> tuple[Execution, list[Execution]]:
        if job_cls.spec.async_phases:
            return process_loop().run(self._run_async(execution_id, hinted))
        scheduled: list[Execution] = []
        token = _scheduled.set(scheduled)
        try:
            # With the job known from the message the runner claims without a read first.
            return self.runner.run_execution(execution_id, job=hinted), scheduled
        finally:
            _scheduled.reset(token)

    async def _run_async(
        self, execution_id: uuid.UUID, hinted: type[PhasedJob] | None
    ) -> tuple[Execution, list[Execution]]:
        scheduled: list[Execution] = []
        _scheduled.set(scheduled)  # this coroutine's task has its own context
        runner = await self._async_runner()
        return await runner.run_execution(execution_id, job=hinted), scheduled

    def _on_retry_scheduled(self, execution: Execution) -> None:
        pending = _scheduled.get()
        if pending is not None:
            pending.append(execution)  # sent by the task once the run is over
        else:
            self._reschedule(execution, {})  # e.g. runner.run_due() outside a task
        if self._user_hook is not None:
            self._user_hook(execution)

    def _reschedule(
        self, execution: Execution, reply: dict[str, Any], *, at_least: float = 0.0
    ) -> None:
        """Send the execution again with a countdown until its ``due_at``."""
        due = execution.due_at or utcnow()
        countdown = max(at_least * random.uniform(1.0, 2.0), (due - utcnow()).total_seconds())
        task_id = str(uuid.uuid4())
        with self.runner._phases.tx(single=True) as conn:
            if not q.set_external_id(conn, execution.id, task_id):
                return  # cancelled or taken meanwhile
        message = _Message(execution.id, task_id, _portable_ref(execution.job, execution.handler))
        try:
            self._send(message, countdown=countdown, **reply)
        except EnqueueFailed:
            logger.exception("jobrunner: could not schedule %s again; the relay will", execution.id)

    # -- worker lifecycle (signals) --------------------------------------------------------

    def _register_task(self) -> None:
        handle = self

        def run_execution(
            task: Any,
            execution_id: str | None = None,
            *,
            job: str | None = None,
            args: Any = None,
        ) -> dict[str, Any]:
            """Run one jobrunner execution (or, from beat, create one and run it)."""
            request = task.request
            return handle.run_execution(
                execution_id, job=job, args=args, task_id=request.id, reply=_reply(request)
            )

        self.task = self.app.task(
            run_execution,
            name=TASK_NAME,
            bind=True,
            shared=False,  # shared tasks join every app: each app's task must be its own
            ignore_result=True,
            autoretry_for=(DatabaseUnavailable,),
            retry_backoff=True,
            retry_backoff_max=300,
            max_retries=12,
        )

        def relay() -> int:
            """Send again what should be in Celery and is not; reap expired leases."""
            return handle.relay()

        self.relay_task = self.app.task(
            relay, name=RELAY_TASK_NAME, shared=False, ignore_result=True
        )
        if self.relay_interval:
            entries = dict(self.app.conf.beat_schedule or {})
            entries.setdefault(
                "jobrunner-relay",
                {
                    "task": RELAY_TASK_NAME,
                    "schedule": self.relay_interval,
                    "options": {"expires": self.relay_interval},
                },
            )
            self.app.conf.beat_schedule = entries


def _reply(request: Any) -> dict[str, Any]:
    """Where a retry goes: the exchange and routing key this message came by."""
    info = getattr(request, "delivery_info", None) or {}
    options = {"exchange": info.get("exchange"), "routing_key": info.get("routing_key")}
    return {k: v for k, v in options.items() if v is not None}


def _ignored(current: Execution) -> dict[str, Any]:
    logger.info(
        "jobrunner: execution %s is %s; message ignored",
        current.id,
        current.status.value,
        extra=current.log_fields(),
    )
    return {"execution_id": str(current.id), "status": current.status.value}


def _portable_ref(name: str, handler: str) -> str:
    """The handler path if another process can import it, else the job's name."""
    return name if "<locals>" in handler else handler


def _check_schedule(schedule: Any, entry: str) -> Any:
    if isinstance(schedule, bool) or not (
        isinstance(schedule, int | float | dt.timedelta) or hasattr(schedule, "is_due")
    ):
        raise ConfigurationError(
            f"beat entry {entry!r}: schedule must be seconds, a timedelta or a Celery "
            f"schedule such as crontab(...), got {schedule!r}"
        )
    seconds = schedule.total_seconds() if isinstance(schedule, dt.timedelta) else schedule
    if isinstance(seconds, int | float) and seconds <= 0:
        raise ConfigurationError(f"beat entry {entry!r}: schedule must be positive")
    return schedule


# -- signals ------------------------------------------------------------------------------

_handles: weakref.WeakSet[CeleryJobs] = weakref.WeakSet()


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Threads pool: start the loop now. Prefork waits for each child; solo is told below."""
    from celery.concurrency import get_implementation

    pool_cls = get_implementation(getattr(sender, "pool_cls", "prefork"))
    if pool_cls.__module__.rpartition(".")[2] == "thread":
        process_loop()


def _on_process_init(**_: Any) -> None:
    """A prefork child (after fork) or the solo pool: this process's loop starts now."""
    process_loop()


def _on_shutdown(**_: Any) -> None:
    """Close every runner of this process, then its loop."""
    for handle in list(_handles):
        try:
            handle.close()
        except Exception:
            logger.exception("jobrunner: closing the runners failed")
    _stop_process_loop()


def _connect_signals() -> None:
    from celery import signals

    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="jobrunner-init")
    signals.worker_process_init.connect(
        _on_process_init, weak=False, dispatch_uid="jobrunner-process-init"
    )
    for signal in (signals.worker_process_shutdown, signals.worker_shutdown):
        signal.connect(_on_shutdown, weak=False, dispatch_uid=f"jobrunner-{signal.name}")


def install(
    app: Any,
    *,
    database_url: str | None = None,
    registry: Registry | None = None,
    relay_interval: float | None = 10.0,
    visibility: float = 300.0,
    grace: float = 10.0,
    **runner_options: Any,
) -> CeleryJobs:
    """Register ``jobrunner.run_execution`` on ``app``; returns the :class:`CeleryJobs` handle.

    ``database_url`` (default ``JOBRUNNER_DATABASE_URL``) is the execution store;
    ``runner_options`` go to both runners (``inline_retry_max_wait`` defaults to 1 s
    here: longer retry waits become Celery countdowns). :data:`RECOMMENDED_SETTINGS`
    are added as defaults, so anything the app configures itself wins.

    The relay (:meth:`CeleryJobs.relay`) goes on the beat schedule every
    ``relay_interval`` seconds (None: not scheduled; call it yourself): it sends again
    executions whose message was never sent (``grace`` seconds after they were stored),
    or did not start within ``visibility`` seconds, and reaps expired leases. Run
    ``celery beat`` (or call it from any process).
    """
    _celery()
    if "engine" in runner_options:
        raise ConfigurationError(
            "install(engine=...) is not supported: each worker process makes its own "
            "engines after fork; pass database_url= and engine options instead"
        )
    runner_options.setdefault("inline_retry_max_wait", 1.0)
    handle = CeleryJobs(
        app,
        database_url=database_url,
        registry=registry if registry is not None else default_registry,
        runner_options=runner_options,
        relay_interval=relay_interval or 0.0,
        visibility=visibility,
        grace=grace,
    )
    app.add_defaults(dict(RECOMMENDED_SETTINGS))
    handle._register_task()
    _handles.add(handle)
    _connect_signals()
    return handle
