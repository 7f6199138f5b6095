"""submit_many: many executions in one transaction, validated first, woken once."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from jobrunner import AsyncJobRunner, InvalidArgs, JobRunner, Registry

from ._services import wait_for
from .conftest import Backend
from .jobs import Greet


def _registry() -> Registry:
    return Registry([Greet])


def test_submit_many_stores_each_and_workers_run_them(backend: Backend) -> None:
    with JobRunner(backend.url, registry=_registry()) as runner:
        ids = runner.submit_many(Greet, [{"who": str(n)} for n in range(250)], priority=3)
        assert len(ids) == len(set(ids)) == 250
        stored = runner.list(limit=300)
        assert {e.id for e in stored} == set(ids)
        assert {(e.status.value, e.priority, e.queue) for e in stored} == {
            ("pending", 3, "default")
        }
        ran = runner.run_due(limit=300, concurrency=4)
        assert sorted(e.result for e in ran) == sorted(f"hello {n}" for n in range(250))
        assert runner.submit_many(Greet, []) == []


def test_one_invalid_args_stores_nothing_and_names_its_index(backend: Backend) -> None:
    with JobRunner(backend.url, registry=_registry()) as runner:
        with pytest.raises(InvalidArgs, match=r"args\[2\]"):
            runner.submit_many(Greet, [{"who": "a"}, {"who": "b"}, {"nobody": 1}])
        assert runner.list() == []


def test_submit_many_later_is_not_due_yet(backend: Backend) -> None:
    with JobRunner(backend.url, registry=_registry()) as runner:
        later = datetime.now(UTC) + timedelta(hours=1)
        ids = runner.submit_many(Greet, [{"who": "x"}, {"who": "y"}], run_at=later)
        assert runner.run_due() == []
        assert all(runner.get(i).due_at is not None for i in ids)
        soon = runner.submit_many(Greet, [{"who": "z"}], delay=3600, queue="q2")
        assert runner.get(soon[0]).queue == "q2" and runner.run_due() == []


def test_submit_many_in_the_callers_transaction(backend: Backend) -> None:
    with JobRunner(backend.url, registry=_registry()) as runner:
        with Session(runner.engine) as session:
            ids = runner.submit_many(Greet, [{"who": "kept"}] * 3, session=session)
            session.rollback()
        assert runner.list() == []  # rolled back with the caller's work
        with Session(runner.engine) as session, session.begin():
            ids = runner.submit_many(Greet, [{"who": "kept"}] * 3, session=session)
        assert {e.id for e in runner.list()} == set(ids)


async def test_async_submit_many_wakes_a_waiting_worker(backend: Backend) -> None:
    """The worker polls once an hour: only the submit's wake-up can start them."""
    runner = AsyncJobRunner(backend.url, registry=_registry())
    try:
        worker = asyncio.create_task(runner.work(concurrency=4, poll_interval=3600))
        ids = await runner.submit_many(Greet, [{"who": str(n)} for n in range(20)])
        for _ in range(2400):
            done = [await runner.get(i) for i in ids]
            if all(e.succeeded for e in done):
                break
            await asyncio.sleep(0.05)
        runner.stop_work()
        await worker
        assert all(e.succeeded for e in done)
    finally:
        await runner.aclose()


def test_notify_wakes_a_worker_in_another_runner(postgres: Backend) -> None:
    """PostgreSQL: one NOTIFY per queue at commit reaches a worker of another runner."""
    with (
        JobRunner(postgres.url, registry=_registry()) as worker,
        JobRunner(postgres.url, registry=_registry()) as submitter,
    ):
        thread = threading.Thread(
            target=worker.work, kwargs={"concurrency": 2, "poll_interval": 3600}
        )
        thread.start()
        try:
            wait_for(lambda: worker._worker is not None, "the worker to start")
            ids = submitter.submit_many(Greet, [{"who": "n"}] * 5)
            wait_for(lambda: all(submitter.get(i).succeeded for i in ids), "the notified worker")
        finally:
            worker.stop_work()
            thread.join()


async def test_a_large_async_submit_many_lets_the_loop_run_while_it_validates(
    backend: Backend,
) -> None:
    """Thousands of args are validated in short slices on the loop: it keeps ticking.

    (They were validated in a worker thread, and this test failed 1 run in 5: the thread
    held the GIL, and the loop went without it for up to 150 ms at a time.)
    """
    from pydantic import BaseModel, field_validator

    from jobrunner import PhasedJob

    from .support import LoopTicks

    seen: list[float] = []

    class Validated(PhasedJob):
        name = "many.validated"

        class Args(BaseModel):
            n: int

            @field_validator("n")
            @classmethod
            def _note(cls, value: int) -> int:
                seen.append(time.perf_counter())
                sum(range(2_000))  # a little CPU per item, as real validators take
                return value

        def execute(self, loaded: object) -> None:
            return None

    runner = AsyncJobRunner(backend.url, registry=Registry([Validated]))
    try:
        async with LoopTicks() as ticks:
            ids = await runner.submit_many(Validated, [{"n": n} for n in range(3_000)])
        assert len(ids) == 3_000
        ticks.assert_ticked_during([(seen[0], seen[-1])])
    finally:
        await runner.aclose()
