"""The dashboard over HTTP (httpx against the ASGI app, real SQLite and PostgreSQL)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from jobrunner import AsyncJobRunner, Attempt, ExecutionStatus, JobRunner
from jobrunner._schema import executions
from jobrunner.web import create_app
from jobrunner.web._filters import Cursor
from jobrunner.web._svg import timeline

from .conftest import Backend, assert_no_checked_out
from .web_jobs import Echo, Fail, csrf_token, registry, seed, set_traceback


@pytest.fixture
def web_runner(backend: Backend) -> Iterator[JobRunner]:
    """A JobRunner with the dashboard tests' jobs."""
    r = JobRunner(backend.url, registry=registry())
    yield r
    assert_no_checked_out(r.engine.pool, "JobRunner")
    r.close()


@pytest.fixture
async def client(web_runner: JobRunner) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a read-only dashboard."""
    app = create_app(web_runner)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def acting_client(runner: JobRunner, user: str = "alice") -> httpx.AsyncClient:
    """A client of a dashboard with actions on, as ``user``."""
    app = create_app(runner, read_only=False, auth=lambda request: user)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


PAGES = ("/", "/executions", "/jobs", "/queues")
HOWTO = Path(__file__).resolve().parent.parent / "docs" / "howto" / "dashboard.md"


async def test_every_page_renders(web_runner: JobRunner, client: httpx.AsyncClient) -> None:
    """Each page answers 200 with its content, on both backends."""
    ids = seed(web_runner)
    for path in PAGES:
        response = await client.get(path)
        assert response.status_code == 200, path
    listing = (await client.get("/executions")).text
    for execution_id in ids.values():
        assert str(execution_id)[:8] in listing
    detail = (await client.get(f"/executions/{ids['failed']}")).text
    assert detail.count('class="k-execute"') == 2  # one bar per attempt in the timeline
    overview = (await client.get("/")).text
    assert "3 finished in the last 60 minutes" in overview  # the chart's buckets add up
    assert overview.count('class="k-succeeded"') == 1
    assert "web.fail" in (await client.get("/jobs")).text
    assert "mail" in (await client.get("/queues")).text


async def test_hostile_data_renders_as_text(
    web_runner: JobRunner, client: httpx.AsyncClient
) -> None:
    """Markup in args, results, job names and errors is escaped on every page."""
    ids = seed(web_runner)
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    pages = [*PAGES, *(f"/executions/{i}" for i in ids.values())]
    for path in pages:
        html = (await client.get(path)).text
        assert "<script>alert" not in html, path
        assert "<img src=x" not in html, path
        assert "<i>q</i>" not in html, path  # a queue name
    assert "&lt;i&gt;q&lt;/i&gt;" in (await client.get("/queues")).text
    assert escaped in (await client.get("/executions")).text  # job name and error
    assert escaped in (await client.get(f"/executions/{ids['ok']}")).text  # args, result
    assert escaped in (await client.get(f"/executions/{ids['hostile']}")).text
    assert escaped in (await client.get("/")).text  # failures by job


async def test_security_headers(client: httpx.AsyncClient) -> None:
    """Pages forbid inline scripts and framing."""
    response = await client.get("/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


async def test_sql_metacharacters_in_filters_change_nothing(
    web_runner: JobRunner, client: httpx.AsyncClient
) -> None:
    """Quotes, comments and LIKE wildcards are matched literally, and nothing is dropped."""
    web_runner.run(Fail, {"message": "disk 100% full"})
    web_runner.run(Fail, {"message": "plain"})
    for params in (
        {"job": "x' OR '1'='1"},
        {"queue": "'; DROP TABLE jobrunner_executions; --"},
        {"error": "' OR 1=1 --"},
        {"error": "_"},
    ):
        response = await client.get("/executions", params=params)
        assert response.status_code == 200, params
        assert "No executions match." in response.text, params
    percent = (await client.get("/executions", params={"error": "%"})).text
    assert "100% full" in percent
    assert "plain" not in percent
    with web_runner.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(executions)).scalar() == 2


async def test_bad_filters_are_a_400(client: httpx.AsyncClient) -> None:
    """An unknown status or a forged cursor is refused with the reason."""
    response = await client.get("/executions", params={"status": "<b>x</b>"})
    assert response.status_code == 400
    assert "&lt;b&gt;" in response.text
    assert (await client.get("/executions", params={"cursor": "not-a-cursor"})).status_code == 400


async def test_huge_traceback_is_cut_with_a_raw_link(
    web_runner: JobRunner, client: httpx.AsyncClient
) -> None:
    """A 1 MB traceback: the page carries its last 20,000 characters; the rest is a link."""
    failed = web_runner.run(Fail, {"message": "big"})
    huge = "Traceback (most recent call last):\n" + "  frame\n" * 130_000 + "ValueError: big\n"
    assert len(huge) > 1_000_000
    set_traceback(web_runner, failed.id, huge)
    page = await client.get(f"/executions/{failed.id}")
    assert len(page.text) < 100_000
    assert "ValueError: big" in page.text
    assert f"/executions/{failed.id}/raw/traceback" in page.text
    raw = await client.get(f"/executions/{failed.id}/raw/traceback")
    assert raw.headers["content-type"].startswith("text/plain")
    assert raw.text == huge


async def _all_pages(client: httpx.AsyncClient, url: str) -> list[str]:
    ids: list[str] = []
    while url:
        assert "offset" not in url
        html = (await client.get(url)).text
        ids += re.findall(r'<tr data-id="([0-9a-f-]+)">', html)
        found = re.search(r'<a rel="next" id="next" href="([^"]+)">', html)
        url = found.group(1).replace("&amp;", "&") if found else ""
    return ids


async def test_keyset_pagination_visits_every_row_once(
    web_runner: JobRunner, client: httpx.AsyncClient
) -> None:
    """Following "next" pages through every execution once, in order, both ways."""
    base = datetime.now(UTC) - timedelta(hours=1)
    with web_runner.engine.begin() as conn:
        conn.execute(
            sa.insert(executions),
            [
                {
                    "id": uuid.uuid4(), "job": "web.echo", "handler": "x:y", "args": {},
                    "status": "failed" if i % 3 else "succeeded", "queue": "default",
                    "priority": 0, "attempt": 1, "max_attempts": 1, "triggered_by": "t",
                    "lease_token": 0, "cancel_requested": False, "checkpointed": False,
                    # Pairs share a timestamp: the id breaks the tie.
                    "created_at": base + timedelta(seconds=i // 2),
                }
                for i in range(125)
            ],
        )
        expected = [
            str(r.id)
            for r in conn.execute(
                sa.select(executions.c.id).order_by(
                    executions.c.created_at.desc(), executions.c.id.desc()
                )
            )
        ]
    newest = await _all_pages(client, "/executions?limit=20")
    assert newest == expected
    oldest = await _all_pages(client, "/executions?limit=20&sort=oldest")
    assert oldest == expected[::-1]
    failed = await _all_pages(client, "/executions?limit=7&status=failed&job=web.echo")
    with web_runner.engine.connect() as conn:
        want = [
            str(i)
            for i in conn.execute(
                sa.select(executions.c.id)
                .where(executions.c.status == "failed")
                .order_by(executions.c.created_at.desc(), executions.c.id.desc())
            ).scalars()
        ]
    assert failed == want


def test_cursor_round_trips() -> None:
    """A cursor decodes to the row it was made from."""
    cursor = Cursor(created_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), id=uuid.uuid4())
    assert Cursor.decode(cursor.encode()) == cursor


async def test_actions_refused_when_read_only(
    web_runner: JobRunner, client: httpx.AsyncClient
) -> None:
    """A read-only dashboard shows no buttons and refuses every POST."""
    ids = seed(web_runner)
    page = (await client.get(f"/executions/{ids['failed']}")).text
    assert "retry-form" not in page
    assert 'name="csrf_token"' not in page
    for path in (
        f"/executions/{ids['failed']}/retry",
        f"/executions/{ids['pending']}/cancel",
        "/executions/retry",
        "/queues/default/pause",
    ):
        assert (await client.post(path)).status_code == 403, path
    assert web_runner.get(ids["failed"]).status is ExecutionStatus.FAILED
    assert web_runner.paused_queues() == set()


async def test_retry_needs_the_csrf_token(web_runner: JobRunner) -> None:
    """A POST without the token, with a wrong one, or from another origin is refused."""
    failed = web_runner.run(Fail, {"message": "x"})
    async with acting_client(web_runner) as c:
        url = f"/executions/{failed.id}/retry"
        assert (await c.post(url)).status_code == 403  # no cookie, no token
        token = csrf_token((await c.get(f"/executions/{failed.id}")).text)
        assert (await c.post(url, data={"csrf_token": "x" + token})).status_code == 403
        forged = token.split(".")[0] + ".0"
        c.cookies.set("jobrunner_csrf", forged)
        assert (await c.post(url, data={"csrf_token": forged})).status_code == 403
        c.cookies.set("jobrunner_csrf", token)
        other = await c.post(url, data={"csrf_token": token}, headers={"origin": "http://evil"})
        assert other.status_code == 403
        proxied = {"origin": "https://ops.example", "x-forwarded-host": "evil.example"}
        assert (await c.post(url, data={"csrf_token": token}, headers=proxied)).status_code == 403
        assert web_runner.get(failed.id).status is ExecutionStatus.FAILED
        # Behind a proxy that rewrites Host, X-Forwarded-Host names the page's origin.
        proxied = {"origin": "https://ops.example", "x-forwarded-host": "ops.example"}
        done = await c.post(url, data={"csrf_token": token}, headers=proxied)
    assert done.status_code == 303
    assert web_runner.get(failed.id).status is ExecutionStatus.PENDING


async def test_actions_write_the_audit(web_runner: JobRunner) -> None:
    """Retry, cancel, pause and resume go through the runner with the user as actor."""
    failed = web_runner.run(Fail, {"message": "x"})
    pending = web_runner.submit(Echo, {"text": "y"})
    async with acting_client(web_runner, user="alice") as c:
        token = csrf_token((await c.get("/queues")).text)
        form = {"csrf_token": token}
        assert (await c.post(f"/executions/{failed.id}/retry", data=form)).status_code == 303
        assert (await c.post(f"/executions/{pending}/cancel", data=form)).status_code == 303
        assert (await c.post("/queues/mail/pause", data=form)).status_code == 303
        assert web_runner.paused_queues() == {"mail"}
        assert "paused by alice" in (await c.get("/queues")).text
        assert (await c.post("/queues/mail/resume", data=form)).status_code == 303
        detail = (await c.get(f"/executions/{failed.id}")).text
    assert web_runner.paused_queues() == set()
    assert web_runner.get(pending).status is ExecutionStatus.CANCELLED
    actions = {(a.action, a.actor, a.execution_id, a.queue) for a in web_runner.audit()}
    assert actions == {
        ("retry", "alice", failed.id, None),
        ("cancel", "alice", pending, None),
        ("pause", "alice", None, "mail"),
        ("resume", "alice", None, "mail"),
    }
    assert 'id="audit"' in detail and "alice" in detail


async def test_an_invalid_action_says_why(web_runner: JobRunner) -> None:
    """Retrying a succeeded execution is a 409 with the runner's message."""
    ok = web_runner.run(Echo, {"text": "x"})
    async with acting_client(web_runner) as c:
        token = csrf_token((await c.get("/queues")).text)
        response = await c.post(f"/executions/{ok.id}/retry", data={"csrf_token": token})
    assert response.status_code == 409
    assert "succeeded" in response.text


async def test_bulk_retry_takes_the_filtered_failed_set(web_runner: JobRunner) -> None:
    """Bulk retry moves the failed executions the filters match, and nothing else."""
    mine = [web_runner.run(Fail, {"message": f"timeout {i}"}).id for i in range(3)]
    other = web_runner.run(Fail, {"message": "refused"}).id
    ok = web_runner.run(Echo, {"text": "x"}).id
    async with acting_client(web_runner, user="bob") as c:
        token = csrf_token((await c.get("/executions")).text)
        response = await c.post(
            "/executions/retry", data={"csrf_token": token, "error": "timeout"}
        )
    assert response.status_code == 303
    assert "retried+3" in response.headers["location"]
    assert {web_runner.get(i).status for i in mine} == {ExecutionStatus.PENDING}
    assert web_runner.get(other).status is ExecutionStatus.FAILED
    assert web_runner.get(ok).status is ExecutionStatus.SUCCEEDED
    assert len([a for a in web_runner.audit() if a.actor == "bob"]) == 3


async def test_basic_auth_from_the_environment(
    web_runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With JOBRUNNER_WEB_USER/PASSWORD set, only those credentials get in."""
    monkeypatch.setenv("JOBRUNNER_WEB_USER", "admin")
    monkeypatch.setenv("JOBRUNNER_WEB_PASSWORD", "s3cret")
    app = create_app(web_runner)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        refused = await c.get("/")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        assert (await c.get("/", auth=("admin", "wrong"))).status_code == 401
        assert (await c.get("/static/live.js", auth=("admin", "wrong"))).status_code == 401
        ok = await c.get("/", auth=("admin", "s3cret"))
    assert ok.status_code == 200
    assert "admin" in ok.text


async def test_mounted_with_the_apps_own_auth(web_runner: JobRunner) -> None:
    """Mounted under a prefix, links carry the prefix and the app's hook decides."""
    from fastapi import FastAPI

    def only_carol(request: object) -> str | None:
        headers = getattr(request, "headers", {})
        return "carol" if headers.get("x-user") == "carol" else None

    outer = FastAPI()
    outer.mount("/ops/jobs", create_app(web_runner, auth=only_carol))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=outer), base_url="http://t"
    ) as c:
        assert (await c.get("/ops/jobs/")).status_code == 401
        page = await c.get("/ops/jobs/executions", headers={"x-user": "carol"})
        css = await c.get("/ops/jobs/static/style.css", headers={"x-user": "carol"})
    assert page.status_code == 200
    assert 'href="/ops/jobs/static/style.css"' in page.text
    assert 'href="/ops/jobs/jobs"' in page.text
    assert css.status_code == 200


async def test_async_runner_serves_the_same_pages(backend: Backend) -> None:
    """An AsyncJobRunner behind the dashboard: same pages, awaited on the loop."""
    sync = JobRunner(backend.url, registry=registry())
    ids = seed(sync)
    sync.close()
    runner = AsyncJobRunner(backend.url, registry=registry())
    try:
        app = create_app(runner)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for path in (*PAGES, f"/executions/{ids['failed']}"):
                assert (await c.get(path)).status_code == 200, path
            assert str(ids["ok"])[:8] in (await c.get("/executions")).text
    finally:
        await runner.aclose()


async def test_changes_announce_a_new_execution(web_runner: JobRunner, backend: Backend) -> None:
    """The event stream's watcher reports a submit (NOTIFY on PostgreSQL, a poll on SQLite)."""
    from jobrunner.web._live import Changes
    from jobrunner.web._store import Store

    # On PostgreSQL the poll is an hour away: only the submit's NOTIFY can wake the watcher.
    poll = 3600.0 if backend.is_postgres else 0.05
    changes = Changes(Store(web_runner, owned=False), poll_interval=poll, min_interval=0)
    stream = changes.subscribe()
    try:
        assert await anext(stream) == 0  # watching: what commits from now on is seen
        web_runner.submit(Echo, {"text": "new"})
        version = await anext(stream)
        while version is None:  # a keepalive on a very slow machine
            version = await anext(stream)
        assert version >= 1
    finally:
        await stream.aclose()
    assert changes._task is None  # the last listener gone, the watcher stopped


def test_timeline_places_phases_and_waits() -> None:
    """Phases follow each other from the attempt's start; the wait bridges the attempts."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def attempt(n: int, start: float, end: float, **ms: float) -> Attempt:
        return Attempt(
            id=n, execution_id=uuid.uuid4(), number=n, status=ExecutionStatus.FAILED,
            phase="execute", resumed_from="load", worker="w", triggered_by="t",
            started_at=t0 + timedelta(seconds=start), finished_at=t0 + timedelta(seconds=end),
            load_ms=ms.get("load"), execute_ms=ms.get("execute"), record_ms=ms.get("record"),
            max_loop_lag_ms=None, wait_s=None, error_type=None, error_message=None,
            error_traceback=None,
        )

    picture = timeline([
        attempt(1, 0, 2, load=500, execute=1500),
        attempt(2, 6, 10, load=1000, execute=2000, record=1000),
    ])
    assert picture is not None
    kinds = [r.kind for r in picture.rects]
    assert kinds == ["span", "load", "execute", "wait", "span", "load", "execute", "record"]
    span1, load1, execute1, wait, span2, load2, _execute2, record2 = picture.rects
    assert (span1.x, span2.x) == (load1.x, load2.x)
    assert span1.x + span1.width == pytest.approx(wait.x)
    assert execute1.x == pytest.approx(load1.x + load1.width)
    assert wait.x == pytest.approx(load1.x + 2 * (load2.x - load1.x) / 6)  # ends at 2 s
    assert wait.x + wait.width == pytest.approx(load2.x)
    assert record2.x + record2.width == pytest.approx(load1.x + (load2.x - load1.x) * 10 / 6)
    assert timeline([]) is None


def test_importing_jobrunner_leaves_starlette_alone() -> None:
    """The dashboard's dependencies load only with jobrunner.web."""
    code = "import sys, jobrunner, jobrunner.cli; print('starlette' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_docs_mounting_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The how-to's FastAPI example runs: its hook refuses strangers and names the actor."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"^```python\n(.*?)^```", HOWTO.read_text(), re.S | re.M)
    namespace: dict[str, object] = {"__name__": "dashboard_howto"}
    exec(compile("\n\n".join(blocks), str(HOWTO), "exec"), namespace)
    runner = namespace["runner"]
    assert isinstance(runner, JobRunner)
    transport = httpx.ASGITransport(app=namespace["app"])  # type: ignore[arg-type]
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/ops/jobs/queues")).status_code == 401
            me = {"x-forwarded-user": "alice"}
            token = csrf_token((await c.get("/ops/jobs/queues", headers=me)).text)
            paused = await c.post(
                "/ops/jobs/queues/default/pause", data={"csrf_token": token}, headers=me
            )
            assert paused.headers["location"].startswith("/ops/jobs/queues")
        assert [(a.action, a.actor) for a in runner.audit()] == [("pause", "alice")]
    finally:
        runner.close()


async def test_error_search_reads_a_window_and_goes_on(
    web_runner: JobRunner, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text search reads a bounded window, says so, and "search further back" finds the rest."""
    from jobrunner.web import _queries

    monkeypatch.setattr(_queries, "SEARCH_WINDOW", 4)
    old = [web_runner.run(Fail, {"message": f"needle {i}"}).id for i in range(3)]
    for i in range(9):
        web_runner.run(Fail, {"message": f"hay {i}"})
    first = (await client.get("/executions", params={"error": "needle", "limit": "2"})).text
    assert "No executions match." in first
    assert "searched in 4 executions" in first
    found: list[str] = []
    url = "/executions?error=needle&limit=2"
    while url:
        html = (await client.get(url)).text
        found += re.findall(r'<tr data-id="([0-9a-f-]+)">', html)
        link = re.search(r'href="([^"]+)">(?:search further back|next page)</a>', html)
        url = link.group(1).replace("&amp;", "&") if link else ""
    assert found == [str(i) for i in reversed(old)]


def test_jobrunner_web_serves_read_only_on_localhost(tmp_path: Path) -> None:
    """``jobrunner web`` serves the pages on 127.0.0.1, read-only, and stops on SIGTERM."""
    from ._services import free_port, stop_process, wait_for

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with JobRunner(url, registry=registry()) as runner:
        runner.create_schema()
        failed = runner.run(Fail, {"message": "x"})
    port = free_port()
    cli = Path(sys.executable).parent / "jobrunner"
    proc = subprocess.Popen(
        [str(cli), "--database-url", url, "web", "--app", "tests.web_jobs", "--port", str(port)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(base), "jobrunner web to answer")
        assert "web.fail" in httpx.get(base + "/jobs").text  # --app imported the jobs
        assert httpx.post(f"{base}/executions/{failed.id}/retry").status_code == 403
    finally:
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert stop_process(proc) in (0, -signal.SIGTERM)
    assert proc.stderr is not None
    assert f"(read-only) on http://127.0.0.1:{port}/" in proc.stderr.read()


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/").status_code == 200
    except httpx.TransportError:
        return False


async def test_a_short_id_redirects_to_its_execution(
    web_runner: JobRunner, client: httpx.AsyncClient
) -> None:
    """``/executions/<first hex digits>`` goes to the execution, as the CLI's short ids."""
    ok = web_runner.run(Echo, {"text": "x"})
    response = await client.get(f"/executions/{str(ok.id)[:8]}")
    assert response.status_code == 302
    assert response.headers["location"] == f"/executions/{ok.id}"
    assert (await client.get("/executions/zzzz")).status_code == 404


async def test_auth_hook_refusals_and_the_anonymous_actor(web_runner: JobRunner) -> None:
    """A hook's HTTPException or PermissionError refuses; without a hook the actor is anonymous."""
    from starlette.exceptions import HTTPException

    def teapot(request: object) -> str:
        raise HTTPException(418, "not here")

    def forbidden(request: object) -> str:
        raise PermissionError("staff only")

    for hook, status, text in ((teapot, 418, "not here"), (forbidden, 403, "staff only")):
        app = create_app(web_runner, auth=hook)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            refused = await c.get("/")
        assert (refused.status_code, refused.text.strip()) == (status, text)
    failed = web_runner.run(Fail, {"message": "x"})
    app = create_app(web_runner, read_only=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        token = csrf_token((await c.get("/queues")).text)
        await c.post(f"/executions/{failed.id}/retry", data={"csrf_token": token})
    assert [(a.action, a.actor) for a in web_runner.audit(failed.id)] == [("retry", "anonymous")]


async def test_counts_stop_at_the_cap(
    web_runner: JobRunner, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts never scan past their cap: three succeeded with a cap of two show as 2+."""
    from jobrunner.web import _queries

    monkeypatch.setattr(_queries, "COUNT_CAP", 2)
    for i in range(3):
        web_runner.run(Echo, {"text": str(i)})
    web_runner.submit(Echo, {"text": "waiting"})
    with web_runner.engine.connect() as conn:
        counts = _queries.status_counts(conn, ["succeeded", "pending", "failed"])
    assert counts == {"succeeded": 3, "pending": 1, "failed": 0}  # 3 = "more than 2"
    html = (await client.get("/")).text
    assert re.search(r"s-succeeded\">succeeded</span><b>2\+</b>", html)


def test_phase_percentiles_agree_on_both_backends(web_runner: JobRunner) -> None:
    """p50/p95 per phase: PostgreSQL's percentile_cont and SQLite's sort give the same."""
    from jobrunner.web import _queries

    for i in range(5):
        web_runner.run(Echo, {"text": str(i)})
    web_runner.run(Fail, {"message": "x"})
    with web_runner.engine.connect() as conn:
        stats = _queries.phase_percentiles(conn, datetime.now(UTC) - timedelta(hours=1))
        values = sorted(
            conn.execute(
                sa.select(executions.c.execute_ms).where(executions.c.job == "web.echo")
            ).scalars()
        )
    assert stats["web.echo"]["count"] == 5
    assert stats["web.fail"]["count"] == 1
    p50, p95 = stats["web.echo"]["execute"]
    assert p50 == pytest.approx(values[2])
    assert p95 == pytest.approx(values[3] + 0.8 * (values[4] - values[3]))  # rank 3.8
    assert stats["web.fail"]["record"] == (None, None)  # it failed in execute: no record


async def test_extra_routes_are_served_behind_the_same_auth(web_runner: JobRunner) -> None:
    """``routes=`` adds endpoints (a /metrics, say) that the dashboard's auth guards too."""
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse("jobrunner_up 1\n")

    app = create_app(
        web_runner,
        routes=[Route("/metrics", metrics)],
        auth=lambda request: "ops" if request.headers.get("x-token") == "t" else None,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/metrics")).status_code == 401
        scraped = await c.get("/metrics", headers={"x-token": "t"})
    assert scraped.text == "jobrunner_up 1\n"


async def test_a_running_execution_shows_its_lease(
    web_runner: JobRunner, client: httpx.AsyncClient
) -> None:
    """A running execution's page names its lease owner, fencing token and expiry."""
    running = web_runner.submit(Echo, {"text": "x"})
    now = datetime.now(UTC)
    with web_runner.engine.begin() as conn:
        conn.execute(
            sa.update(executions).where(executions.c.id == running).values(
                status="running", phase="execute", worker="host-7:4242:ab12cd", lease_token=9,
                attempt=1, started_at=now, heartbeat_at=now,
                lease_expires_at=now + timedelta(minutes=5),
            )
        )
    html = (await client.get(f"/executions/{running}")).text
    lease = html[html.index('id="lease"'):]
    assert "host-7:4242:ab12cd" in lease
    assert "<dd>9</dd>" in lease
    assert re.search(r"\(in [45] min\)", lease)
    overview = (await client.get("/")).text
    assert "host-7:4242:ab12cd" in overview[overview.index('id="workers"'):]
