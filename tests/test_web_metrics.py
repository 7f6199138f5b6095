"""The dashboard serves Prometheus metrics at /metrics when prometheus-client is there."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from jobrunner import JobRunner
from jobrunner.contrib.prometheus import dashboard_metrics
from jobrunner.web import create_app

from .conftest import Backend
from .web_jobs import Echo, registry


@pytest.fixture
def runner(backend: Backend) -> Iterator[JobRunner]:
    r = JobRunner(backend.url, registry=registry())
    yield r
    r.close()


def _series(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in the text format."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            found[key[len(name) :]] = float(value)
    return found


async def test_metrics_are_served_beside_the_pages(runner: JobRunner) -> None:
    for _ in range(3):
        runner.submit(Echo, {"text": "waiting"})
    runner.submit(Echo, {"text": "elsewhere"}, queue="other")
    app = create_app(runner)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/metrics/")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        gauges = _series(response.text, "jobrunner_executions")
        assert gauges[f'{{queue="{Echo.queue}",status="pending"}}'] == 3
        assert gauges['{queue="other",status="pending"}'] == 1
        assert "jobrunner_oldest_due_age_seconds" in response.text
        assert (await c.get("/")).status_code == 200  # the pages are still there


async def test_metrics_sit_behind_the_dashboards_auth_and_can_be_off(runner: JobRunner) -> None:
    guarded = create_app(runner, auth=lambda request: None)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=guarded), base_url="http://t"
    ) as c:
        assert (await c.get("/metrics/")).status_code == 401
    off = create_app(runner, metrics=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=off), base_url="http://t") as c:
        assert (await c.get("/metrics/")).status_code == 404


async def test_the_processs_own_metrics_are_included(runner: JobRunner) -> None:
    own = CollectorRegistry()
    Counter("app_things_total", "Things the app did.", registry=own).inc(2)
    url = runner.engine.url.render_as_string(hide_password=False)
    app = dashboard_metrics(url, own)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        text = (await c.get("/")).text
    assert _series(text, "app_things_total") == {"": 2.0}
    assert "jobrunner_executions" in text
