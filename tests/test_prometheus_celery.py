"""Prometheus multiprocess mode under a real Celery prefork worker: two pool processes
count their executions into PROMETHEUS_MULTIPROC_DIR, and one /metrics endpoint serves
the sum."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry, multiprocess

from jobrunner.contrib.celery import install
from jobrunner.contrib.prometheus import DatabaseCollector, serve

from ._services import stop_process, wait_for
from .test_celery import JOB, _create_schema, _forget, _start, broker_url  # noqa: F401
from .test_prometheus import scrape, value

pytestmark = pytest.mark.broker


def test_prefork_children_are_summed(broker_url: str, tmp_path: Path) -> None:  # noqa: F811
    """12 sync and 12 async executions and one retried twice, run by the prefork children
    (two of them): the counters summed from their files say exactly that, over HTTP."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    _create_schema(url)
    prom = tmp_path / "prometheus"
    prom.mkdir()
    queue = f"jobrunner-prom-{uuid.uuid4().hex[:10]}"
    env = {"JOBRUNNER_DATABASE_URL": url, "JOBRUNNER_TEST_BROKER": broker_url,
           "JOBRUNNER_TEST_QUEUE": queue, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    cmd = [sys.executable, "-m", "celery", "-A", "tests.celery_metrics_app", "worker",
           "--pool=prefork", "--concurrency=2", "-Q", queue, "--loglevel=INFO",
           "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{queue}@%h"]
    log = tmp_path / "worker.log"
    proc = _start(cmd, env, log)
    app = Celery(f"client-{queue}", broker=broker_url, backend=broker_url)
    app.conf.update(task_default_queue=queue, worker_enable_remote_control=False)
    jobs = install(app, database_url=url, instruments=[])
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(prom))
    collector = DatabaseCollector(url, cache_seconds=0)
    registry.register(collector)
    server = serve(0, "127.0.0.1", registry)
    total = "jobrunner_executions_total"
    try:
        ids = [jobs.enqueue(f"{JOB}.sync_probe", {"n": n}) for n in range(12)]
        ids += [jobs.enqueue(f"{JOB}.async_probe", {"n": n}) for n in range(12)]
        ids.append(jobs.enqueue(f"{JOB}.async_flaky"))

        def counted() -> dict[Any, float] | None:
            assert proc.poll() is None, log.read_text()[-3000:]
            samples = scrape(server.port)
            wanted = {
                ("sync_probe", "succeeded"): 12,
                ("async_probe", "succeeded"): 12,
                ("async_flaky", "retried"): 2,
                ("async_flaky", "succeeded"): 1,
            }
            done = all(
                value(samples, total, job=f"{JOB}.{job}", queue="default", outcome=outcome)
                == count
                for (job, outcome), count in wanted.items()
            )
            return samples if done else None

        samples = wait_for(counted, "the children's counts", 90)
        pids = {e.result["pid"] for e in jobs.runner.list(limit=100) if e.job.endswith("probe")}
    finally:
        server.close()
        collector.close()
        assert stop_process(proc) == 0, log.read_text()[-3000:]
        jobs.close()
        _forget(broker_url, queue)
    # Each process that counted wrote its own file; the endpoint summed them.
    assert len(list(prom.glob("counter_*.db"))) >= len(pids) >= 1
    phases = "jobrunner_phase_duration_seconds_count"
    assert value(samples, phases, job=f"{JOB}.async_probe", phase="execute") == 12
    assert value(samples, "jobrunner_executions", status="pending", queue="default") == 0
