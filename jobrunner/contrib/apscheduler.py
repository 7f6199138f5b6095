"""APScheduler 3.x integration: each fire of a schedule is a recorded execution.

``schedule(scheduler, "reports.send", "cron", hour=6, args={...})`` validates the job and its
args at once, then adds an APScheduler job whose callable is a text reference to a function of
this module (:func:`run_scheduled_async` on an ``AsyncIOScheduler``, :func:`run_scheduled` on
thread-based schedulers) with the job's name, handler path and args as plain kwargs, so a
persistent job store (``SQLAlchemyJobStore``) can pickle it and another process can run it.

Each fire submits an execution (``triggered_by="apscheduler"``, the APScheduler job id as its
``external_id``) and runs it through a runner kept per (database URL, event loop): an
:class:`~jobrunner.AsyncJobRunner` on the scheduler's loop, whose sync phases go to worker
threads, or a :class:`~jobrunner.JobRunner` in the scheduler's worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from sqlalchemy.engine import URL, make_url

from .._engine import database_url as _env_or_default_url
from .._engine import display_url, is_memory_sqlite, parse_url
from .._exceptions import ConfigurationError, ExecutionFailed
from .._job import PhasedJob
from .._records import Execution
from .._registry import JobRef, Registry, default_registry
from .._runner import AsyncJobRunner, JobRunner
from .._schema import ExecutionStatus

__all__ = [
    "DEFAULTS",
    "TRIGGERED_BY",
    "aclose_runners",
    "close_runners",
    "configure",
    "run_scheduled",
    "run_scheduled_async",
    "schedule",
]

logger = logging.getLogger(__name__)

#: ``triggered_by`` of every execution a schedule fires.
TRIGGERED_BY = "apscheduler"

#: ``add_job`` options :func:`schedule` uses unless told otherwise (see the how-to):
#: no overlapping runs of one schedule; a backlog of missed fires runs once, however late,
#: rather than being dropped in silence or replayed in a burst.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
)

_INSTALL_HINT = "pip install 'jobrunner[apscheduler]'"
_SYNC_TARGET = f"{__name__}:run_scheduled"
_ASYNC_TARGET = f"{__name__}:run_scheduled_async"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Settings:
    database_url: str | None = None
    registry: Registry | None = None
    # A scheduled fire has nobody to hand a long retry wait to, so it waits inline.
    runner_options: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"inline_retry_max_wait": float("inf")}
    )


_settings = _Settings()
_lock = threading.Lock()
_runners: dict[tuple[str, asyncio.AbstractEventLoop | None], JobRunner | AsyncJobRunner] = {}
_inflight: dict[asyncio.AbstractEventLoop, set[asyncio.Task[Any]]] = {}


def configure(
    database_url: str | URL | None = None,
    *,
    registry: Registry | None = None,
    **runner_options: Any,
) -> None:
    """Set what fires use when their schedule names no database: URL, registry, options.

    Call it at start-up in every process that runs schedules, before the scheduler starts:
    a fire whose schedule was added with ``database_url=None`` uses this URL, else
    ``JOBRUNNER_DATABASE_URL``, else the embedded SQLite file. Keeping the URL here (or in
    the environment) keeps its password out of the APScheduler job store. ``runner_options``
    go to the runners' constructors (engine options such as ``pool_size``, or
    ``inline_retry_max_wait``, which defaults to waiting out every retry inline).
    """
    global _settings
    url = None if database_url is None else _render(database_url)
    options = {**_Settings().runner_options, **runner_options}
    _settings = _Settings(database_url=url, registry=registry, runner_options=options)


def schedule(
    scheduler: Any,
    job: JobRef,
    trigger: Any,
    args: Any = None,
    id: str | None = None,
    *,
    database_url: str | URL | None = None,
    **add_job_options: Any,
) -> Any:
    """Add a schedule that runs ``job`` with ``args`` on each fire of ``trigger``.

    ``job`` is a :class:`~jobrunner.PhasedJob` subclass, its name or its handler path; an
    unknown job raises :class:`~jobrunner.JobNotFound` (naming the nearest known ones) and
    args its ``Args`` model rejects raise :class:`~jobrunner.InvalidArgs`, both before
    anything is added. ``trigger`` and ``add_job_options`` are APScheduler's (``"interval"``
    with ``minutes=5``, ``jobstore=``, ``replace_existing=``, ...); :data:`DEFAULTS` fill in
    ``max_instances``, ``coalesce`` and ``misfire_grace_time``. ``id`` is the APScheduler job
    id (generated if omitted) and every execution's ``external_id``. ``database_url`` is
    stored with the schedule (password included, so prefer :func:`configure` or
    ``JOBRUNNER_DATABASE_URL`` with a persistent job store). Returns the APScheduler job.
    """
    _require_apscheduler()
    registry = _registry()
    job_cls = registry.resolve(job)
    _, args_json = job_cls.validate_args(args)
    wants_coroutine = _fires_on_loop(scheduler, add_job_options.get("executor", "default"))
    url = None if database_url is None else _render(database_url)
    _check_url(url)
    schedule_id = id if id is not None else uuid.uuid4().hex
    options = {**DEFAULTS, "name": job_cls.name, **add_job_options}
    _warn_if_unbounded(job_cls, schedule_id, options)
    return scheduler.add_job(
        _ASYNC_TARGET if wants_coroutine else _SYNC_TARGET,
        trigger,
        id=schedule_id,
        kwargs={
            "job": job_cls.name,
            "handler": job_cls.handler,
            "args": args_json,
            "schedule_id": schedule_id,
            "database_url": url,
        },
        **options,
    )


async def run_scheduled_async(
    *,
    job: str,
    handler: str,
    args: dict[str, Any],
    schedule_id: str,
    database_url: str | None = None,
) -> str:
    """What an ``AsyncIOScheduler`` fires: submit and run one execution on this loop.

    Returns the execution id; raises :class:`~jobrunner.ExecutionFailed` when the execution
    did not succeed, so APScheduler logs it and emits ``EVENT_JOB_ERROR``.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    runner = _async_runner(_effective_url(database_url), loop)
    if task is not None:
        _track(loop, task)
    try:
        return await _fire_async(runner, job, handler, args, schedule_id)
    finally:
        if task is not None:
            _untrack(loop, task)


def run_scheduled(
    *,
    job: str,
    handler: str,
    args: dict[str, Any],
    schedule_id: str,
    database_url: str | None = None,
) -> str:
    """What thread-based schedulers fire: submit and run one execution in this thread.

    Sync jobs run on a :class:`~jobrunner.JobRunner` shared by the process. A job with
    ``async def`` phases runs on a fresh event loop for this fire, with its own
    :class:`~jobrunner.AsyncJobRunner` closed before the loop ends (async engines cannot
    outlive their loop); that costs a new connection per fire. Returns the execution id;
    raises :class:`~jobrunner.ExecutionFailed` when the execution did not succeed.
    """
    url = _effective_url(database_url)
    job_cls = _registry().resolve_row(job, handler)
    if job_cls.spec.async_phases:
        return asyncio.run(_fire_on_fresh_loop(url, job_cls, args, schedule_id))
    runner = _sync_runner(url)
    execution_id = runner.submit(job_cls, args, triggered_by=TRIGGERED_BY, external_id=schedule_id)
    return _outcome(runner.run_execution(execution_id))


async def aclose_runners(grace: float | None = 30.0) -> None:
    """Close the runners of this event loop, after its fires in flight have ended.

    Call it after ``scheduler.shutdown()`` (e.g. at the end of a FastAPI lifespan): fires
    still running get up to ``grace`` seconds (None: no limit) to record how they ended. Note that
    ``AsyncIOScheduler.shutdown()`` cancels running fires (their executions go back to
    ``retrying``, due now, their attempt not counted, for a worker to finish);
    ``pause()`` the scheduler and call this first to let them finish here.
    """
    loop = asyncio.get_running_loop()
    with _lock:
        pending = {t for t in _inflight.get(loop, ()) if t is not asyncio.current_task()}
    if pending:
        await asyncio.wait(pending, timeout=grace)
    with _lock:
        mine = [key for key in _runners if key[1] is loop]
        runners = [_runners.pop(key) for key in mine]
        if not _inflight.get(loop):
            _inflight.pop(loop, None)
    for runner in runners:
        assert isinstance(runner, AsyncJobRunner)
        await runner.aclose()


def close_runners() -> None:
    """Close the shared sync runners (after a thread-based scheduler's ``shutdown()``)."""
    with _lock:
        mine = [key for key in _runners if key[1] is None]
        runners = [_runners.pop(key) for key in mine]
    for runner in runners:
        assert isinstance(runner, JobRunner)
        runner.close()


# -- firing -----------------------------------------------------------------------------------


async def _fire_async(
    runner: AsyncJobRunner, job: str, handler: str, args: dict[str, Any], schedule_id: str
) -> str:
    job_cls = runner.registry.resolve_row(job, handler)
    execution_id = await runner.submit(
        job_cls, args, triggered_by=TRIGGERED_BY, external_id=schedule_id
    )
    return _outcome(await runner.run_execution(execution_id))


async def _fire_on_fresh_loop(
    url: str, job_cls: type[PhasedJob], args: dict[str, Any], schedule_id: str
) -> str:
    async with AsyncJobRunner(url, registry=_registry(), **_settings.runner_options) as runner:
        return await _fire_async(runner, job_cls.name, job_cls.handler, args, schedule_id)


def _outcome(execution: Execution) -> str:
    """The execution id if it succeeded or waits for a worker (a retry, or a slot of its
    job's ``max_concurrency``: it is due, and ``jobrunner worker`` runs it), else raise."""
    if execution.status is ExecutionStatus.PENDING:
        logger.info(
            "jobrunner: execution %s of %s could not start now (its job is at its "
            "max_concurrency); it is due, for a worker to run",
            execution.id,
            execution.job,
            extra=execution.log_fields(),
        )
    if execution.status in (
        ExecutionStatus.SUCCEEDED,
        ExecutionStatus.RETRYING,
        ExecutionStatus.PENDING,
    ):
        return str(execution.id)
    raise ExecutionFailed(execution)


# -- runners, one per (database URL, event loop) ---------------------------------------------


def _shared_runner(url: str, loop: asyncio.AbstractEventLoop | None) -> AsyncJobRunner | JobRunner:
    """The runner fires share: async per (URL, loop), sync per URL (``loop=None``)."""
    with _lock:
        runner = _runners.get((url, loop))
        if runner is None:
            cls = JobRunner if loop is None else AsyncJobRunner
            runner = cls(url, registry=_registry(), **_settings.runner_options)
            _runners[(url, loop)] = runner
            where = "in threads" if loop is None else "on this loop"
            logger.info("scheduled fires %s use %s", where, display_url(url))
    return runner


def _async_runner(url: str, loop: asyncio.AbstractEventLoop) -> AsyncJobRunner:
    runner = _shared_runner(url, loop)
    assert isinstance(runner, AsyncJobRunner)
    return runner


def _sync_runner(url: str) -> JobRunner:
    runner = _shared_runner(url, None)
    assert isinstance(runner, JobRunner)
    return runner


def _track(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
    with _lock:
        _inflight.setdefault(loop, set()).add(task)


def _untrack(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
    with _lock:
        _inflight.get(loop, set()).discard(task)


# -- checks and settings ------------------------------------------------------------------------


def _registry() -> Registry:
    return _settings.registry if _settings.registry is not None else default_registry


def _render(url: str | URL) -> str:
    return url if isinstance(url, str) else url.render_as_string(hide_password=False)


def _effective_url(url: str | None) -> str:
    """The schedule's URL, else configure()'s, else JOBRUNNER_DATABASE_URL, else the default."""
    return _render(_env_or_default_url(url or _settings.database_url))


def _check_url(url: str | None) -> None:
    effective = _effective_url(url)
    parse_url(effective, is_async=False)  # ConfigurationError for a malformed URL
    if is_memory_sqlite(make_url(effective)):
        raise ConfigurationError(
            f"scheduled jobs cannot use an in-memory SQLite database ({display_url(effective)}): "
            "each runner would see its own empty database; use a file or PostgreSQL"
        )


def _fires_on_loop(scheduler: Any, executor_alias: str) -> bool:
    """Whether the job's executor runs coroutine functions on an event loop."""
    from apscheduler.executors.asyncio import AsyncIOExecutor
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    executor = getattr(scheduler, "_executors", {}).get(executor_alias)
    if executor is not None:
        return isinstance(executor, AsyncIOExecutor)
    return isinstance(scheduler, AsyncIOScheduler) and executor_alias == "default"


def _warn_if_unbounded(job_cls: type[PhasedJob], schedule_id: str, options: Any) -> None:
    if job_cls.timeout is None and options.get("max_instances") is not None:
        logger.warning(
            "job %r has no timeout: if a run hangs, schedule %r skips every later fire "
            "(max_instances=%s); set `timeout` on the job",
            job_cls.name,
            schedule_id,
            options["max_instances"],
            extra={"job": job_cls.name},
        )


def _require_apscheduler() -> None:
    try:
        import apscheduler
    except ImportError as exc:
        raise ImportError(
            f"jobrunner.contrib.apscheduler needs APScheduler 3.x: {_INSTALL_HINT}"
        ) from exc
    major = str(getattr(apscheduler, "__version__", "3")).split(".")[0]
    if major != "3":
        raise ConfigurationError(
            f"jobrunner.contrib.apscheduler supports APScheduler 3.x, found "
            f"{apscheduler.__version__}; {_INSTALL_HINT}"
        )
