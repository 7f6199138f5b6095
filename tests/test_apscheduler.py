"""APScheduler integration: real schedulers fire real executions, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import pickle
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
    EVENT_SCHEDULER_SHUTDOWN,
)
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.background import BackgroundScheduler
from pydantic import BaseModel

from jobrunner import (
    AsyncJobRunner,
    ConfigurationError,
    Execution,
    ExecutionStatus,
    InvalidArgs,
    JobNotFound,
    JobRunner,
    PhasedJob,
)
from jobrunner.contrib import apscheduler as aps
from jobrunner.contrib.apscheduler import aclose_runners, close_runners, configure, schedule

from .conftest import Backend, assert_no_checked_out
from .support import LoopTicks

T = TypeVar("T")


class Tick(PhasedJob):
    """A quick sync job."""

    name = "tests.aps.tick"
    timeout = 5

    class Args(BaseModel):
        label: str

    def execute(self, args: Args) -> dict[str, str]:
        return {"label": args.label}


class AsyncTick(PhasedJob):
    """A quick async job."""

    name = "tests.aps.async_tick"
    timeout = 5

    class Args(BaseModel):
        label: str

    async def execute(self, args: Args) -> dict[str, str]:
        await asyncio.sleep(0)
        return {"label": args.label}


class Blocker(PhasedJob):
    """Sync work that holds its thread for half a second (sync SQL, S3, file I/O)."""

    name = "tests.aps.blocker"
    timeout = 5

    def execute(self, loaded: Any) -> None:
        started = time.perf_counter()
        BLOCKER_THREADS.append(threading.get_ident())
        time.sleep(0.5)
        BLOCKER_SPANS.append((started, time.perf_counter()))


#: Where and when each Blocker ran (its thread id, its blocking span on perf_counter).
BLOCKER_THREADS: list[int] = []
BLOCKER_SPANS: list[tuple[float, float]] = []


class AsyncHang(PhasedJob):
    """Never finishes on its own; its timeout cancels it."""

    name = "tests.aps.async_hang"
    timeout = 0.3

    async def execute(self, loaded: Any) -> None:
        await asyncio.sleep(60)


RELEASE = threading.Event()


class SyncHang(PhasedJob):
    """A sync execute stuck until its timeout asks it to stop (self.cancelled()); the
    attempt waits for its thread, so it ends only when the code does."""

    name = "tests.aps.sync_hang"
    timeout = 0.3

    def execute(self, loaded: Any) -> None:
        while not self.cancelled() and not RELEASE.is_set():
            RELEASE.wait(0.01)
        raise RuntimeError("gave up when asked")


# -- helpers ----------------------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[T]], what: str, deadline: float = 60.0) -> T:
    """Poll ``check`` until it returns something truthy, failing after ``deadline`` s."""
    end = time.monotonic() + deadline
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"waited {deadline}s for {what}")
        await asyncio.sleep(0.05)


def until_sync(check: Callable[[], T], what: str, deadline: float = 60.0) -> T:
    """``until`` for sync tests."""
    end = time.monotonic() + deadline
    while not (value := check()):
        if time.monotonic() > end:
            pytest.fail(f"waited {deadline}s for {what}")
        time.sleep(0.05)
    return value


@contextlib.asynccontextmanager
async def started(scheduler: AsyncIOScheduler) -> AsyncIterator[AsyncIOScheduler]:
    """Start ``scheduler``; on exit shut it down and wait until it says it has."""
    stopped = asyncio.Event()
    scheduler.add_listener(lambda _: stopped.set(), EVENT_SCHEDULER_SHUTDOWN)
    scheduler.start()
    try:
        yield scheduler
    finally:
        scheduler.shutdown(wait=False)
        await asyncio.wait_for(stopped.wait(), 10)


def count_events(scheduler: Any) -> collections.Counter[int]:
    """A live count of the scheduler's job events by code."""
    seen: collections.Counter[int] = collections.Counter()
    mask = (
        EVENT_JOB_SUBMITTED
        | EVENT_JOB_EXECUTED
        | EVENT_JOB_ERROR
        | EVENT_JOB_MAX_INSTANCES
        | EVENT_JOB_MISSED
    )
    scheduler.add_listener(lambda event: seen.update([event.code]), mask)
    return seen


def by_status(executions: list[Execution], status: ExecutionStatus) -> list[Execution]:
    """The executions in ``status``."""
    return [e for e in executions if e.status is status]


def sync_url(backend: Backend) -> str:
    """The backend's URL with a sync driver, for APScheduler's SQLAlchemyJobStore."""
    if not backend.is_postgres:
        return backend.url
    url = sa.make_url(backend.url).set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


async def close_loop_runners() -> None:
    """Let this loop's fires end, check their runners gave every connection back, close."""
    loop = asyncio.get_running_loop()
    pending = set(aps._inflight.get(loop, ()))
    if pending:
        await asyncio.wait(pending, timeout=10)
    for (_, owner), runner in list(aps._runners.items()):
        if owner is loop:
            assert isinstance(runner, AsyncJobRunner)
            assert_no_checked_out(runner.engine.pool, "scheduled fires' AsyncJobRunner")
    await aclose_runners()


@pytest.fixture
async def configured(backend: Backend) -> AsyncIterator[Backend]:
    """The backend set as the fires' default database; their runners closed afterwards."""
    configure(backend.url)
    yield backend
    await close_loop_runners()
    configure()


@pytest.fixture
def configured_sync(backend: Backend) -> Iterator[Backend]:
    """``configured`` for thread-based schedulers."""
    configure(backend.url)
    yield backend
    for (_, owner), runner in list(aps._runners.items()):
        if owner is None:
            assert isinstance(runner, JobRunner)
            assert_no_checked_out(runner.engine.pool, "scheduled fires' JobRunner")
    close_runners()
    configure()


# -- firing ------------------------------------------------------------------------------------


async def test_interval_fires_record_trigger_data(
    configured: Backend, arunner: AsyncJobRunner
) -> None:
    """Sync and async jobs on an AsyncIOScheduler interval become apscheduler executions."""
    scheduler = AsyncIOScheduler()
    schedule(scheduler, Tick, "interval", {"label": "s"}, id="tick-sync", seconds=0.2)
    schedule(scheduler, "tests.aps.async_tick", "interval", {"label": "a"}, seconds=0.2,
             id="tick-async")

    async def two_of_each() -> list[Execution]:
        done = by_status(await arunner.list(), ExecutionStatus.SUCCEEDED)
        ids = collections.Counter(e.external_id for e in done)
        return done if ids["tick-sync"] >= 2 and ids["tick-async"] >= 2 else []

    async with started(scheduler):
        done = await until(two_of_each, "two fires of each schedule")
    expected = {"tick-sync": ("tests.aps.tick", "s"), "tick-async": ("tests.aps.async_tick", "a")}
    for execution in done:
        assert execution.triggered_by == "apscheduler"
        job, label = expected[execution.external_id or ""]
        assert (execution.job, execution.args, execution.result) == (
            job, {"label": label}, {"label": label})


async def test_schedule_survives_restart_on_sqlalchemy_jobstore(
    configured: Backend, arunner: AsyncJobRunner
) -> None:
    """A schedule in SQLAlchemyJobStore keeps firing after the scheduler is replaced."""
    table = f"apscheduler_jobs_{uuid.uuid4().hex[:8]}"

    def new_scheduler() -> AsyncIOScheduler:
        store = SQLAlchemyJobStore(url=sync_url(configured), tablename=table)
        return AsyncIOScheduler(jobstores={"default": store})

    async def fired_since(moment: float) -> list[Execution]:
        done = by_status(await arunner.list(job=Tick.name), ExecutionStatus.SUCCEEDED)
        return [e for e in done if e.created_at.timestamp() > moment]

    first = new_scheduler()
    schedule(first, Tick, "interval", {"label": "kept"}, id="persisted", seconds=0.2)
    async with started(first):
        await until(lambda: fired_since(0), "a fire before the restart")
        first.pause()
        await aclose_runners()  # the documented graceful stop: fires in flight finish
    restarted_at = time.time()

    second = new_scheduler()
    async with started(second):
        [stored] = second.get_jobs()
        assert stored.id == "persisted"
        assert stored.func_ref == "jobrunner.contrib.apscheduler:run_scheduled_async"
        assert stored.kwargs["args"] == {"label": "kept"}
        after = await until(
            lambda: _at_least(2, fired_since(restarted_at)), "two fires after the restart"
        )
        second.remove_all_jobs()
    assert {(e.external_id, e.triggered_by) for e in after} == {("persisted", "apscheduler")}
    engine = sa.create_engine(sync_url(configured))
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {table}"))
    engine.dispose()


async def _at_least(n: int, pending: Awaitable[list[T]]) -> list[T]:
    found = await pending
    return found if len(found) >= n else []


async def test_blocking_sync_job_never_stalls_the_loop(
    configured: Backend, arunner: AsyncJobRunner
) -> None:
    """A 0.5 s sync job fired every 0.2 s: it runs off the loop, which ticks on meanwhile."""
    scheduler = AsyncIOScheduler()
    events = count_events(scheduler)
    # Runs overlap (0.5 s work, 0.2 s interval), so allow them; the default (1) would skip.
    schedule(scheduler, Blocker, "interval", id="blocker", seconds=0.2, max_instances=4)
    BLOCKER_THREADS.clear()
    BLOCKER_SPANS.clear()

    async def all_fires_ended() -> bool:
        return events[EVENT_JOB_EXECUTED] + events[EVENT_JOB_ERROR] == events[EVENT_JOB_SUBMITTED]

    async with started(scheduler), LoopTicks() as ticks:
        await until(lambda: _true(events[EVENT_JOB_SUBMITTED] >= 6), "six fires")
        scheduler.pause()
        await until(all_fires_ended, "the fires in flight to end")

    # The behaviour, not a millisecond bound: every blocking call ran on another thread,
    # and the loop kept running while each one slept.
    assert threading.get_ident() not in BLOCKER_THREADS
    ticks.assert_ticked_during(BLOCKER_SPANS)
    assert events[EVENT_JOB_MAX_INSTANCES] == events[EVENT_JOB_MISSED] == 0
    executions = await arunner.list(job=Blocker.name)
    assert len(executions) == events[EVENT_JOB_SUBMITTED] == len(BLOCKER_SPANS)
    assert all(e.status is ExecutionStatus.SUCCEEDED for e in executions)
    assert all(e.execute_ms is not None and e.execute_ms >= 500 for e in executions)
    assert {(e.triggered_by, e.external_id) for e in executions} == {("apscheduler", "blocker")}


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("job", [AsyncHang, SyncHang], ids=["async", "sync"])
async def test_hung_execution_times_out_and_the_next_fire_runs(
    configured: Backend, arunner: AsyncJobRunner, job: type[PhasedJob]
) -> None:
    """With the default max_instances=1, a run that hangs ends timed_out; fires go on."""
    scheduler = AsyncIOScheduler()
    schedule(scheduler, job, "interval", id="hangs", seconds=0.2)
    RELEASE.clear()
    try:
        async with started(scheduler):
            timed_out = await until(
                lambda: _at_least(3, _in_status(arunner, job, ExecutionStatus.TIMED_OUT)),
                "three timed-out fires",
            )
    finally:
        RELEASE.set()  # abandoned sync threads may end now
    assert len({e.id for e in timed_out}) >= 3
    assert all(e.error_type == "jobrunner.JobTimedOut" for e in timed_out)


async def _in_status(
    runner: AsyncJobRunner, job: type[PhasedJob], status: ExecutionStatus
) -> list[Execution]:
    return await runner.list(job=job.name, status=status)


def test_background_scheduler_runs_sync_and_async_jobs(
    configured_sync: Backend, runner: JobRunner
) -> None:
    """BackgroundScheduler fires sync jobs on JobRunner and async ones on a fresh loop."""
    scheduler = BackgroundScheduler()
    schedule(scheduler, Tick, "interval", {"label": "s"}, id="bg-sync", seconds=0.2)
    schedule(scheduler, AsyncTick, "interval", {"label": "a"}, id="bg-async", seconds=0.2)
    assert scheduler.get_job("bg-sync").func_ref == "jobrunner.contrib.apscheduler:run_scheduled"

    def both_fired() -> set[str | None]:
        done = by_status(runner.list(), ExecutionStatus.SUCCEEDED)
        ids = {e.external_id for e in done}
        return ids if ids == {"bg-sync", "bg-async"} else set()

    scheduler.start()
    try:
        until_sync(both_fired, "a fire of each schedule")
    finally:
        scheduler.shutdown(wait=True)
    assert {e.triggered_by for e in runner.list()} == {"apscheduler"}


async def test_fastapi_example_serves_health_while_the_sync_job_blocks(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/apscheduler_fastapi.py starts, both jobs fire, /health stays fast meanwhile."""
    monkeypatch.setenv("JOBRUNNER_DATABASE_URL", backend.url)
    app = importlib.import_module("examples.apscheduler_fastapi").app
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://example")

    async def purge(status: str) -> list[dict[str, Any]]:
        rows = (await client.get("/executions")).json()
        purges = [r for r in rows if r["job"] == "example.purge_soft_deleted"]
        return [r for r in purges if r["status"] == status]

    async def both_succeeded() -> list[dict[str, Any]]:
        rows = (await client.get("/executions")).json()
        done = {r["job"] for r in rows if r["status"] == "succeeded"}
        return rows if done == {"example.refresh_rates", "example.purge_soft_deleted"} else []

    try:
        async with app.router.lifespan_context(app), client:
            await until(lambda: purge("running"), "the blocking purge to start")
            for _ in range(5):
                assert (await client.get("/health")).json() == {"status": "ok"}
            # Had the 2 s blocking purge run on the loop, /health could only have answered
            # after it finished: it is still running, so the loop served while it blocked.
            assert await purge("running"), "the purge ended before /health answered"
            rows = await until(both_succeeded, "both jobs to succeed")
    finally:
        configure()
    assert {(r["triggered_by"], r["schedule"]) for r in rows} == {
        ("apscheduler", "refresh-rates"), ("apscheduler", "purge-soft-deleted")}


# -- validation at schedule() time ----------------------------------------------------------------


def test_unknown_job_name_fails_at_schedule() -> None:
    """A misspelt job name raises JobNotFound with a suggestion; nothing is scheduled."""
    scheduler = AsyncIOScheduler()
    with pytest.raises(JobNotFound, match=r"did you mean 'tests\.aps\.tick'"):
        schedule(scheduler, "tests.aps.tikc", "interval", {"label": "x"}, seconds=1)
    assert scheduler.get_jobs() == []


def test_bad_args_fail_at_schedule() -> None:
    """Args the job's model rejects raise InvalidArgs naming the field; nothing is scheduled."""
    scheduler = BackgroundScheduler()
    with pytest.raises(InvalidArgs, match="label"):
        schedule(scheduler, Tick, "interval", {"labl": "x"}, seconds=1)
    assert scheduler.get_jobs() == []


@pytest.mark.parametrize(
    "url", ["mysql://db/app", "sqlite://", "not a url"], ids=["mysql", "memory", "garbage"]
)
def test_unusable_database_url_fails_at_schedule(url: str) -> None:
    """A database URL the fires could not use is refused before anything is added."""
    scheduler = AsyncIOScheduler()
    with pytest.raises(ConfigurationError):
        schedule(scheduler, Tick, "interval", {"label": "x"}, database_url=url, seconds=1)
    assert scheduler.get_jobs() == []


def test_schedule_is_stored_by_text_reference_with_plain_kwargs() -> None:
    """The APScheduler job pickles: a text callable reference and plain-data kwargs."""
    scheduler = BackgroundScheduler()
    scheduler.start(paused=True)
    try:
        job = schedule(scheduler, Tick, "interval", {"label": "x"}, id="plain", seconds=1)
        state = pickle.loads(pickle.dumps(job.__getstate__()))
    finally:
        scheduler.shutdown()
    assert state["func"] == "jobrunner.contrib.apscheduler:run_scheduled"
    assert state["kwargs"] == {
        "job": "tests.aps.tick",
        "handler": "tests.test_apscheduler:Tick",
        "args": {"label": "x"},
        "schedule_id": "plain",
        "database_url": None,
    }
    assert (state["name"], state["max_instances"], state["coalesce"]) == ("tests.aps.tick", 1, True)
    assert state["misfire_grace_time"] is None


def test_a_fire_at_its_concurrency_limit_is_left_due_for_a_worker(
    configured_sync: Backend, runner: JobRunner
) -> None:
    """While one execution holds the only slot, a fire stores its execution due, not
    failed and not lost; a worker runs it once the slot is free."""
    from jobrunner import _queries as q

    class OneAtATime(PhasedJob):
        name = "tests.aps.one_at_a_time"
        max_concurrency = 1

        def execute(self, loaded: Any) -> str:
            return "ran"

    runner.registry.register(OneAtATime)
    aps.configure(configured_sync.url, registry=runner.registry)
    holder = runner.submit(OneAtATime)
    with runner.engine.begin() as conn:  # another process runs one now
        assert q.claim_one(conn, holder, worker="elsewhere", lease_s=60)
    fired = aps.run_scheduled(job=OneAtATime.name, handler=OneAtATime.handler, args={},
                              schedule_id="every-minute")
    execution = runner.get(fired)
    assert execution.status is ExecutionStatus.PENDING and execution.due_at is not None
    with runner.engine.begin() as conn:  # the other one finishes
        conn.execute(sa.text("update jobrunner_executions set status = 'succeeded', "
                             "checkpointed = true where status = 'running'"))
    [ran] = runner.run_due()
    assert ran.id == execution.id and ran.succeeded and ran.triggered_by == "apscheduler"
