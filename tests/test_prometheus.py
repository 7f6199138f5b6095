"""Prometheus: a real /metrics endpoint scraped over HTTP after a known set of executions,
in this process (a registry of the test's own) and from `jobrunner worker --metrics-port`."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from jobrunner import AsyncJobRunner, ExecutionStatus, JobRunner, PhasedJob, Registry
from jobrunner._schema import executions
from jobrunner.contrib.prometheus import DatabaseCollector, Metrics, serve

from . import observed_jobs
from ._services import free_port, stop_process, wait_for
from .conftest import Backend

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_LABELS = {"job", "queue", "outcome", "phase", "status", "le"}


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics and parse it: {(sample name, labels): value}."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def jobrunner_labels(samples: dict[Any, float]) -> set[str]:
    return {k for (name, labels) in samples if name.startswith("jobrunner_") for k, _ in labels}


class Clock:
    """A clock the test moves by hand (the collector's cache)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def measured(backend: Backend) -> Iterator[tuple[JobRunner, CollectorRegistry, int, Any, Clock]]:
    """A JobRunner measured into a registry of the test's own, served over HTTP, with the
    database collector (on a hand-moved clock) registered beside it."""
    registry = CollectorRegistry()
    runner = JobRunner(backend.url, registry=Registry(), instruments=[Metrics(registry)])
    clock = Clock()
    collector = DatabaseCollector(backend.url, clock=clock)
    registry.register(collector)
    server = serve(0, "127.0.0.1", registry)
    yield runner, registry, server.port, collector, clock
    server.close()
    collector.close()
    runner.close()


def test_metrics_after_a_known_set_of_executions(
    measured: tuple[JobRunner, CollectorRegistry, int, Any, Clock],
) -> None:
    """3 succeeded, 1 failed, 1 retried then succeeded, 2 left waiting in another queue,
    1 reaped: the counters, histograms and database gauges say exactly that."""
    runner, _, port, collector, clock = measured
    for job in (observed_jobs.Ok, observed_jobs.Bad, observed_jobs.Flaky):
        runner.registry.register(job)
    ok = [runner.submit(observed_jobs.Ok) for _ in range(3)]
    bad = runner.submit(observed_jobs.Bad)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    backlog = [runner.submit(observed_jobs.Ok, queue="backlog", run_at=hour_ago) for _ in range(2)]
    runner.run_due(queues=["default"])
    flaky = runner.run(observed_jobs.Flaky)  # inline: fails once, retried inline
    assert flaky.status is ExecutionStatus.SUCCEEDED and flaky.attempt == 2
    assert runner.get(bad).status is ExecutionStatus.FAILED
    assert all(runner.get(e).succeeded for e in ok)

    samples = scrape(port)
    total = "jobrunner_executions_total"
    assert value(samples, total, job="observed.ok", queue="default", outcome="succeeded") == 3
    assert value(samples, total, job="observed.bad", queue="default", outcome="failed") == 1
    assert value(samples, total, job="observed.flaky", queue="default", outcome="retried") == 1
    assert value(samples, total, job="observed.flaky", queue="default", outcome="succeeded") == 1
    count = "jobrunner_execution_duration_seconds_count"
    assert value(samples, count, job="observed.ok", queue="default") == 3
    assert value(samples, count, job="observed.flaky", queue="default") == 2
    phases = "jobrunner_phase_duration_seconds_count"
    for phase in ("load", "execute", "record"):
        assert value(samples, phases, job="observed.ok", phase=phase) == 3
    assert value(samples, phases, job="observed.bad", phase="execute") == 1
    assert value(samples, phases, job="observed.bad", phase="record") == 0  # never ran
    # Buckets reach hours: a job of hours still lands in a bucket of its own.
    buckets = {
        float(dict(labels)["le"])
        for (name, labels) in samples
        if name == "jobrunner_phase_duration_seconds_bucket"
    }
    assert max(b for b in buckets if b != float("inf")) >= 3600
    wait = "jobrunner_queue_wait_seconds_count"
    assert value(samples, wait, job="observed.ok", queue="default") == 3
    gauge = "jobrunner_executions"
    assert value(samples, gauge, status="pending", queue="backlog") == 2
    assert value(samples, gauge, status="running", queue="backlog") == 0
    oldest = value(samples, "jobrunner_oldest_due_age_seconds", queue="backlog")
    assert oldest is not None and oldest >= 3600
    assert jobrunner_labels(samples) <= ALLOWED_LABELS  # no ids, no keys
    assert collector.reads == 1

    # Reaped: an execution claimed by a worker that died (its lease in the past).
    dead = JobRunner(runner.engine.url.render_as_string(hide_password=False), instruments=[])
    try:
        [claimed] = dead._claim_batch(1, ["backlog"])
    finally:
        dead.close()
    with runner.engine.begin() as conn:
        conn.execute(
            sa.update(executions)
            .where(executions.c.id == claimed.execution_id)
            .values(lease_expires_at=hour_ago)
        )
    assert [e.id for e in runner.reap()] == [claimed.execution_id]

    cached = scrape(port)  # within the cache window: the database is not read again
    assert collector.reads == 1
    assert value(cached, gauge, status="pending", queue="backlog") == 2
    assert value(cached, "jobrunner_leases_reaped_total") == 1

    clock.now += 11  # past the cache window: read again
    runner.run_due(queues=["backlog"])
    for eid in backlog:  # the reaped one had no attempt left (Ok allows one)
        wanted = (
            ExecutionStatus.FAILED if eid == claimed.execution_id else ExecutionStatus.SUCCEEDED
        )
        assert runner.get(eid).status is wanted
    fresh = scrape(port)
    assert collector.reads == 2
    assert value(fresh, gauge, status="pending", queue="backlog") == 0
    assert value(fresh, gauge, status="retrying", queue="backlog") == 0
    assert value(fresh, "jobrunner_oldest_due_age_seconds", queue="backlog") is None  # none due

    # The Grafana dashboard shipped in the docs queries only series that exist.
    dashboard = (ROOT / "docs" / "grafana" / "jobrunner.json").read_text()
    queried = set(re.findall(r"jobrunner_[a-z_]+", dashboard)) - {"jobrunner"}
    scraped = {name for name, _ in fresh} | {name for name, _ in samples}
    assert queried and queried <= scraped, sorted(queried - scraped)


async def test_loop_lag_is_sampled(backend: Backend) -> None:
    """AsyncJobRunner's loop monitor feeds jobrunner_event_loop_lag_seconds."""
    registry = CollectorRegistry()
    runner = AsyncJobRunner(backend.url, registry=Registry(), instruments=[Metrics(registry)])

    class Waits(PhasedJob):
        name = "observed.waits_for_samples"

        async def execute(self, loaded: Any) -> int:
            monitor = runner.loop_monitor
            assert monitor is not None
            while monitor.samples < 3:  # the monitor samples while this runs
                await asyncio.sleep(0.01)
            return monitor.samples

    server = serve(0, "127.0.0.1", registry)
    try:
        execution = await runner.run(Waits)
        assert execution.succeeded
        samples = await asyncio.to_thread(scrape, server.port)
    finally:
        server.close()
        await runner.aclose()
    lag = value(samples, "jobrunner_event_loop_lag_seconds_count")
    assert lag is not None and lag >= execution.result


def test_worker_serves_metrics_port(postgres: Backend, tmp_path: Path) -> None:
    """`jobrunner worker --metrics-port`: scraped over HTTP while it drains a known set."""
    port = free_port()
    submitter = JobRunner(postgres.url, instruments=[])
    try:
        ids = [submitter.submit(observed_jobs.Ok) for _ in range(4)]
        ids.append(submitter.submit(observed_jobs.Bad))
        ids.append(submitter.submit(observed_jobs.Flaky))
        submitter.submit(observed_jobs.Ok, queue="parked")  # a queue this worker leaves
        log = tmp_path / "worker.log"
        command = [
            sys.executable,
            "-m",
            "jobrunner",
            "--database-url",
            postgres.url,
            "--app",
            "tests.observed_jobs",
            "worker",
            "--metrics-port",
            str(port),
            "--poll-interval",
            "0.1",
            "--concurrency",
            "2",
            "--queue",
            "default",
        ]
        with log.open("w") as out:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:

            def finished() -> dict[Any, float] | None:
                assert proc.poll() is None, log.read_text()
                try:
                    samples = scrape(port)
                except httpx.TransportError:
                    return None  # not listening yet
                total = "jobrunner_executions_total"
                done = (
                    value(samples, total, job="observed.ok", queue="default", outcome="succeeded")
                    == 4
                    and value(
                        samples, total, job="observed.flaky", queue="default", outcome="succeeded"
                    )
                    == 1
                    and value(samples, total, job="observed.bad", queue="default", outcome="failed")
                    == 1
                )
                return samples if done else None

            samples = wait_for(finished, "the worker's metrics")
        finally:
            assert stop_process(proc) == 0, log.read_text()
    finally:
        statuses = {e.id: e.status for e in submitter.list(limit=100)}
        submitter.close()
    assert (
        value(
            samples,
            "jobrunner_executions_total",
            job="observed.flaky",
            queue="default",
            outcome="retried",
        )
        == 1
    )
    assert (
        value(samples, "jobrunner_queue_wait_seconds_count", job="observed.ok", queue="default")
        == 4
    )
    assert value(samples, "jobrunner_executions", status="pending", queue="parked") == 1
    assert value(samples, "jobrunner_oldest_due_age_seconds", queue="parked") is not None
    assert jobrunner_labels(samples) <= ALLOWED_LABELS
    assert all(statuses[i] in (ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED) for i in ids)
    assert isinstance(ids[0], uuid.UUID)


async def test_asgi_app_serves_the_registry(backend: Backend) -> None:
    """asgi_app(): what a Starlette/FastAPI app mounts at /metrics, text format."""
    from jobrunner.contrib.prometheus import asgi_app

    registry = CollectorRegistry()
    runner = AsyncJobRunner(backend.url, registry=Registry(), instruments=[Metrics(registry)])
    try:
        assert (await runner.run(observed_jobs.Ok)).succeeded
    finally:
        await runner.aclose()
    transport = httpx.ASGITransport(app=asgi_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert value(samples, "jobrunner_executions_total", job="observed.ok", queue="default",
                 outcome="succeeded") == 1


async def test_dashboard_serves_metrics_when_mounted(backend: Backend) -> None:
    """jobrunner.web.create_app(routes=[Mount("/metrics", asgi_app())]): one app serves
    the dashboard and the metrics, the database gauges included."""
    from starlette.routing import Mount

    from jobrunner.contrib.prometheus import asgi_app
    from jobrunner.web import create_app

    registry = CollectorRegistry()
    collector = DatabaseCollector(backend.url)
    registry.register(collector)
    runner = JobRunner(backend.url, instruments=[])  # the app's, closed here
    runner.submit(observed_jobs.Ok, queue="mounted")
    app = create_app(runner, routes=[Mount("/metrics", app=asgi_app(registry))])
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/metrics/")
            page = await client.get("/")
    finally:
        collector.close()
        runner.close()
    assert response.status_code == 200 and page.status_code == 200
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert value(samples, "jobrunner_executions", status="pending", queue="mounted") == 1


def test_a_new_registry_never_gets_a_collected_ones_metrics() -> None:
    """Registries come and go (one per app, per test): each gets metrics of its own, even
    when Python gives it the address a collected one had."""
    import gc

    from jobrunner.contrib.prometheus import _families_of

    for _ in range(20):
        registry = CollectorRegistry()
        _families_of(registry).reaped.inc()
        assert registry.get_sample_value("jobrunner_leases_reaped_total") == 1.0
        del registry
        gc.collect()
