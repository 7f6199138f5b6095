"""The dashboard in a real Chromium (Playwright), served by uvicorn on a real database.

Needs Debian's ``chromium`` at /usr/bin/chromium (``.ci/run`` installs it; browser
builds cannot be downloaded here). Screenshots land in docs/img/dashboard/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobrunner import ExecutionStatus, JobRunner
from jobrunner.web import create_app

from .conftest import Backend, assert_no_checked_out
from .web_jobs import HOSTILE, Echo, Fail, registry, seed, serve

playwright_api = pytest.importorskip("playwright.sync_api")
# A bound on a broken test, not on speed: the machine is shared and noisy.
playwright_api.expect.set_options(timeout=30_000)
CHROMIUM = os.environ.get("JOBRUNNER_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def web_runner(backend: Backend) -> Iterator[JobRunner]:
    """A JobRunner with the dashboard tests' jobs; the server gave back its connections."""
    r = JobRunner(backend.url, registry=registry())
    yield r
    assert_no_checked_out(r.engine.pool, "JobRunner behind the dashboard")
    r.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context and page (own cookies)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(30_000)  # a bound on a broken test, not on speed
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield p
    context.close()
    # No script error and no CSP violation; refused requests (401/403) are the tests' own.
    assert [e for e in errors if "Failed to load resource" not in e] == []


def shot(page: Any, backend: Backend, name: str) -> None:
    """Screenshots for the docs come from the SQLite run (same pages on both)."""
    if backend.name == "sqlite":
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_overview_filter_and_detail(
    page: Any, web_runner: JobRunner, backend: Backend
) -> None:
    """Open the overview, filter executions by job, open one: its attempts and timeline."""
    ids = seed(web_runner)
    for i in range(3):
        web_runner.run(Echo, {"text": f"report {i}"})
    with serve(create_app(web_runner)) as base:
        page.goto(base + "/")
        playwright_api.expect(page.locator("#status-counts")).to_contain_text("failed")
        playwright_api.expect(page.locator("#failures")).to_contain_text("web.fail")
        playwright_api.expect(page.locator("#queues")).to_contain_text("mail")
        shot(page, backend, "overview")

        page.click("text=Executions")
        page.fill("input[name=job]", "web.fail")
        page.click("button:has-text('Filter')")
        page.wait_for_url("**/executions?*job=web.fail*")
        rows = page.locator("#executions tbody tr")
        playwright_api.expect(rows).to_have_count(1)
        playwright_api.expect(rows.first.locator(".job")).to_have_text("web.fail")
        shot(page, backend, "executions")

        rows.first.locator("a").click()
        page.wait_for_url(f"**/executions/{ids['failed']}")
        playwright_api.expect(page.locator("#attempts tbody tr")).to_have_count(2)
        playwright_api.expect(page.locator("svg.timeline rect.k-execute")).to_have_count(2)
        playwright_api.expect(page.locator("#error")).to_contain_text(HOSTILE)  # as text
        shot(page, backend, "execution")

        page.goto(base + "/jobs")
        playwright_api.expect(page.locator("#jobs")).to_contain_text("web.fail")
        shot(page, backend, "jobs")


def test_retry_with_actions_on(page: Any, web_runner: JobRunner, backend: Backend) -> None:
    """With actions on, Retry puts a failed execution back to pending, audited."""
    failed = web_runner.run(Fail, {"message": "flaky"})
    app = create_app(web_runner, read_only=False, auth=lambda request: "alice")
    with serve(app) as base:
        page.goto(f"{base}/executions/{failed.id}")
        page.click("#retry-form button")
        playwright_api.expect(page.locator(".flash")).to_have_text("retried")
        playwright_api.expect(page.locator("#audit")).to_contain_text("alice")
        shot(page, backend, "retried")
    assert web_runner.get(failed.id).status is ExecutionStatus.PENDING


def test_retry_refused_without_csrf_token(page: Any, web_runner: JobRunner) -> None:
    """A form stripped of its CSRF token is refused and changes nothing."""
    failed = web_runner.run(Fail, {"message": "flaky"})
    with serve(create_app(web_runner, read_only=False)) as base:
        page.goto(f"{base}/executions/{failed.id}")
        page.locator("#retry-form input[name=csrf_token]").evaluate("e => e.remove()")
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.click("#retry-form button")
        assert answer.value.status == 403
        playwright_api.expect(page.locator("body")).to_contain_text("CSRF check failed")
    assert web_runner.get(failed.id).status is ExecutionStatus.FAILED


def test_retry_refused_when_read_only(page: Any, web_runner: JobRunner) -> None:
    """Read-only: no Retry button, and a POST from the page is refused."""
    failed = web_runner.run(Fail, {"message": "flaky"})
    with serve(create_app(web_runner)) as base:
        page.goto(f"{base}/executions/{failed.id}")
        playwright_api.expect(page.locator("#attempts")).to_be_visible()
        playwright_api.expect(page.locator("#retry-form")).to_have_count(0)
        response = page.request.post(f"{base}/executions/{failed.id}/retry")
        assert response.status == 403
    assert web_runner.get(failed.id).status is ExecutionStatus.FAILED


def test_basic_auth_refuses_a_wrong_password(
    browser: Any, web_runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Basic auth: a wrong password gets a 401, the right one the page."""
    monkeypatch.setenv("JOBRUNNER_WEB_USER", "admin")
    monkeypatch.setenv("JOBRUNNER_WEB_PASSWORD", "s3cret")
    with serve(create_app(web_runner)) as base:
        wrong = browser.new_context(http_credentials={"username": "admin", "password": "no"})
        try:
            assert wrong.new_page().goto(base + "/").status == 401
        finally:
            wrong.close()
        right = browser.new_context(http_credentials={"username": "admin", "password": "s3cret"})
        try:
            page = right.new_page()
            assert page.goto(base + "/").status == 200
            playwright_api.expect(page.locator("header .who")).to_contain_text("admin")
        finally:
            right.close()


def test_new_execution_appears_without_reload(
    page: Any, web_runner: JobRunner, backend: Backend
) -> None:
    """A submit shows up on the open executions page by itself (SSE, then htmx)."""
    web_runner.run(Echo, {"text": "first"})
    app = create_app(web_runner, poll_interval=0.1, min_interval=0.1)
    with serve(app) as base:
        page.goto(base + "/executions")
        page.evaluate("window.notReloaded = true")
        playwright_api.expect(page.locator("#live.on")).to_be_visible()  # the stream watches
        new = web_runner.submit(Echo, {"text": "second"})
        page.wait_for_selector(f'tr[data-id="{new}"]')
        assert page.evaluate("window.notReloaded") is True
        page.goto(base + "/queues")
        shot(page, backend, "queues")


def test_pause_and_resume_a_queue(page: Any, web_runner: JobRunner) -> None:
    """With actions on, Pause and Resume on the queues page; workers' view follows."""
    web_runner.submit(Echo, {"text": "waiting"})
    app = create_app(web_runner, read_only=False, auth=lambda request: "alice")
    with serve(app) as base:
        page.goto(base + "/queues")
        row = page.locator('tr[data-queue="mail"]')
        row.locator("button:has-text('Pause')").click()
        playwright_api.expect(page.locator(".flash")).to_have_text("paused mail")
        playwright_api.expect(row).to_contain_text("paused by alice")
        assert web_runner.paused_queues() == {"mail"}
        row.locator("button:has-text('Resume')").click()
        playwright_api.expect(page.locator(".flash")).to_have_text("resumed mail")
        playwright_api.expect(row).to_contain_text("active")
    assert web_runner.paused_queues() == set()


def test_overview_counts_follow_without_reload(page: Any, web_runner: JobRunner) -> None:
    """A finished execution moves the overview's counts on an open page (cache or not)."""
    web_runner.run(Echo, {"text": "first"})
    app = create_app(web_runner, poll_interval=0.1, min_interval=0.1)
    with serve(app) as base:
        page.goto(base + "/")
        card = page.locator('#status-counts a[href$="status=succeeded"] b')
        playwright_api.expect(card).to_have_text("1")
        playwright_api.expect(page.locator("#live.on")).to_be_visible()
        web_runner.run(Echo, {"text": "second"})
        playwright_api.expect(card).to_have_text("2")
