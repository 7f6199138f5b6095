"""Structured logs: `jobrunner worker --log-format json` prints one JSON object per line,
and every line about an execution carries its id, job, attempt and phase."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from jobrunner import JobRunner, Registry
from jobrunner.contrib.jsonlog import ExecutionContext, JsonFormatter

from . import observed_jobs
from .conftest import Backend

ROOT = Path(__file__).resolve().parent.parent


def test_worker_prints_json_lines_with_execution_fields(backend: Backend) -> None:
    """A worker run to idle: every stderr line is JSON; the flow's lines and the job's own
    (logged from execute) name the execution, job, attempt and phase."""
    with JobRunner(backend.url, instruments=[]) as runner:
        ok = {str(runner.submit(observed_jobs.Ok)) for _ in range(2)}
        bad = str(runner.submit(observed_jobs.Bad))
    command = [
        sys.executable,
        "-m",
        "jobrunner",
        "--database-url",
        backend.url,
        "--app",
        "tests.observed_jobs",
        "worker",
        "--log-format",
        "json",
        "--until-idle",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert lines, "the worker logged nothing"
    for line in lines:
        assert {
            "time",
            "level",
            "logger",
            "message",
            "execution_id",
            "job",
            "attempt",
            "phase",
        } <= set(line)
        if line["execution_id"] is not None:
            assert line["job"] is not None and line["attempt"] is not None, line

    hello = [line for line in lines if line["message"] == "observed ok says hello"]
    assert {line["execution_id"] for line in hello} == ok
    assert all(
        (line["logger"], line["job"], line["attempt"], line["phase"])
        == ("tests.observed", "observed.ok", 1, "execute")
        for line in hello
    )
    succeeded = [line for line in lines if "succeeded" in line["message"]]
    assert {line["execution_id"] for line in succeeded} == ok
    assert all(line["phase"] == "record" and line["job"] == "observed.ok" for line in succeeded)
    [failed] = [line for line in lines if line["execution_id"] == bad]
    assert (failed["level"], failed["job"], failed["attempt"], failed["phase"]) == (
        "warning",
        "observed.bad",
        1,
        "execute",
    )
    assert "ValueError" in failed["message"]


def test_formatter_fills_fields_from_the_running_phase(backend: Backend) -> None:
    """In process: a job's own record gets the fields of the phase it runs in; a record
    about no execution has them as null; extra fields are kept."""
    records: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(self.format(record)))

    handler = Collect()
    handler.addFilter(ExecutionContext())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.observed")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with JobRunner(backend.url, registry=Registry(), instruments=[]) as runner:
            execution = runner.run(observed_jobs.Ok)
        log.info("outside", extra={"answer": 42})
    finally:
        log.removeHandler(handler)
    inside, outside = records
    assert inside["execution_id"] == str(execution.id)
    assert (inside["job"], inside["attempt"], inside["phase"]) == ("observed.ok", 1, "execute")
    assert outside["execution_id"] is None and outside["answer"] == 42


def test_every_record_about_an_execution_has_the_four_fields(backend: Backend) -> None:
    """Without any filter: every jobrunner record that names an execution carries job,
    attempt and phase as extra too (success, retry, failure, retry scheduled, reaped,
    a retry not yet due)."""
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from jobrunner import ExecutionStatus, PhasedJob, RetryPolicy
    from jobrunner._schema import executions

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    class Later(PhasedJob):
        name = "observed.later"
        retry = RetryPolicy(max_attempts=2, wait_initial=3600, retry_on=(ConnectionError,))

        def execute(self, loaded: Any) -> None:
            raise ConnectionError("retry in an hour")

    handler = Keep()
    log = logging.getLogger("jobrunner")
    saved = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with JobRunner(backend.url, registry=Registry(), instruments=[]) as runner:
            runner.run(observed_jobs.Ok)
            runner.run(observed_jobs.Flaky)
            runner.run(observed_jobs.Bad)
            later = runner.run(Later)
            assert later.status is ExecutionStatus.RETRYING
            assert runner.run_execution(later.id).status is ExecutionStatus.RETRYING  # not due
            stuck = runner.submit(observed_jobs.Ok)
            runner.registry.register(observed_jobs.Ok)
            [claimed] = runner._claim_batch(1, None)
            with runner.engine.begin() as conn:
                conn.execute(
                    sa.update(executions)
                    .where(executions.c.id == claimed.execution_id)
                    .values(lease_expires_at=datetime.now(UTC) - timedelta(hours=1))
                )
            assert [e.id for e in runner.reap()] == [stuck]
    finally:
        log.removeHandler(handler)
        log.setLevel(saved)
    about = [r for r in records if getattr(r, "execution_id", None) is not None]
    messages = " | ".join(r.getMessage() for r in about)
    for word in ("succeeded", "retrying in", "ended failed", "will retry at", "reaped"):
        assert word in messages, word
    for record in about:
        for field in ("job", "attempt", "phase"):
            assert hasattr(record, field), (field, record.getMessage())
        assert record.job is not None and record.attempt is not None, record.getMessage()  # type: ignore[attr-defined]
