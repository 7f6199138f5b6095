"""Event-loop health: blocking phases are named, measured, and fail in strict mode."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from jobrunner import (
    AsyncJobRunner,
    ExecutionStatus,
    LoopMonitor,
    PhasedJob,
    Registry,
    monitor_blocking,
)

from .conftest import Backend
from .support import LoopTicks

LOOP_LOGGER = "jobrunner.loop"


class Blocks(PhasedJob, register=False):
    """Calls time.sleep on the loop: the failure from the background write-ups."""

    name = "cleanup.blocking"

    async def execute(self, loaded: Any) -> str:
        time.sleep(0.3)
        await asyncio.sleep(0)
        return "done"


async def test_a_blocking_async_execute_is_named_and_measured(
        arunner: AsyncJobRunner, caplog: pytest.LogCaptureFixture) -> None:
    """time.sleep(0.3) in async execute: a warning naming job and phase, lag >= 250 ms."""
    caplog.set_level(logging.WARNING, logger=LOOP_LOGGER)
    execution = await arunner.run(Blocks)
    assert execution.succeeded
    assert execution.max_loop_lag_ms is not None and execution.max_loop_lag_ms >= 250
    [record] = [r for r in caplog.records if r.name == LOOP_LOGGER]
    assert "execute of job cleanup.blocking" in record.getMessage()
    assert record.execution_id == str(execution.id) and record.phase == "execute"
    [attempt] = await arunner.attempts(execution.id)
    assert attempt.max_loop_lag_ms is not None and attempt.max_loop_lag_ms >= 250


async def test_strict_loop_fails_a_blocking_phase_saying_how_to_fix_it(
        backend: Backend) -> None:
    """strict_loop=True turns the blocking phase into a failure that names self.to_thread."""
    runner = AsyncJobRunner(backend.url, registry=Registry(), strict_loop=True)

    class BlocksLast(PhasedJob):
        async def execute(self, loaded: Any) -> None:
            time.sleep(0.15)  # the step that blocks is also the last one

    try:
        for job in (Blocks, BlocksLast):
            execution = await runner.run(job)
            assert execution.status is ExecutionStatus.FAILED and execution.phase == "execute"
            assert execution.error_type == "jobrunner.LoopBlocked"
            assert "held the event loop for" in (execution.error_message or "")
            assert "self.to_thread" in (execution.error_message or "")
    finally:
        await runner.aclose()


async def test_to_thread_keeps_the_loop_free(arunner: AsyncJobRunner,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The same blocking call through self.to_thread: off the loop, which ticks meanwhile,
    and the phase is never named as blocking it."""
    caplog.set_level(logging.WARNING, logger=LOOP_LOGGER)
    threads: list[int] = []
    spans: list[tuple[float, float]] = []

    def blocking_call() -> None:
        threads.append(threading.get_ident())
        started = time.perf_counter()
        time.sleep(0.3)
        spans.append((started, time.perf_counter()))

    class Offloaded(PhasedJob):
        async def execute(self, loaded: Any) -> str:
            await self.to_thread(blocking_call)
            return "done"

    async with LoopTicks() as ticks:
        execution = await arunner.run(Offloaded)
    assert execution.succeeded
    assert threads and threading.get_ident() not in threads
    ticks.assert_ticked_during(spans)
    blamed = [r for r in caplog.records if getattr(r, "execution_id", None) == str(execution.id)]
    assert blamed == []


async def test_monitor_blocking_decorator_counts_time_on_the_loop_only(
        caplog: pytest.LogCaptureFixture) -> None:
    """The decorator logs a step that blocks, not time spent awaiting."""
    caplog.set_level(logging.WARNING, logger=LOOP_LOGGER)

    @monitor_blocking(threshold_ms=50)
    async def awaits() -> str:
        await asyncio.sleep(0.15)
        return "fine"

    @monitor_blocking(threshold_ms=50, name="parse report")
    async def blocks() -> str:
        time.sleep(0.1)
        await asyncio.sleep(0)
        return "blocked"

    assert await awaits() == "fine"
    assert caplog.records == []
    assert await blocks() == "blocked"
    [record] = caplog.records
    assert record.getMessage().startswith("parse report held the event loop for")


def test_monitor_blocking_as_a_context_manager(caplog: pytest.LogCaptureFixture) -> None:
    """Around synchronous code it logs when the block ran longer than the threshold."""
    caplog.set_level(logging.WARNING, logger=LOOP_LOGGER)
    with monitor_blocking(1000, name="quick"):
        pass
    with monitor_blocking(20, name="slow parse"):
        time.sleep(0.05)
    assert [r.getMessage().split(" held")[0] for r in caplog.records] == ["slow parse"]


async def test_loop_monitor_reports_lag_caused_by_other_code(
        caplog: pytest.LogCaptureFixture) -> None:
    """A stall outside any job is logged as such, and listeners hear every sample."""
    caplog.set_level(logging.WARNING, logger=LOOP_LOGGER)
    monitor = LoopMonitor(interval=0.01, threshold_ms=80)
    heard: list[float] = []
    monitor.add_listener(heard.append)
    monitor.start()
    try:
        deadline = time.monotonic() + 5
        while monitor.samples < 3:  # quiet samples first, so the stall stands out
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        quiet = monitor.max_lag_ms
        time.sleep(0.2)  # other code blocks the loop
        deadline = time.monotonic() + 5
        while monitor.max_lag_ms < 150 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await monitor.stop()
    # The stall stands out against the quiet samples taken before it, on any machine.
    assert quiet < monitor.max_lag_ms and monitor.max_lag_ms >= 150
    assert monitor.samples == len(heard) > 3
    assert any("not in any jobrunner phase step" in r.getMessage() for r in caplog.records)


async def test_slow_phases_are_logged_with_their_duration(
        backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    """A phase over slow_phase_threshold logs its duration and execution id."""
    caplog.set_level(logging.WARNING, logger="jobrunner")
    runner = AsyncJobRunner(backend.url, registry=Registry(), slow_phase_threshold=0.05)

    class Slowish(PhasedJob):
        name = "reports.slowish"

        async def execute(self, loaded: Any) -> None:
            await asyncio.sleep(0.1)

    try:
        execution = await runner.run(Slowish)
    finally:
        await runner.aclose()
    [record] = [r for r in caplog.records if "took" in r.getMessage()]
    assert record.getMessage().startswith("execute of job reports.slowish")
    assert record.execution_id == str(execution.id) and record.duration_ms >= 100
