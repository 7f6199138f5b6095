"""The instrumentation seam: what an instrument hears, in order, and that a failing one
never fails a job."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import pytest

from jobrunner import (
    AsyncJobRunner,
    AttemptObserver,
    AttemptView,
    ExecutionStatus,
    Instrument,
    JobRunner,
    PhasedJob,
    Registry,
    RetryPolicy,
)

from .conftest import Backend


class Recorder(Instrument):
    """Writes down every call, as (event, details)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def submitted(self, row: dict[str, Any], *, inline: bool) -> None:
        self.events.append(("submitted", row["job"], inline))

    def attempt_started(self, attempt: AttemptView) -> AttemptObserver | None:
        self.events.append(("attempt", attempt.attempt, attempt.due_at is not None))
        return _Observer(self.events)

    def reaped(self, executions: Any) -> None:
        self.events.append(("reaped", len(executions)))


class _Observer(AttemptObserver):
    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        self.events = events

    def phase_started(self, phase: str) -> None:
        self.events.append(("start", phase))

    def phase_ended(self, phase: str, seconds: float, error: BaseException | None) -> None:
        assert seconds >= 0
        self.events.append(("end", phase, type(error).__name__ if error else None))

    def retry_scheduled(self, wait: float, due_at: datetime | None) -> None:
        self.events.append(("retry", wait))

    def lease_lost(self) -> None:
        self.events.append(("lease_lost",))

    def attempt_ended(self, outcome: str, execution: Any, error: Any) -> None:
        self.events.append(("ended", outcome, error.type if error else None))


class Flaky(PhasedJob):
    name = "hooks.flaky"
    retry = RetryPolicy(max_attempts=2, wait_initial=0.01, jitter=0, retry_on=(ConnectionError,))

    def execute(self, loaded: Any) -> str:
        if self.attempt == 1:
            raise ConnectionError("once")
        return "ok"


PHASES_OK = [("start", "load"), ("end", "load", None), ("start", "execute"),
             ("end", "execute", None), ("start", "record"), ("end", "record", None)]


def test_an_inline_retry_is_heard_in_order(backend: Backend) -> None:
    """run() with one retryable failure: submit (inline), attempt 1 fails in execute and
    schedules a retry, attempt 2 (claimed again, so it has a due time) succeeds."""
    recorder = Recorder()
    with JobRunner(backend.url, registry=Registry(), instruments=[recorder]) as runner:
        assert runner.run(Flaky).status is ExecutionStatus.SUCCEEDED
    assert recorder.events == [
        ("submitted", "hooks.flaky", True),
        ("attempt", 1, False),
        ("start", "load"), ("end", "load", None),
        ("start", "execute"), ("end", "execute", "ConnectionError"),
        ("retry", 0.01),
        ("ended", "retried", "ConnectionError"),
        ("attempt", 2, True),
        *PHASES_OK,
        ("ended", "succeeded", None),
    ]


async def test_the_async_runner_tells_the_same(backend: Backend) -> None:
    """AsyncJobRunner, submit then run_due: the same story (a sync execute in a thread)."""
    recorder = Recorder()
    runner = AsyncJobRunner(backend.url, registry=Registry([Flaky]), instruments=[recorder])
    try:
        eid = await runner.submit(Flaky)
        await runner.run_due()  # attempt 1 fails; its retry is left for a worker
        while (await runner.get(eid)).status is ExecutionStatus.RETRYING:
            await runner.run_due()  # the retry comes due 10 ms later
            await asyncio.sleep(0.01)  # polling a condition: give the loop a turn
    finally:
        await runner.aclose()
    assert recorder.events[0] == ("submitted", "hooks.flaky", False)
    assert recorder.events[1] == ("attempt", 1, True)
    assert ("ended", "retried", "ConnectionError") in recorder.events
    assert recorder.events[-8:] == [("attempt", 2, True), *PHASES_OK, ("ended", "succeeded", None)]


class Broken(Instrument):
    """Raises from everything it is told."""

    def submitted(self, row: dict[str, Any], *, inline: bool) -> None:
        raise RuntimeError("instrument bug")

    def attempt_started(self, attempt: AttemptView) -> AttemptObserver | None:
        return _BrokenObserver()


class _BrokenObserver(AttemptObserver):
    def phase_started(self, phase: str) -> None:
        raise RuntimeError("instrument bug")

    def attempt_ended(self, outcome: str, execution: Any, error: Any) -> None:
        raise RuntimeError("instrument bug")


def test_a_failing_instrument_never_fails_a_job(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """Every hook raising: the execution still succeeds; the failures are logged, and the
    other instruments still hear everything."""
    recorder = Recorder()
    with (
        JobRunner(backend.url, registry=Registry(), instruments=[Broken(), recorder]) as r,
        caplog.at_level(logging.WARNING, logger="jobrunner.hooks"),
    ):
        execution = r.run(Flaky)
    assert execution.status is ExecutionStatus.SUCCEEDED and execution.attempt == 2
    assert recorder.events[-1] == ("ended", "succeeded", None)
    failures = [rec.getMessage() for rec in caplog.records if rec.name == "jobrunner.hooks"]
    assert any("failed in submitted" in m for m in failures)
    assert any("failed in phase_started" in m for m in failures)
    assert any("failed in attempt_ended" in m for m in failures)
