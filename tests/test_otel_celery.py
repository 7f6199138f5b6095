"""OpenTelemetry through Celery: the web side's PRODUCER span, stored on the row, is the
parent of the spans a real prefork worker makes (exported by the worker to a JSON-lines
file), for a sync job, an async job, and a job retried through the broker."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobrunner import ExecutionStatus
from jobrunner.contrib.celery import CeleryJobs, install
from jobrunner.contrib.otel import OpenTelemetry

from ._services import stop_process, wait_for
from .test_celery import JOB, _create_schema, _forget, _start, broker_url  # noqa: F401

pytestmark = pytest.mark.broker


class Rig:
    """A traced client, a worker writing its spans to a file, and both sides' spans."""

    def __init__(self, jobs: CeleryJobs, exporter: InMemorySpanExporter, spans: Path) -> None:
        self.jobs = jobs
        self.exporter = exporter
        self.spans_file = spans

    def worker_spans(self) -> list[dict[str, Any]]:
        if not self.spans_file.exists():
            return []
        return [json.loads(line) for line in self.spans_file.read_text().splitlines() if line]

    def producer(self, execution_id: uuid.UUID) -> Any:
        [span] = [
            s for s in self.exporter.get_finished_spans()
            if s.name.startswith("create ")
            and s.attributes["messaging.message.id"] == str(execution_id)
        ]
        return span

    def processed(self, execution_id: uuid.UUID, attempts: int = 1) -> list[dict[str, Any]]:
        """The worker's process spans of the execution, once all ``attempts`` are there."""

        def found() -> list[dict[str, Any]] | None:
            spans = [
                s for s in self.worker_spans()
                if s["name"].startswith("process ")
                and s["attributes"]["messaging.message.id"] == str(execution_id)
            ]
            return spans if len(spans) >= attempts else None

        return sorted(wait_for(found, f"the worker's spans of {execution_id}", 60),
                      key=lambda s: s["attributes"]["jobrunner.attempt"])


@pytest.fixture(scope="module")
def rig(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:  # noqa: F811
    """A prefork worker (concurrency 1) of tests.celery_otel_app on a SQLite store."""
    folder = tmp_path_factory.mktemp("otel-celery")
    url = f"sqlite:///{folder / 'jobs.db'}"
    _create_schema(url)
    queue = f"jobrunner-otel-{uuid.uuid4().hex[:10]}"
    spans = folder / "spans.jsonl"
    env = {"JOBRUNNER_DATABASE_URL": url, "JOBRUNNER_TEST_BROKER": broker_url,
           "JOBRUNNER_TEST_QUEUE": queue, "JOBRUNNER_TEST_SPANS": str(spans)}
    cmd = [sys.executable, "-m", "celery", "-A", "tests.celery_otel_app", "worker",
           "--pool=prefork", "--concurrency=1", "-Q", queue, "--loglevel=INFO",
           "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{queue}@%h"]
    log = folder / "worker.log"
    proc = _start(cmd, env, log)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Celery(f"client-{queue}", broker=broker_url, backend=broker_url)
    app.conf.update(task_default_queue=queue, worker_enable_remote_control=False)
    jobs = install(app, database_url=url, instruments=[OpenTelemetry(provider)])
    try:
        yield Rig(jobs, exporter, spans)
    finally:
        assert stop_process(proc) == 0, log.read_text()[-3000:]
        jobs.close()
        provider.shutdown()
        _forget(broker_url, queue)


def _done(rig: Rig, eid: uuid.UUID) -> Any:
    def finished() -> Any:
        execution = rig.jobs.runner.get(eid)
        return execution if execution.status.is_terminal else None

    return wait_for(finished, f"execution {eid}", 60)


@pytest.mark.parametrize("job", ["sync_probe", "async_probe"])
def test_worker_spans_continue_the_enqueuers_trace(rig: Rig, job: str) -> None:
    """enqueue() under a request span: the worker's process span is the producer's child
    and links to it; load, execute and record are its children; semconv attributes."""
    eid = rig.jobs.enqueue(f"{JOB}.{job}", {"n": 1})
    execution = _done(rig, eid)
    assert execution.status is ExecutionStatus.SUCCEEDED, execution.error_message
    create = rig.producer(eid)
    producer_id = f"{create.get_span_context().span_id:016x}"
    trace_id = f"{create.get_span_context().trace_id:032x}"
    assert execution.trace_context is not None
    assert execution.trace_context["traceparent"].startswith(f"00-{trace_id}-{producer_id}-")
    [process] = rig.processed(eid)
    assert process["kind"] == "CONSUMER" and process["status"] == "UNSET"
    assert (process["trace_id"], process["parent_id"]) == (trace_id, producer_id)
    assert process["links"] == [producer_id]
    attributes = process["attributes"]
    assert attributes["messaging.system"] == "jobrunner"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.client.id"] == execution.worker
    assert attributes["jobrunner.job"] == f"{JOB}.{job}"
    children = [s for s in rig.worker_spans() if s["parent_id"] == process["span_id"]]
    # a span per phase the job defines (SyncProbe has no record of its own)
    defined = ["execute", "load", "record"] if job == "async_probe" else ["execute", "load"]
    assert sorted(s["name"] for s in children) == defined
    assert all(s["trace_id"] == trace_id and s["kind"] == "INTERNAL" for s in children)
    assert process["pid"] == execution.result["pid"]  # made in the pool process that ran it


def test_retries_through_the_broker_are_spans_of_one_trace(rig: Rig) -> None:
    """A job retried by Celery countdowns: one process span per attempt, each the
    producer's child, the failed ones ERROR with a retry_scheduled event."""
    eid = rig.jobs.enqueue(f"{JOB}.async_flaky")
    execution = _done(rig, eid)
    assert execution.status is ExecutionStatus.SUCCEEDED and execution.attempt == 3
    producer_id = f"{rig.producer(eid).get_span_context().span_id:016x}"
    spans = rig.processed(eid, attempts=3)
    assert [s["attributes"]["jobrunner.attempt"] for s in spans] == [1, 2, 3]
    assert [s["status"] for s in spans] == ["ERROR", "ERROR", "UNSET"]
    assert [s["events"] for s in spans] == [["retry_scheduled"], ["retry_scheduled"], []]
    assert all(s["parent_id"] == producer_id and s["links"] == [producer_id] for s in spans)
    assert spans[0]["attributes"]["error.type"] == "ConnectionError"
